r"""Greedy facility location on classes too large for a dense kernel, by pruning with cells.

Pure torch (no Hugging Face imports); used by :mod:`hf_epic.selection` for a distance-based
kernel ``s(i, c) = f(||g_i - g_c||)`` (:class:`hf_epic.kernels.DistanceKernel`; the EPIC
reference's euclidean kernel ``f(d) = exp(-d / D)`` is one) when a class's ``n x n`` kernel does not fit the
memory budget. Nothing here materialises more than a small block of the kernel.

Cells
-----
The class's rows are split into *cells* of at most ``leaf`` rows by a k-d tree (each cell
with more rows is halved at the median of its widest coordinate, level by level), inside
*groups* of about ``_GROUP`` cells built the same way. Cell ``b`` has a centre ``mu_b`` (the
mean of its rows) and a radius ``rho_b`` (the largest distance of a row to the centre); so has
every group. One outlier would make its cell's radius, and so its test below, useless: cells
and groups much wider than the median cell are split further, down to single rows.

Reach
-----
A row ``i`` whose best similarity so far is ``cur_i`` (0 before any medoid) contributes to
the gain ``sum_i max(0, s(i, c) - cur_i)`` of a candidate ``c`` only if
``s(i, c) > cur_i``, that is if ``||g_i - g_c|| < r_i = f^{-1}(cur_i)`` (its *reach*,
:meth:`hf_epic.kernels.DistanceKernel.to_distance`; ``-D ln(cur_i)`` for the euclidean kernel,
infinite while ``cur_i = 0``). With ``R_b = max_{i in b} r_i`` and the triangle inequality
``||g_i - g_c|| >= ||mu_b - g_c|| - rho_b``, no row of cell ``b`` contributes to ``c`` unless

    ||mu_b - g_c|| - rho_b < R_b,                                              (1)

so a gain, and the rows a new medoid takes over, need only the rows of the cells that pass
(1) (tested on groups first, then on the cells of the groups that pass). While most rows can
still contribute (the first steps), a gain is computed over all rows in contiguous blocks
instead, which is cheaper than gathering nearly every cell. As medoids accumulate, reaches
shrink to the distance from a row to its medoid and each evaluation touches a small
neighbourhood instead of the whole class. The test carries margins for the float32 rounding
of similarities and the rounding of distances, so it never prunes a row that contributes: the
gains are exactly those of the dense computation (sums of multiples of ``2**-24`` in
float64), only cheaper.

Test (1) is computed as ``g_c . (-2 mu_b) + (||mu_b||^2 - limit_b) < -||g_c||^2`` in float32:
for the groups, one matrix product of the candidates (each extended by a 1) with a table of
all groups, whose last row is updated as reaches shrink; for the cells of the groups that
pass, the same sum pair by pair (a group's cells are numbered consecutively, so they are a
range). The constant term is lowered by a bound on the float32 rounding of the inputs, the
products, the sums and the threshold, so the test passes every pair that the exact test
passes (and a few more, which contribute nothing). Every group is tested for a candidate's
first evaluation: most groups lie in the sparse parts of a class and hold a few rows (about
83,000 groups at 1,000,000 rows), and nodes of several groups pass (1) for most candidates in
``D = 10``, so they would prune little. A candidate's later evaluations need only what its
previous one found, because rows' best similarities only grow and reaches only shrink: the rows
that contributed then, with their similarities (:attr:`Cells.contributors`, when at most
``_MAX_CONTRIBUTORS``; a selected medoid takes over rows only among these), else the cells that
passed (1) then (:attr:`Cells.known`), tested again. So only a candidate's first evaluation
tests every group.

Stochastic greedy on top of it
------------------------------
:func:`greedy_stochastic_cells` is stochastic greedy (Mirzasoleiman et al., AAAI 2015): each
step draws ``sample_size`` not yet selected rows and adds the one with the largest exact gain,
identical to the dense path's stochastic greedy for the same seed. It is lazy within a
sample: a candidate's last computed gain bounds its current one (gains only fall as medoids
are added), so candidates are evaluated in order of bound and the rest are skipped once no
bound can beat the best gain found. The never-evaluated candidates are evaluated together
with the next ``_BATCH`` by bound, then ``_BATCH`` at a time: an evaluation has a fixed cost
(a few dozen tensor operations, and for a first evaluation the test of every group) worth several
candidates. A class of 200,000 rows at fraction 0.1 takes about a minute on one CPU core, one of
1,000,000 rows about nine minutes; the time grows about quadratically with the class, most of it in
candidates' first evaluations (measured times in ``benchmarks/README.md``).

Exact (lazy) greedy gains nothing from cells at the sizes a CPU can handle: its first steps
need the gains of nearly every candidate while every reach is still large (``O(n^2)``
similarities), and the tiled incremental path of :mod:`hf_epic.selection` is faster there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["Cells", "FreeSampler", "greedy_stochastic_cells"]

# Similarities computed in float32 are within a few ulps (~1e-7) of exp(-d / D); the reach
# allows this much more similarity before it prunes.
_SIM_MARGIN = 1e-6
# Pair blocks (cells x leaf rows x dimensions) are processed in chunks of at most this many
# elements (fewer when the memory budget is small: about 24 bytes of work memory per element).
_CHUNK_ELEMENTS = 1 << 21
_BYTES_PER_ELEMENT = 24
# Rows per cell.
_LEAF = 8
# Cells per group (the first level of the test).
_GROUP = 32
# Cells and groups wider than these multiples of the median cell width are split further.
_CELL_WIDTH = 2.0
_GROUP_WIDTH = 4.0
# Candidates evaluated together beyond the never-evaluated ones (:func:`greedy_stochastic_cells`).
_BATCH = 8
# A candidate's contributing rows are kept (instead of its cells) when at most this many.
_MAX_CONTRIBUTORS = 256
# A gain evaluation covers every row when the groups that pass the test hold more than this
# share of the (candidate, row) pairs.
_DENSE_SHARE = 0.3


class FreeSampler:
    """Uniform samples of the rows not yet selected, reproducible from a torch generator.

    A sample of ``size`` rows is the set of distinct values of uniform draws over the free
    rows, drawn until it has ``size`` elements (a uniformly random subset), returned sorted
    so that ties in gain go to the lowest row. Removing a row is O(1) (swap with the last).

    Args:
        n: Number of rows.
        generator: The torch generator that seeds every draw.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.free = np.arange(n, dtype=np.int64)
        self.position = np.arange(n, dtype=np.int64)
        self.count = n
        self.generator = generator

    def sample(self, size: int) -> torch.Tensor:
        """``min(size, free rows)`` distinct free rows, sorted (int64)."""
        if size >= self.count:
            return torch.from_numpy(np.sort(self.free[: self.count]))
        pick = torch.randint(self.count, (size,), generator=self.generator).unique()
        while pick.numel() < size:
            more = torch.randint(self.count, (size - pick.numel(),), generator=self.generator)
            pick = torch.cat([pick, more]).unique()
        return torch.from_numpy(np.sort(self.free[pick.numpy()]))

    def remove(self, row: int) -> None:
        """Marks ``row`` as selected."""
        at = self.position[row]
        last = self.free[self.count - 1]
        self.free[at] = last
        self.position[last] = at
        self.count -= 1


class Cells:
    """The rows of one class grouped into small balls, with the state the greedy prunes by.

    Args:
        kernel: The class's :class:`hf_epic.selection._Kernel` (a distance-based kernel): its
            similarity ``sim``, embeddings ``x`` (centred), squared norms ``sq``, ``work_dtype`` and
            ``needs_rounding`` define the similarities computed here, exactly as its tiles.
        leaf: Largest number of rows in a cell (narrower cells are split further).
        budget_bytes: Work memory for one block of similarities.
    """

    def __init__(
        self, kernel: Any, leaf: int = _LEAF, budget_bytes: int = _CHUNK_ELEMENTS * _BYTES_PER_ELEMENT
    ) -> None:
        if not kernel.sim.distance_based:
            raise ValueError(f"cells prune distance-based kernels only, not {kernel.metric!r}")
        self.sim = kernel.sim
        # candidate row -> the cells that passed test (1) at its last evaluation (int32, a superset of
        # those that pass now)
        self.known: dict[int, torch.Tensor] = {}
        # candidate row -> the rows that contributed to its gain at its last evaluation, as a 2 x m int32
        # tensor: cell-major positions (into cell_cur) and the float32 similarities' bits
        self.contributors: dict[int, torch.Tensor] = {}
        n = kernel.n
        self.n = n
        self.chunk_elements = int(min(_CHUNK_ELEMENTS, max(1, budget_bytes // _BYTES_PER_ELEMENT)))
        self.dim = kernel.dim
        self.needs_rounding = kernel.needs_rounding
        x64 = kernel.x.to(torch.float64)
        # two levels: groups of about _GROUP cells, split further into cells
        # Outliers (rows far from everything) would make their cell or group wide, so that it
        # passes every test: cells and groups much wider than is typical are split further,
        # down to single rows.
        first = _kd_cells(x64, leaf)
        typical = float(_extents(x64, first, int(first.max()) + 1)[0].median())
        group = _kd_cells(x64, leaf * _GROUP, max_width=_GROUP_WIDTH * typical)
        cell = _kd_cells(x64, leaf, start=group, max_width=_CELL_WIDTH * typical)
        k = int(cell.max()) + 1
        # cells numbered group by group: the cells of a group are consecutive
        by_group = torch.argsort(torch.zeros(k, dtype=torch.int64).index_copy_(0, cell, group), stable=True)
        cell = torch.empty(k, dtype=torch.int64).index_copy_(0, by_group, torch.arange(k))[cell]
        self.num_cells = k
        self.cell_of = cell
        # members[b] = rows of cell b, padded with the sentinel row n
        members = _padded_members(cell, k, fill=n)
        width = members.shape[1]
        self.members = members
        self.center, radius = _balls(x64, cell, k)
        self.center_sq = (self.center * self.center).sum(dim=1)
        # Distances in the kernel and here carry rounding errors; this absolute slack covers
        # them (cancellation in ||a||^2 + ||b||^2 - 2ab scales with the largest squared norm).
        max_sq = float(kernel.sq.max()) if n else 0.0
        eps = 2.0**-52 if kernel.work_dtype == torch.float64 else 2.0**-23
        self.slack = math.sqrt(64.0 * eps * max(max_sq, float(self.center_sq.max()), 1e-300)) + 1e-12
        self.radius = radius * (1.0 + 1e-6) + self.slack
        # cell-major copies (cell x slot), padded with a sentinel that never contributes
        # (its best similarity is 2 > any s): each evaluation gathers whole cells
        x_pad = torch.cat([kernel.x, kernel.x.new_zeros(1, kernel.x.shape[1])])
        sq_pad = torch.cat([kernel.sq, kernel.sq.new_zeros(1)])
        self.x = kernel.x
        self.sq = kernel.sq
        self.cell_x = x_pad[members]  # k x L x D
        self.cell_sq = sq_pad[members]  # k x L
        # the C kernels of the same similarity (hf_epic.native) read each cell's rows transposed
        self.native = getattr(kernel, "native", None)
        self.cell_xt = self.cell_x.transpose(1, 2).contiguous() if self.native is not None else None
        self.cell_cur = torch.where(members < n, 0.0, 2.0).to(torch.float32)  # k x L
        self.cell_assign = torch.full((k, width), -1, dtype=torch.int64)
        # reach of every cell, plus a sentinel cell k that never passes the test
        self.reach = torch.full((k + 1,), math.inf, dtype=torch.float64)
        self.reach[k] = -math.inf
        # groups: centre, radius, their cells (padded with the sentinel k) and reach
        num_groups = int(group.max()) + 1
        self.group_of_cell = torch.zeros(k, dtype=torch.int64).index_copy_(0, cell, group)
        self.group_center, gradius = _balls(x64, group, num_groups)
        self.group_radius = gradius * (1.0 + 1e-6) + self.slack
        self.group_center_sq = (self.group_center * self.group_center).sum(dim=1)
        self.group_cells = _padded_members(self.group_of_cell, num_groups, fill=k)
        self.group_num_cells = torch.bincount(self.group_of_cell, minlength=num_groups)
        self.group_first_cell = torch.cumsum(self.group_num_cells, 0) - self.group_num_cells
        self.group_reach = torch.full((num_groups,), math.inf, dtype=torch.float64)
        self.group_size = torch.bincount(group, minlength=num_groups)
        # The group test as one float32 matrix product (:meth:`_active_groups`): rows
        # [-2 mu_g; b_g] with b_g = ||mu_g||^2 - limit_g, lowered by a bound on the rounding.
        self.norm_bound = math.sqrt(max(max_sq, 0.0))
        self.group_center_norm = self.group_center_sq.sqrt()
        self.group_test = torch.empty(self.dim + 1, num_groups, dtype=torch.float32)
        self.group_test[: self.dim] = (-2.0 * self.group_center).T
        self._update_group_test(torch.arange(num_groups))
        # the same for the cells, one row per cell: [-2 mu_b, b_b]
        self.center_norm = self.center_sq.sqrt()
        self.cell_test = torch.empty(k, self.dim + 1, dtype=torch.float32)
        self.cell_test[:, : self.dim] = -2.0 * self.center
        self._update_cell_test(torch.arange(k))

    @property
    def assign(self) -> torch.Tensor:
        """For every row, its medoid (-1 before the first selection)."""
        out = torch.full((self.n,), -1, dtype=torch.int64)
        real = self.members < self.n
        out[self.members[real]] = self.cell_assign[real]
        return out

    # ----------------------------------------------------------------- geometry

    def _test_offset(
        self, center_sq: torch.Tensor, center_norm: torch.Tensor, reach: torch.Tensor, radius: torch.Tensor
    ) -> torch.Tensor:
        """``b = ||mu||^2 - limit`` of test (1) for balls (float32, lowered by a rounding bound)."""
        # ||mu - c|| - rho < R  <=>  ||mu - c||^2 < (rho + R)^2 (margins folded into the limit)
        limit = (reach + self.slack) / (1.0 - 1e-6) + radius
        limit = torch.where(limit > 0, limit * limit, -1.0)
        b = center_sq - limit
        # float32 rounds the inputs, the products and the sums of the test's D + 1 terms, and
        # the threshold, each by at most 2**-24 of sum |term| <= 2 |c| |mu| + |b| (+ |c|^2):
        # lowering b by 2**-19 of that (D <= 16) or more can only let more pairs pass
        c = self.norm_bound
        scale = 2.0**-24 * max(32, 2 * self.dim + 8)
        err = (b.abs() + 2.0 * c * center_norm + c * c) * scale
        return (b - err).to(torch.float32)

    def _update_group_test(self, groups: torch.Tensor) -> None:
        """Recomputes the last row of :attr:`group_test` for ``groups`` (after their reach changed)."""
        b = self._test_offset(
            self.group_center_sq.index_select(0, groups),
            self.group_center_norm.index_select(0, groups),
            self.group_reach.index_select(0, groups),
            self.group_radius.index_select(0, groups),
        )
        self.group_test[self.dim].index_copy_(0, groups, b)

    def _update_cell_test(self, cells: torch.Tensor) -> None:
        """Recomputes the last column of :attr:`cell_test` for ``cells`` (after their reach changed)."""
        b = self._test_offset(
            self.center_sq.index_select(0, cells),
            self.center_norm.index_select(0, cells),
            self.reach.index_select(0, cells),
            self.radius.index_select(0, cells),
        )
        self.cell_test[:, self.dim].index_copy_(0, cells, b)

    def _active_groups(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate, group) pairs passing test (1) with a group's centre, radius and reach.

        ``||mu - c||^2 < limit`` is ``c . (-2 mu) + (||mu||^2 - limit) < -||c||^2``: one float32
        product of the candidates, extended by a 1, with :attr:`group_test`, in blocks of
        groups; its margin makes it pass every pair that the exact test passes (and a few more).
        """
        p = xc.shape[0]
        ext = torch.cat([xc, xc.new_ones(p, 1)], dim=1).to(torch.float32)
        threshold = (xc * xc).sum(dim=1).neg_().to(torch.float32)[:, None]
        num = self.group_test.shape[1]
        step = max(1, (1 << 19) // p)
        if step >= num:
            which, group = (ext @ self.group_test < threshold).nonzero(as_tuple=True)
            return which, group
        which_parts, group_parts = [], []
        for a in range(0, num, step):
            w, g = (ext @ self.group_test[:, a : a + step] < threshold).nonzero(as_tuple=True)
            which_parts.append(w)
            group_parts.append(g + a)
        return torch.cat(which_parts), torch.cat(group_parts)

    def _active_cells(
        self, xc: torch.Tensor, which: torch.Tensor, group: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (candidate, cell) pairs passing test (1), among the cells of the given groups
        (the float32 test of :meth:`_active_groups`, pair by pair)."""
        return self._test_cells(xc, *self._pairs_of_groups(which, group))

    def _test_cells(
        self, xc: torch.Tensor, which: torch.Tensor, cells: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs ``(which, cells)`` (candidate ``xc[which]``, cell) that pass test (1)."""
        ext = torch.cat([xc, xc.new_ones(xc.shape[0], 1)], dim=1).to(torch.float32)
        threshold = (xc * xc).sum(dim=1).neg_().to(torch.float32)
        t = (ext.index_select(0, which) * self.cell_test.index_select(0, cells)).sum(dim=1)
        keep = t < threshold.index_select(0, which)
        return which[keep], cells[keep]

    def active_pairs(self, cands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate index into ``cands``, cell) for every pair that passes test (1).

        Groups are tested first (the same test with a group's centre, radius and reach), then
        the cells of the groups that pass.
        """
        xc = self.x.index_select(0, cands).to(torch.float64)
        which, group = self._active_groups(xc)
        return self._active_cells(xc, which, group)

    def _similarities(self, cell: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        """s(row, cands[p]) for every row of ``cell[p]`` (float32 P x L, quantised as the kernel's): from
        the C kernels where the class's kernel has them (the same bits as its tiles), else in torch."""
        if self.native is not None:
            assert self.cell_xt is not None
            s = self.native.cell_pairs(
                self.cell_xt, self.cell_sq, cell, self.x, self.sq, cands, self.needs_rounding
            )
            return s.masked_fill_(self.members.index_select(0, cell) == cands[:, None], 1.0)
        xr = self.cell_x.index_select(0, cell)  # P x L x D
        xc = self.x.index_select(0, cands)  # P x D
        dot = torch.bmm(xr, xc[:, :, None])[:, :, 0]
        d2 = (self.cell_sq.index_select(0, cell) + self.sq.index_select(0, cands)[:, None]).sub_(
            dot, alpha=2.0
        )
        s = self._to_similarity(d2)
        return s.masked_fill_(self.members.index_select(0, cell) == cands[:, None], 1.0)

    def _to_similarity(self, d2: torch.Tensor) -> torch.Tensor:
        """The kernel's similarities from squared distances in float32, quantised as the kernel's
        (``d2`` is overwritten)."""
        s = self.sim.from_sq_distance(d2, self.dim)
        if self.needs_rounding:
            s.mul_(2.0**24).round_().div_(2.0**24)
        return s

    def _pairs_per_chunk(self) -> int:
        return max(1, self.chunk_elements // max(1, self.members.shape[1] * self.x.shape[1]))

    # ----------------------------------------------------------------- greedy steps

    def gains(self, cands: torch.Tensor) -> torch.Tensor:
        """Exact gains ``sum_i max(0, s(i, c) - cur_i)`` of ``cands`` (float64).

        A candidate evaluated before needs only what its last evaluation found: the rows that
        contributed then and their similarities (:attr:`contributors`), or, when they were many, the
        cells that passed test (1) (:attr:`known`). Rows' best similarities only grow and reaches
        only shrink, so no other row or cell can contribute now.
        """
        rows = cands.tolist()
        out = torch.zeros(len(rows), dtype=torch.float64)
        listed = [(p, self.contributors.get(row)) for p, row in enumerate(rows)]
        seen = [(p, packed) for p, packed in listed if packed is not None]
        if seen:
            self._gains_from_contributors(rows, seen, out)
        rest = [p for p, packed in listed if packed is None]
        if rest:
            index = torch.tensor(rest, dtype=torch.int64)
            out.index_copy_(0, index, self._gains_by_cells(cands.index_select(0, index)))
        return out

    def _gains_from_contributors(
        self, rows: list[int], seen: list[tuple[int, torch.Tensor]], out: torch.Tensor
    ) -> None:
        """Gains of the candidates ``rows[p]`` for ``(p, contributors)`` in ``seen``, written to ``out[p]``;
        their :attr:`contributors` shrink to the rows that still contribute."""
        packs = [packed for _, packed in seen]
        counts = [packed.shape[1] for packed in packs]
        packed = torch.cat(packs, dim=1) if len(packs) > 1 else packs[0]
        s = packed[1].view(torch.float32)
        contrib = s - self.cell_cur.view(-1).index_select(0, packed[0].to(torch.int64))
        positive = contrib > 0
        which = torch.repeat_interleave(
            torch.tensor([p for p, _ in seen], dtype=torch.int64),
            torch.tensor(counts, dtype=torch.int64),
            output_size=int(packed.shape[1]),
        )
        out.index_add_(0, which, contrib.clamp_min_(0.0).to(torch.float64))
        for (p, part), keep in zip(seen, positive.split(counts)):
            if not bool(keep.all()):
                self.contributors[rows[p]] = part[:, keep]

    def _gains_by_cells(self, cands: torch.Tensor) -> torch.Tensor:
        """Gains of candidates without :attr:`contributors`: over the cells that pass test (1). When most
        of the class can still contribute (the first steps), every row is evaluated in contiguous blocks,
        which is cheaper than gathering nearly all cells pair by pair."""
        xc = self.x.index_select(0, cands).to(torch.float64)
        rows = cands.tolist()
        lists = [self.known.get(row) for row in rows]
        fresh = [p for p, cells in enumerate(lists) if cells is None]
        whiches, cells_parts = [], []
        if fresh:
            index = torch.tensor(fresh, dtype=torch.int64)
            which, group = self._active_groups(xc.index_select(0, index))
            if int(self.group_size.index_select(0, group).sum()) > _DENSE_SHARE * self.n * len(fresh):
                return self._dense_gains(cands)
            which, cell = self._pairs_of_groups(index.index_select(0, which), group)
            whiches.append(which)
            cells_parts.append(cell)
        if len(fresh) < len(rows):
            seen = [(p, cells) for p, cells in enumerate(lists) if cells is not None]
            counts = torch.tensor([cells.numel() for _, cells in seen], dtype=torch.int64)
            positions = torch.tensor([p for p, _ in seen], dtype=torch.int64)
            whiches.append(torch.repeat_interleave(positions, counts, output_size=int(counts.sum())))
            cells_parts.append(torch.cat([cells for _, cells in seen]).to(torch.int64))
        which, cell = self._test_cells(xc, torch.cat(whiches), torch.cat(cells_parts))
        out = torch.zeros(cands.numel(), dtype=torch.float64)
        found_which, found_pos, found_s = [], [], []
        width = self.members.shape[1]
        step = self._pairs_per_chunk()
        for a in range(0, int(which.numel()), step):
            w = which[a : a + step]
            c = cell[a : a + step]
            s = self._similarities(c, cands.index_select(0, w))
            contrib = s - self.cell_cur.index_select(0, c)
            pair, slot = (contrib > 0).nonzero(as_tuple=True)
            found_which.append(w.index_select(0, pair))
            found_pos.append(c.index_select(0, pair) * width + slot)
            found_s.append(s[pair, slot])
            out.index_add_(0, w, contrib.clamp_min_(0.0).sum(dim=1, dtype=torch.float64))
        if found_which:
            self._remember(
                rows, which, cell, torch.cat(found_which), torch.cat(found_pos), torch.cat(found_s)
            )
        return out

    def _pairs_of_groups(self, which: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate, group) pairs expanded to a (candidate, cell) pair for every cell of the group."""
        counts = self.group_num_cells.index_select(0, group)
        total = int(counts.sum())
        # the cells of group g are first[g] .. first[g] + counts - 1
        offset = self.group_first_cell.index_select(0, group) - (torch.cumsum(counts, 0) - counts)
        cells = torch.repeat_interleave(offset, counts, output_size=total) + torch.arange(total)
        return torch.repeat_interleave(which, counts, output_size=total), cells

    def _remember(
        self,
        rows: list[int],
        which: torch.Tensor,
        cell: torch.Tensor,
        found_which: torch.Tensor,
        found_pos: torch.Tensor,
        found_s: torch.Tensor,
    ) -> None:
        """Stores what the evaluation of the candidates ``rows`` found: for ``rows[p]``, its contributing
        rows (cell-major positions ``found_pos``, similarities ``found_s``, where ``found_which == p``)
        in :attr:`contributors` if at most ``_MAX_CONTRIBUTORS``, else the cells that passed test (1)
        (``cell``, where ``which == p``) in :attr:`known`."""
        order = torch.argsort(found_which, stable=True)
        counts = torch.bincount(found_which, minlength=len(rows)).tolist()
        packed = torch.stack([found_pos.to(torch.int32), found_s.view(torch.int32)]).index_select(1, order)
        many = []
        for p, (row, part) in enumerate(zip(rows, packed.split(counts, dim=1))):
            if part.shape[1] <= _MAX_CONTRIBUTORS:
                self.contributors[row] = part.clone(memory_format=torch.contiguous_format)
                self.known.pop(row, None)
            else:
                many.append(p)
        if many:
            order = torch.argsort(which, stable=True)
            per = torch.bincount(which, minlength=len(rows)).tolist()
            parts = cell.index_select(0, order).to(torch.int32).split(per)
            for p in many:
                self.known[rows[p]] = parts[p].clone(memory_format=torch.contiguous_format)

    def _dense_gains(self, cands: torch.Tensor) -> torch.Tensor:
        """:meth:`gains` over every row (cell-major, padding included: it never contributes)."""
        k, width = self.members.shape
        x = self.cell_x.view(k * width, -1)
        sq = self.cell_sq.view(-1)
        cur = self.cell_cur.view(-1)
        rows = self.members.view(-1)
        xct = self.x.index_select(0, cands).T.contiguous()
        sqc = self.sq.index_select(0, cands)
        out = torch.zeros(cands.numel(), dtype=torch.float64)
        step = max(1, self.chunk_elements // max(1, cands.numel()))
        for a in range(0, k * width, step):
            b = min(k * width, a + step)
            if self.native is not None:
                block = torch.empty((b - a, int(cands.numel())), dtype=torch.float32)
                s = self.native.block(x[a:b], sq[a:b], xct, sqc, self.needs_rounding, block)
            else:
                d2 = torch.addmm(sq[a:b, None] + sqc[None, :], x[a:b], xct, alpha=-2.0)
                s = self._to_similarity(d2)
            s.masked_fill_(rows[a:b, None] == cands[None, :], 1.0)
            out += s.sub_(cur[a:b, None]).clamp_min_(0.0).sum(dim=0, dtype=torch.float64)
        return out

    def select(self, j: int) -> None:
        """Adds medoid ``j``: rows it represents better take it as their medoid."""
        cand = torch.tensor([j])
        known = self.known.pop(j, None)
        packed = self.contributors.pop(j, None)
        if packed is not None:  # the rows j can take over are among those its last evaluation found
            pos = packed[0].to(torch.int64)
            s = packed[1].view(torch.float32)
            flat_cur = self.cell_cur.view(-1)
            better = s > flat_cur.index_select(0, pos)
            pos, s = pos[better], s[better]
            if pos.numel():
                flat_cur.index_copy_(0, pos, s)
                self.cell_assign.view(-1).index_fill_(0, pos, j)
                self._refresh(torch.unique(pos // self.members.shape[1]))
            return
        if known is None:
            _, cell = self.active_pairs(cand)
        else:  # the cells j passed when last evaluated (reaches only shrink), tested again
            cell = known.to(torch.int64)
            _, cell = self._test_cells(
                self.x.index_select(0, cand).to(torch.float64), torch.zeros_like(cell), cell
            )
        step = self._pairs_per_chunk()
        for a in range(0, int(cell.numel()), step):
            c = cell[a : a + step]
            s = self._similarities(c, cand.expand(c.numel()))
            cur = self.cell_cur.index_select(0, c)
            better = s > cur
            if not bool(better.any()):
                continue
            self.cell_cur.index_copy_(0, c, torch.where(better, s, cur))
            self.cell_assign.index_copy_(0, c, self.cell_assign.index_select(0, c).masked_fill_(better, j))
            self._refresh(c)

    def _refresh(self, cells: torch.Tensor) -> None:
        """Recomputes the reach and test (1) of ``cells`` and of their groups from :attr:`cell_cur`."""
        cur64 = self.cell_cur.index_select(0, cells).to(torch.float64)
        # the padding's best similarity (2) is clipped to 1: reach 0
        reach = self.sim.to_distance((cur64 - _SIM_MARGIN).clamp_max_(1.0), self.dim)
        self.reach.index_copy_(0, cells, reach.amax(dim=1) * (1.0 + 1e-6) + self.slack)
        self._update_cell_test(cells)
        groups = self.group_of_cell.index_select(0, cells).unique()
        group_reach = self.reach.index_select(0, self.group_cells.index_select(0, groups).reshape(-1))
        self.group_reach.index_copy_(0, groups, group_reach.view(groups.numel(), -1).amax(dim=1))
        self._update_group_test(groups)


def _kd_cells(
    x: torch.Tensor, leaf: int, start: torch.Tensor | None = None, max_width: float = math.inf
) -> torch.Tensor:
    """Cell id of every row: a k-d tree halving, level by level, every cell with more than
    ``leaf`` rows or (with at least two rows) wider than ``max_width`` in some coordinate, at
    the median of its widest coordinate (vectorised over the cells of a level).

    ``start`` is an initial partition (ids 0..m-1) to refine; by default one cell.
    """
    n = x.shape[0]
    cell = torch.zeros(n, dtype=torch.int64) if start is None else start.clone()
    num = int(cell.max()) + 1 if n else 1
    while True:
        counts = torch.bincount(cell, minlength=num)
        width, axis = _extents(x, cell, num)
        big = (counts > leaf) | ((counts > 1) & (width > max_width))
        if not bool(big.any()):
            return cell
        value = x.gather(1, axis[cell][:, None])[:, 0]
        # rank of every row within its cell by that coordinate (ties by row: deterministic)
        by_value = torch.argsort(value, stable=True)
        by_cell = by_value[torch.argsort(cell[by_value], stable=True)]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty(n, dtype=torch.int64)
        rank[by_cell] = torch.arange(n) - starts[cell[by_cell]]
        upper = big[cell] & (rank >= counts[cell] // 2)
        # new ids: cell b keeps id b (its lower half); its upper half gets num + (index among split cells)
        new_id = torch.cumsum(big.to(torch.int64), 0) - 1 + num
        cell = torch.where(upper, new_id[cell], cell)
        num += int(big.sum())


def _extents(x: torch.Tensor, cell: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest coordinate extent, its coordinate) of each of the ``num`` cells."""
    index = cell[:, None].expand_as(x)
    hi = torch.full((num, x.shape[1]), -math.inf, dtype=x.dtype).scatter_reduce_(0, index, x, "amax")
    lo = torch.full((num, x.shape[1]), math.inf, dtype=x.dtype).scatter_reduce_(0, index, x, "amin")
    return (hi - lo).max(dim=1)


def _balls(x: torch.Tensor, ids: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (mean of its rows) and radius (largest row distance to it) of each of ``num`` parts."""
    counts = torch.bincount(ids, minlength=num)
    center = torch.zeros(num, x.shape[1], dtype=x.dtype).index_add_(0, ids, x)
    center /= counts[:, None].to(x.dtype)
    dist = (x - center[ids]).norm(dim=1)
    radius = torch.zeros(num, dtype=x.dtype).scatter_reduce_(0, ids, dist, "amax", include_self=False)
    return center, radius


def _padded_members(ids: torch.Tensor, num: int, fill: int) -> torch.Tensor:
    """``num x max_size`` table of the positions with each id (ascending), padded with ``fill``."""
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(ids.numel()) - starts[ids[order]]
    table = torch.full((num, int(counts.max())), fill, dtype=torch.int64)
    table[ids[order], slot] = order
    return table


def greedy_stochastic_cells(
    kernel: Any,
    budget: int,
    sample_size: int,
    generator: torch.Generator,
    budget_bytes: int = _CHUNK_ELEMENTS * _BYTES_PER_ELEMENT,
    leaf: int = _LEAF,
) -> tuple[list[int], torch.Tensor]:
    """Stochastic greedy on pruned evaluations; returns (medoids in order, assignment).

    Lazy within each sample: a candidate's last computed gain bounds its current one, so the
    sample is evaluated in order of bound (then row) and stops once no remaining bound can
    beat the best exact gain found; the choice is the sample's exact argmax (ties: lowest row).

    Args:
        kernel: The class's kernel (distance-based; its dense matrix is not needed).
        budget: Number of medoids.
        sample_size: Candidates drawn per step.
        generator: Seeds the draws (as the dense path's stochastic greedy).
        budget_bytes: Work memory for one block of similarities.
        leaf: Rows per cell.
    """
    cells = Cells(kernel, leaf, budget_bytes)
    sampler = FreeSampler(kernel.n, generator)
    bound = np.full(kernel.n, np.inf)
    order: list[int] = []
    for _ in range(budget):
        cand = sampler.sample(sample_size).numpy()
        # by bound, descending, then row, ascending
        cand = cand[np.lexsort((cand, -bound[cand]))]
        best_gain, best_row = -math.inf, -1
        pos = 0
        while pos < cand.size:
            top = bound[cand[pos]]
            if top < best_gain or (top == best_gain and cand[pos] > best_row):
                break
            # never-evaluated candidates (infinite bound) go in one batch with the next few by
            # bound, then a few at a time: an evaluation's fixed cost is that of several candidates
            end = pos + int(np.isinf(bound[cand[pos:]]).sum()) + _BATCH
            batch = cand[pos:end]
            gains = cells.gains(torch.from_numpy(batch)).numpy()
            bound[batch] = gains
            for g, row in zip(gains.tolist(), batch.tolist()):
                if g > best_gain or (g == best_gain and row < best_row):
                    best_gain, best_row = g, row
            pos = end
        order.append(best_row)
        sampler.remove(best_row)
        cells.select(best_row)
    return order, cells.assign
