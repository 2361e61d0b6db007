r"""The EPIC selection engine: per-class facility location and isolated-point detection.

This module is pure torch (no Hugging Face imports). It implements steps 2-4 of EPIC
(Yang, Liu & Mirzasoleiman, ICML 2022) for a matrix of per-example embeddings ``g_i``
(usually the gradient of the loss w.r.t. the logits, ``softmax(z_i) - onehot(y_i)``).

The math
--------
For every class ``c`` with ``n_c`` examples, let ``V`` be the class's rows. The similarity
between two rows is a registered kernel (:mod:`hf_epic.kernels`; ``metric`` names it,
:func:`available_kernels` lists the names), with ``s(i, i) = 1`` and ``s <= 1``:

* ``metric="euclidean"`` (the EPIC reference kernel, submodlib's dense "euclidean"):
  ``s(i, j) = exp(-||g_i - g_j||_2 / D)`` with ``D`` the embedding dimension, so
  ``s`` lies in ``(0, 1]``;
* ``metric="cosine"``: ``s(i, j) = <g_i, g_j> / (||g_i|| ||g_j||)`` (0 when a vector is
  zero).

A *distance-based* kernel, ``s(i, j) = f(||g_i - g_j||)`` with ``f`` decreasing (euclidean is
one), also gives the pruning bounds of the triangle inequality used below: a row whose best
similarity is ``cur`` gains only from candidates nearer than ``f^{-1}(cur)``.

The facility-location function of a set of medoids ``S`` is

    F(S) = sum_{i in V} max(0, max_{j in S} s(i, j)),       F(empty) = 0,

a monotone submodular function. Greedy maximisation with budget
``K_c = ceil(fraction * n_c)`` starts from ``S = {}`` and ``K_c`` times adds the row with
the largest marginal gain

    gain(c | S) = F(S + {c}) - F(S) = sum_{i in V} max(0, s(i, c) - cur_i),
    cur_i = max(0, max_{j in S} s(i, j)),

which guarantees ``F(S_greedy) >= (1 - 1/e) max_{|S| <= K_c} F(S)`` (Nemhauser, Wolsey &
Fisher, 1978). Ties are broken towards the lowest row position (within the class, in input
order). Every row is then assigned to its most similar medoid (ties: the medoid that was
selected first, as ``argmax`` over the greedy order does in the reference), a cluster's size
is the number of rows assigned to it (a medoid normally counts itself), and every row whose
cluster has size ``<= cluster_threshold`` is dropped: these are the isolated points.

With ``isolation_scores=True`` every isolated row ``i`` also gets the score
``1 - max(0, max_{j in V, j != i} s(i, j))`` (1 for a one-row class): how far it is, in the kernel's
terms, from its nearest other row of the class. :mod:`hf_epic.drop_rules` decides from these
which isolated rows a training round drops.

Optimisers
----------
``greedy="naive"``
    The definition above, recomputing every gain at every step: ``O(K n^2)``. Used as the
    golden reference in the tests.
``greedy="lazy"``
    Exact greedy with incrementally maintained gains. After ``j*`` is selected, only rows whose ``cur_i``
    increases (from ``o_i`` to ``n_i = s(i, j*)``) change any gain, and the gain of
    candidate ``c`` drops by exactly ``sum_i clamp(s(i, c), o_i, n_i) - o_i``. For the
    euclidean kernel a row can only affect candidates with ``s(i, c) > o_i``, and by the
    triangle inequality those satisfy ``s(c, j*) > o_i * n_i``; only that block of the
    kernel is touched (rows are grouped by their threshold, each group against its own
    candidate set); any distance-based kernel has the same bound,
    ``s(c, j*) > f(f^{-1}(o_i) + f^{-1}(n_i))``. Gains are exact (see below), so the medoids are identical to
    ``"naive"``'s, ties included.
``greedy="stochastic"``
    Stochastic greedy (Mirzasoleiman et al., AAAI 2015): each step draws, without
    replacement and seeded by ``seed``, ``ceil((n_c / K_c) log(1 / epsilon))`` not yet
    selected rows and adds the one with the largest exact gain. Expected
    ``(1 - 1/e - epsilon)`` approximation.

Exactness
---------
Similarities are rounded to multiples of ``2**-24`` (float32 values in ``[0.5, 1]``, which
is all of the euclidean kernel for EPIC's embeddings, already are). Sums of such numbers
are exact in float64 (and in float32 while they stay below 1, which an update uses for runs of
changed rows whose gains can change by less than 1 in all), so every gain is exact whatever the
order of summation: ``"lazy"`` and
``"naive"`` see bit-identical gains and pick identical medoids, exact ties included (the
lowest row position wins; submodlib's heap breaks them differently, which is why its medoids
can differ from ours after a tie while every step's gain is the same).

Memory and speed
----------------
The similarity kernel of a class is held in memory (float32, ``4 n_c^2`` bytes, exactly
symmetric: upper-triangular tiles are computed and mirrored) only if it fits
``memory_budget_mb``. A larger class is never materialised:

* exact greedy (and cosine, and a GPU): the rows and blocks the greedy needs are recomputed
  from the embeddings, ``O(n_c^2)`` kernel evaluations per pass. On the CPU they run in
  cache-sized blocks (256 x 1,024) in reused buffers; a pass over every pair computes only the
  blocks on and above the diagonal and uses each similarity for both of its columns; exact
  greedy's first pass computes both the first gains and the first medoid's update, for a first
  medoid guessed from samples of the rows (:meth:`_Kernel.likely_first_medoid`; checked against
  the exact first gains, and a wrong guess costs a second pass, never another result); a later
  update sorts the rows it changes by their pruning threshold and computes each block of 64 of
  them against its own prefix of the candidates; and these passes, and each step's column, are
  shared by the CPU threads torch is configured for (:func:`_in_threads`). For the euclidean
  kernel with ``D <= 64`` the blocks, columns and sums are fused C kernels
  (:mod:`hf_epic.native`: a similarity is computed and added to its sums in registers), which
  compute the torch kernels' similarities bit for bit; without a C compiler the blocks are
  torch calls (float64 distances, similarities, a float64 copy summed by matrix-vector
  products), about 2x slower. A class of 20,000 rows takes about 2.3 s on two CPU cores, one of
  200,000 under two minutes;
* stochastic greedy, a distance-based kernel, on the CPU, classes of at least 12,000 rows: the rows
  are grouped into small cells and every gain or update touches only the cells that can
  contribute (:mod:`hf_epic.cells`), with the dense path's results for the same seed; a class
  of 200,000 rows at fraction 0.1 takes about a minute on one CPU core, one of 1,000,000 rows about
  nine minutes.

Both are exact up to the last bit of the recomputed similarities (differently shaped matrix
products may round differently; with float64 distances, ``D <= 64``, they agree bit for bit in
practice, and the euclidean kernel is rounded to float32 once, from float64, which the C kernels
reproduce). Distances are computed in float64 for ``D <= 64`` (``||a||^2 + ||b||^2 - 2 a.b`` on
class-centred data) and in float32 above. On the CPU the work runs on one intra-op thread
(torch's thread pool costs more than it gains on the many small operations, and spins
badly on a loaded machine); instead, when torch is configured for several threads, classes
are processed concurrently: one thread at a time runs the small greedy steps (they hold the
GIL) while the others build the next classes' kernels, each within its share of the memory
budget, and run each new kernel's first, large greedy steps (a few big tensor operations, which
release the GIL) before handing the class over. A class too large for its share of the budget
as a dense kernel is processed alone, its large tiled passes split among the threads by blocks
of rows; sums of similarities are exact in float64, so the result does not depend on the split.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hf_epic.cells import FreeSampler, greedy_stochastic_cells
from hf_epic.kernels import (
    KERNELS,
    DistanceKernel,
    SimilarityKernel,
    available_kernels,
    get_kernel,
    register_kernel,
)

__all__ = [
    "KERNELS",
    "SelectionResult",
    "SimilarityKernel",
    "available_kernels",
    "find_isolated",
    "merge_results",
    "partition_classes",
    "register_kernel",
    "similarity_kernel",
]

logger = logging.getLogger(__name__)

_GREEDY = ("lazy", "naive", "stochastic")
# Relative safety margin on the triangle-inequality pruning threshold (float32 rounding of
# similarities is ~1e-7 relative; this is two orders of magnitude above it).
_PRUNE_MARGIN = 1e-5
# Exact greedy on a CPU class of at least this many rows without a dense kernel logs a warning.
_SLOW_EXACT_ROWS = 50_000
# Stochastic greedy on classes of at least this many rows without a dense kernel uses cells.
_CELLS_MIN_ROWS = 12_000
# Blocks up to this many elements are processed in one piece.
_SMALL_BLOCK = 1 << 15
# a dense greedy step that updates at least this many (rows x columns) is a large one (_DenseSteps)
_HEAVY_STEP = 1 << 19
# Work blocks of the tiled path on the CPU: rows x columns whose float64 distances (2 MiB) mostly
# stay in cache through the similarity's element-wise steps, while each block is large enough that
# its ~15 tensor calls (each one a hand-over of the GIL between threads) cost little. Measured here:
# 256 x 512 blocks compute 1.8x the similarities per second of 32-row tiles as wide as a class of
# 20,000 rows (one thread); on a full pass over 30,000 rows, 256 x 1,024 blocks compute 1.2-1.3x
# those of 256 x 512 blocks with two threads, 0.87x with one.
_BLOCK_ROWS = 256
_BLOCK_COLS = 1024
# Blocks of an update (:meth:`_Kernel.update_sums`): as many similarities as a work block in fewer
# rows, since each block of rows is computed against the candidates its lowest threshold admits.
# Measured on a 20,000-row class, steps 2-1,000: blocks of 256 rows compute 1.2 n^2 similarities,
# of 64 rows 0.84 n^2 (0.66 n^2 row by row); a 50,000-row class takes 11 % less time with 64 x 4,096
# blocks than with 256 x 1,024 (two threads), and about the same with 32 x 8,192.
_UPDATE_ROWS = 64
_UPDATE_COLS = 4096
# a tiled pass over at least this many similarities is split among the kernel's threads
_THREADED_PAIRS = 1 << 24
# a greedy step's column (C kernels) of a class of at least this many rows is split among them
_THREADED_COLUMN = 1 << 16
# Changed rows whose spans (new - old) sum below this have exact float32 column sums of their
# gain changes: every partial sum is a multiple of 2**-24 below 1 (:func:`_exact_runs`).
_FLOAT32_EXACT_SPAN = 0.999
# The first medoid's guess (:meth:`_Kernel.likely_first_medoid`): candidates ranked over this many
# evenly spaced rows, the best this many ranked again over 16 times as many, and the sums over
# every row of the best this many. Measured on the 200,000-row class of benchmarks/bench_selection.py:
# the first medoid ranked 76th over 512 rows, 6th over 2,048, 1st over 8,192; the guess finds it.
_GUESS_SAMPLE = 1024
_GUESS_SHORTLIST = 4096
_GUESS_FINAL = 64
# Largest gathered piece (rows x candidates) of a dense-kernel update.
_PIECE_ELEMENTS = 1 << 20


@dataclass
class SelectionResult:
    """What :func:`find_isolated` found. All tensors are int64 and on the CPU.

    Attributes:
        medoids: Row positions of the selected medoids, class by class (classes in sorted
            label order), each class's medoids in greedy order.
        assignment: For every row, the row position of the medoid it is assigned to (-1 for
            rows of classes left out by ``find_isolated(classes=...)``).
        cluster_sizes: Number of rows assigned to each medoid, same order as ``medoids``.
        dropped: Sorted row positions of the rows in clusters of size ``<= cluster_threshold``.
        kept: Sorted row positions of all other rows (of the selected classes).
        per_class: ``label -> {"n": rows, "budget": medoids, "num_dropped": dropped rows}``.
        seconds: Wall-clock time spent in :func:`find_isolated`.
        isolation_scores: float64, one per row of ``dropped`` (same order): one minus the row's
            largest similarity to another row of its class, ``1 - max(0, max_{j != i} s(i, j))``
            (1 for the only row of a class); None unless ``find_isolated(isolation_scores=True)``.
    """

    medoids: torch.Tensor
    assignment: torch.Tensor
    cluster_sizes: torch.Tensor
    dropped: torch.Tensor
    kept: torch.Tensor
    per_class: dict[int, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    isolation_scores: torch.Tensor | None = None


# --------------------------------------------------------------------------- validation


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{name} is a numpy array of dtype object; pass a numeric array instead.")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(
        f"{name} must be a torch.Tensor or a numpy.ndarray, got {type(value).__name__}; "
        f"convert it with torch.as_tensor(...) first."
    )


def _check_inputs(
    embeddings: Any,
    labels: Any,
    fraction: float,
    metric: str,
    greedy: str,
    cluster_threshold: int,
    seed: int,
    epsilon: float,
    memory_budget_mb: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates every argument of :func:`find_isolated`; returns (embeddings, labels)."""
    emb = _as_tensor(embeddings, "embeddings")
    lab = _as_tensor(labels, "labels")
    if emb.dim() != 2:
        raise ValueError(
            f"embeddings must be a 2-D (rows x dimensions) array, got shape {tuple(emb.shape)}; "
            "reshape it to (num_rows, dim)."
        )
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(
            f"embeddings is empty (shape {tuple(emb.shape)}); pass at least one row with at least one dimension."
        )
    if emb.dtype == torch.bool or emb.is_complex():
        raise ValueError(f"embeddings must be real numbers, got dtype {emb.dtype}; cast to float32.")
    if not emb.is_floating_point():
        emb = emb.to(torch.float64)
    if not bool(torch.isfinite(emb).all()):
        bad = int((~torch.isfinite(emb)).any(dim=1).sum())
        raise ValueError(
            f"embeddings contain NaN or infinite values in {bad} row(s); "
            "fix the model or data that produced them (e.g. check for a diverged loss) before selection."
        )
    if lab.dim() != 1:
        raise ValueError(f"labels must be 1-D (one label per row), got shape {tuple(lab.shape)}; flatten it.")
    if lab.shape[0] != emb.shape[0]:
        raise ValueError(
            f"shape mismatch: embeddings has {emb.shape[0]} rows but labels has {lab.shape[0]}; "
            "pass exactly one label per embedding row."
        )
    if lab.dtype == torch.bool or lab.is_floating_point() or lab.is_complex():
        raise ValueError(
            f"labels must be integers, got dtype {lab.dtype}; pass class ids as an integer array "
            "(e.g. labels.long())."
        )
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")
    if not (0.0 < float(fraction) <= 1.0):
        raise ValueError(
            f"fraction must be in (0, 1] (the share of each class kept as medoids), got {fraction!r}; "
            "EPIC uses 0.1, 0.2 or 0.3."
        )
    get_kernel(metric)  # raises on an unknown name
    if greedy not in _GREEDY:
        raise ValueError(f"unknown greedy {greedy!r}; choose one of {', '.join(_GREEDY)}.")
    if isinstance(cluster_threshold, bool) or not isinstance(cluster_threshold, (int, np.integer)):
        raise ValueError(f"cluster_threshold must be an integer >= 0, got {cluster_threshold!r}.")
    if cluster_threshold < 0:
        raise ValueError(
            f"cluster_threshold must be >= 0, got {cluster_threshold}; use 1 (the EPIC default) to drop "
            "singleton clusters, 0 to drop nothing."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    if not isinstance(epsilon, (int, float, np.floating)) or not (0.0 < float(epsilon) < 1.0):
        raise ValueError(
            f"epsilon must be in (0, 1) (stochastic greedy's accuracy), got {epsilon!r}; try 0.01."
        )
    if not isinstance(memory_budget_mb, (int, float, np.integer, np.floating)) or not (
        float(memory_budget_mb) > 0
    ):
        raise ValueError(
            f"memory_budget_mb must be a positive number of megabytes, got {memory_budget_mb!r}."
        )
    return emb, lab.to(emb.device)


def class_budget(fraction: float, n: int) -> int:
    """Number of medoids for a class of ``n`` rows: ``ceil(fraction * n)``, at least 1.

    A relative tolerance of 1e-9 absorbs binary rounding (``0.3 * 10`` is
    ``3.0000000000000004`` in floating point, and its budget is 3, not 4).

    Args:
        fraction: Share of the class to select as medoids, in (0, 1].
        n: Number of rows in the class.
    """
    return max(1, min(n, math.ceil(fraction * n * (1.0 - 1e-9))))


# --------------------------------------------------------------------------- kernels

# Similarities are rounded to multiples of 2**-24 (float32 values in [0.5, 1] already are).
# Sums of such numbers in float64 are exact (below 2**29 in magnitude), so every gain the
# greedy computes is exact whatever the summation order: incremental and naive greedy see
# bit-identical gains, and exact ties really are ties.
_QUANTUM = 2.0**24


def _tile_plan(
    n: int, budget_bytes: int, cuda: bool = False, wide: bool = False, concurrent: bool = False
) -> tuple[int, bool]:
    """(rows per work tile, whether the dense n x n float32 kernel fits the budget).

    A float64 work tile of width n takes at most ~1/8 of the budget and at most 32 rows on
    the CPU (so that it stays in cache), or 128 for wide embeddings (the matrix product
    dominates and prefers larger blocks) and for a class built while other threads run other
    classes (``concurrent``: a tile's ~20 tensor calls each hand the GIL over, which then
    costs more than the cache; measured on ten classes of 5,000 rows with two threads, 128-row
    tiles take 15 % less time than 32-row ones, with one thread 7 % more); 1024 rows on a GPU
    (fewer, larger launches).
    """
    per_row = 8 * max(n, 1)
    cap = 1024 if cuda else (128 if wide or concurrent else 32)
    tile_rows = int(max(1, min(cap, budget_bytes // (8 * per_row))))
    return tile_rows, 4 * n * n + 4 * tile_rows * per_row <= budget_bytes


class _Kernel:
    """The similarity kernel of one class, either held densely or recomputed in tiles.

    Orientation: ``s(i, c)`` is row ``i`` (the row being represented), column ``c`` (the
    candidate medoid); the gain of ``c`` is a sum over a column.

    Args:
        x: The class's embeddings (rows x D), any float dtype, on the compute device.
        metric: A registered kernel's name (:func:`hf_epic.kernels.available_kernels`) or a kernel.
        budget_bytes: Memory the kernel may use.
        workspace: A one-element list holding a float32 buffer to build the dense kernel in
            (grown and replaced when too small), so that consecutive classes reuse memory
            instead of page-faulting in a fresh ``4 n^2`` bytes each time.
        threads: CPU threads that share the large tiled passes (each on one intra-op thread;
            the large tensor operations release the GIL).
        concurrent: Whether other threads process other classes meanwhile (larger tiles,
            :func:`_tile_plan`).
    """

    def __init__(
        self,
        x: torch.Tensor,
        metric: str | SimilarityKernel,
        budget_bytes: int,
        workspace: list[torch.Tensor] | None = None,
        threads: int = 1,
        concurrent: bool = False,
    ) -> None:
        self.sim = get_kernel(metric)
        self.metric = self.sim.name
        self.n = int(x.shape[0])
        self.device = x.device
        self.dim = int(x.shape[1])
        self.inv_dim = 1.0 / x.shape[1]
        # float64 distances where cheap (small D); float32 matmul for wide embeddings
        self.work_dtype = torch.float64 if x.shape[1] <= 64 else torch.float32
        x, sq, self.needs_rounding = self.sim.prepare(x.to(torch.float64))
        self.sq = None if sq is None else sq.to(self.work_dtype)
        self.x = x.to(self.work_dtype)
        self.xt = self.x.T.contiguous()
        self.tile_rows, self.dense = _tile_plan(
            self.n, budget_bytes, x.device.type == "cuda", self.work_dtype == torch.float32, concurrent
        )
        self.threads = max(1, int(threads)) if x.device.type == "cpu" else 1
        # fused C kernels of the same similarity (hf_epic.native), for the CPU's large passes
        cpu64 = x.device.type == "cpu" and self.work_dtype == torch.float64
        self.native = self.sim.native(self.dim) if cpu64 else None
        self.matrix: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None  # plain column sums, when known
        self._position: torch.Tensor | None = None  # update_sums' work buffer
        self._changed: torch.Tensor | None = None  # column_changes' work buffer
        if self.dense:
            self.matrix = self._build_dense(workspace)
        elif self.blocked():  # buffers of column(): one similarity column per greedy step
            self._column = (
                torch.empty((self.n, 1), dtype=torch.float32),
                torch.empty((self.n, 1), dtype=self.x.dtype),
            )

    def _build_dense(self, workspace: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The full float32 kernel, exactly symmetric: upper-triangular tiles, mirrored."""
        n = self.n
        if workspace is None:
            s = torch.empty((n, n), dtype=torch.float32, device=self.device)
        else:
            if not workspace or workspace[0].numel() < n * n or workspace[0].device != self.device:
                workspace[:] = [torch.empty(n * n, dtype=torch.float32, device=self.device)]
            s = workspace[0][: n * n].view(n, n)
        # column sums of the kernel, gathered while each tile is in cache (exact in float64)
        sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        for r0 in range(0, n, self.tile_rows):
            r1 = min(n, r0 + self.tile_rows)
            tile = s[r0:r1, r0:]
            self._tile(slice(r0, r1), slice(r0, n), out=tile)
            # the diagonal block: mirror its strict upper triangle onto the lower one
            diag = tile[:, : r1 - r0]
            upper = torch.triu(diag, diagonal=1)
            diag.copy_(upper + upper.T)
            diag.fill_diagonal_(1.0)
            right = tile[:, r1 - r0 :]
            s[r1:, r0:r1] = right.T
            sums[r0:] += tile.sum(dim=0, dtype=torch.float64)
            sums[r0:r1] += right.sum(dim=1, dtype=torch.float64)
        self.sums = sums
        return s

    def _tile(
        self,
        rows: torch.Tensor | slice,
        cols: torch.Tensor | slice | None,
        out: torch.Tensor | None = None,
        scratch: bool = False,
        work: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Similarities s(rows, cols) computed from the embeddings (float32, quantised).

        ``scratch``: compute in this thread's reused block buffers (:func:`_scratch`; the result
        is valid until the thread's next block). ``out`` / ``work``: buffers of the right shape.
        """
        xa = self.x[rows]
        xbt = self.xt if cols is None else self.xt[:, cols]
        sqa = None if self.sq is None else self.sq[rows]
        sqb = self.sq if self.sq is None or cols is None else self.sq[cols]
        return self._similarities(xa, xbt, sqa, sqb, out, work, scratch)

    def _similarities(
        self,
        xa: torch.Tensor,
        xbt: torch.Tensor,
        sqa: torch.Tensor | None,
        sqb: torch.Tensor | None,
        out: torch.Tensor | None = None,
        work: torch.Tensor | None = None,
        scratch: bool = False,
    ) -> torch.Tensor:
        """Similarities of prepared rows ``xa`` and columns ``xbt`` (float32, quantised); the
        buffers as in :meth:`_tile`."""
        if scratch:
            shape = (int(xa.shape[0]), int(xbt.shape[1]))
            out, work = _scratch(0, shape, torch.float32), _scratch(1, shape, self.x.dtype)
        out = self.sim.tile(xa, xbt, sqa, sqb, self.dim, out, work)
        if self.needs_rounding:
            out.mul_(_QUANTUM).round_().div_(_QUANTUM)
        return out

    def column(self, j: int) -> torch.Tensor:
        """s(., j) for all rows of the class (float32, length n, contiguous).

        Without a dense kernel on the CPU, the result is a buffer that the next call overwrites.
        """
        if self.matrix is not None:
            return self.matrix[j]  # symmetric
        if self.native is not None and self.blocked():
            return self._native_column(j, None)[0]
        cols = torch.tensor([j], device=self.device)
        if self.blocked():
            out = self._tile(slice(None), cols, out=self._column[0], work=self._column[1])[:, 0]
        else:
            out = self._tile(slice(None), cols)[:, 0]
        out[j] = 1.0
        return out

    def column_changes(self, j: int, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`column` ``j`` and the rows whose similarity to ``j`` exceeds ``cur`` (ascending,
        int64): the rows that a greedy step selecting ``j`` takes over."""
        if self.native is not None and self.blocked():
            col, changed = self._native_column(j, cur)
            assert changed is not None
            return col, changed
        col = self.column(j)
        return col, (col > cur).nonzero().squeeze(1)

    def _native_column(self, j: int, cur: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`column_changes` (only the column without ``cur``) from the C kernels, the rows of a
        large class split among the threads."""
        assert self.native is not None and self.sq is not None
        lib, n = self.native, self.n
        out = self._column[0].view(n)
        if self._changed is None:
            self._changed = torch.empty(n, dtype=torch.int64)
        changed = self._changed
        parts = self.threads if n >= _THREADED_COLUMN else 1
        bounds = [n * p // parts for p in range(parts + 1)]

        def part(p: int) -> int:
            r0, r1 = bounds[p], bounds[p + 1]
            return lib.column(
                self.x, self.xt, self.sq, j, r0, r1, self.needs_rounding, cur, out, changed[r0:]
            )

        counts = _on_pool(parts, part)
        if cur is None:
            return out, None
        if parts == 1:
            return out, changed[: counts[0]]
        return out, torch.cat([changed[bounds[p] : bounds[p] + counts[p]] for p in range(parts)])

    def block(self, rows: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        """s(rows, cols) (float32); ``cols=None`` means all columns."""
        if self.matrix is not None:
            if cols is None:
                return self.matrix.index_select(0, rows)
            # two index_selects: ~2.5x faster than advanced indexing with an index grid
            return self.matrix.index_select(0, rows).index_select(1, cols)
        out = self._tile(rows, cols)
        colpos = torch.arange(self.n, device=self.device) if cols is None else cols
        return out.masked_fill_(rows[:, None] == colpos[None, :], 1.0)

    def row_chunks(self, rows: torch.Tensor | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yields ``(k0, k1, s(rows[k0:k1], .))`` in tiles that fit the budget (all rows by default)."""
        count = self.n if rows is None else int(rows.numel())
        for k0 in range(0, count, self.tile_rows):
            k1 = min(count, k0 + self.tile_rows)
            if rows is None:
                if self.matrix is not None:
                    yield k0, k1, self.matrix[k0:k1]
                else:
                    tile = self._tile(slice(k0, k1), None)
                    idx = torch.arange(k1 - k0, device=self.device)
                    tile[idx, idx + k0] = 1.0
                    yield k0, k1, tile
            else:
                yield k0, k1, self.block(rows[k0:k1], None)

    def column_sums(
        self,
        lower: torch.Tensor | None = None,
        upper: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sum_i clamp(s(i, c), lower_i, upper_i)`` for every column c, exactly (float64).

        Args:
            lower: Per-row lower clamp (float32), aligned with ``rows``; None for no clamp.
            upper: Per-row upper clamp (float32), aligned with ``rows``; None for no clamp.
            rows: Row positions to sum over (all rows by default).
        """
        if lower is None and upper is None and rows is None and self.sums is not None:
            return self.sums.clone()
        if rows is None and self.blocked():
            return self.symmetric_sums([(lower, upper)])[0]
        total = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        buf = None
        for k0, k1, tile in self.row_chunks(rows):
            if lower is not None or upper is not None:
                if buf is None or buf.shape[0] != k1 - k0:
                    buf = torch.empty_like(tile)
                lo = None if lower is None else lower[k0:k1, None]
                hi = None if upper is None else upper[k0:k1, None]
                tile = torch.clamp(tile, min=lo, max=hi, out=buf)
            total += tile.sum(dim=0, dtype=torch.float64)
        return total

    def blocked(self) -> bool:
        """Whether the large passes run in cache-sized blocks (the CPU, no dense kernel)."""
        return self.matrix is None and self.device.type == "cpu"

    def symmetric_sums(
        self, clamps: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]]
    ) -> torch.Tensor:
        """:meth:`column_sums` over every row for each ``(lower, upper)`` of ``clamps`` (one row of
        the result each), from the blocks on and above the diagonal only, in one sweep (a
        :meth:`blocked` kernel).

        Block ``(I, C)`` right of the diagonal gives each column ``c`` its rows ``i`` (clamped by
        the rows' bounds) and, mirrored, each column ``i`` its rows ``c`` (clamped by theirs), so
        every similarity is computed once for all the sums; a diagonal block is made exactly
        symmetric from its strict upper triangle, as the dense kernel is.
        """
        n = self.n
        count = len(clamps)
        mode = self._native_mode(clamps)
        if mode is not None:
            assert self.native is not None and self.sq is not None
            lib, x, xt, sq, q = self.native, self.x, self.xt, self.sq, self.needs_rounding
            clamp = [(lo, hi) for lo, hi in clamps if lo is not None or hi is not None]
            lo = hi = None
            if clamp:  # None: no bound (every similarity lies in [0, 1])
                lo = torch.zeros(n) if clamp[0][0] is None else clamp[0][0].to(torch.float32).contiguous()
                hi = torch.ones(n) if clamp[0][1] is None else clamp[0][1].to(torch.float32).contiguous()

            def band(r0: int, flat: torch.Tensor) -> None:
                lib.band_sums(x, xt, sq, r0, min(n, r0 + _BLOCK_ROWS), q, mode, lo, hi, flat)

            starts = list(range(0, n, _BLOCK_ROWS))
            return _in_threads(self.threads, starts, band, count * n, pairs=n * n // 2).view(count, n)

        def clamped(tile: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
            # maximum / minimum: a tensor-bounded clamp is several times slower
            if lo is None and hi is None:
                return tile
            buf = _scratch(2, tuple(tile.shape), tile.dtype)
            if lo is not None:
                torch.maximum(tile, lo, out=buf)
            if hi is not None:
                torch.minimum(buf if lo is not None else tile, hi, out=buf)
            return buf

        # the bounds in float64 (exact), for the float64 copy of each block
        wide = [
            (None if lo is None else lo.to(torch.float64), None if hi is None else hi.to(torch.float64))
            for lo, hi in clamps
        ]
        ones = torch.ones(max(_BLOCK_ROWS, _BLOCK_COLS), dtype=torch.float64)

        def work(r0: int, flat: torch.Tensor) -> None:
            r1 = min(n, r0 + _BLOCK_ROWS)
            total = flat.view(count, n)
            for c0 in range(r0, n, _BLOCK_COLS):
                c1 = min(n, c0 + _BLOCK_COLS)
                tile = self._tile(slice(r0, r1), slice(c0, c1), scratch=True)
                off = 0
                if c0 == r0:  # _BLOCK_COLS >= _BLOCK_ROWS: the whole diagonal square
                    off = r1 - r0
                    diag = tile[:, :off]
                    strict = torch.triu(diag, diagonal=1)
                    diag.copy_(strict + strict.T)
                    diag.fill_diagonal_(1.0)
                # Sums as float64 matrix-vector products of one float64 copy of the block: exact
                # (multiples of 2**-24 below 2**29, in any order); the copy and two products take
                # 60 % of the time of two float32 -> float64 reductions.
                block = _scratch(1, (r1 - r0, c1 - c0), torch.float64).copy_(tile)
                for k, (lower, upper) in enumerate(wide):
                    lo_r = None if lower is None else lower[r0:r1, None]
                    hi_r = None if upper is None else upper[r0:r1, None]
                    total[k, c0:c1].addmv_(clamped(block, lo_r, hi_r).T, ones[: r1 - r0])
                    if off < c1 - c0:
                        lo_c = None if lower is None else lower[None, c0 + off : c1]
                        hi_c = None if upper is None else upper[None, c0 + off : c1]
                        total[k, r0:r1].addmv_(clamped(block[:, off:], lo_c, hi_c), ones[: c1 - c0 - off])

        flat = _in_threads(self.threads, list(range(0, n, _BLOCK_ROWS)), work, count * n, pairs=n * n // 2)
        return flat.view(count, n)

    def _native_mode(self, clamps: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]]) -> int | None:
        """``epic_band_sums``' mode for these sums (plain; clamped; plain then clamped), or None
        when the C kernels do not run them."""
        if self.native is None or not self.blocked():
            return None
        plain = [lo is None and hi is None for lo, hi in clamps]
        return {(True,): 0, (False,): 1, (True, False): 2}.get(tuple(plain))

    def likely_first_medoid(self) -> int:
        """A row that probably has the largest column sum, i.e. exact greedy's first medoid, found
        from at most about ``2,100 n`` similarities instead of ``n^2 / 2`` (0.5 s for a class of
        200,000 rows on two CPU cores, against about half a minute for the pass over every pair).

        Every candidate is ranked by its sum over an evenly spaced sample of ``_GUESS_SAMPLE``
        rows, the best ``_GUESS_SHORTLIST`` (at most ``n / 16``) are ranked again over a sample
        16 times larger, and the sums over every row of the best ``_GUESS_FINAL`` decide (ties to
        the lowest row). Only a guess: :func:`_greedy_incremental` checks it against the exact
        first gains.
        """
        n = self.n

        def sample(size: int) -> torch.Tensor:
            return torch.linspace(0, n - 1, min(n, size), dtype=torch.float64).round_().long()

        def sums_over(cands: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            # candidates as rows of the blocks (the kernel is symmetric), the sample as columns
            xbt = self.xt.index_select(1, rows)
            sqb = None if self.sq is None else self.sq.index_select(0, rows)

            def work(k0: int, total: torch.Tensor) -> None:
                k1 = min(int(cands.numel()), k0 + _BLOCK_ROWS)
                xa = self.x.index_select(0, cands[k0:k1])
                sqa = None if self.sq is None else self.sq.index_select(0, cands[k0:k1])
                for c0 in range(0, int(rows.numel()), _BLOCK_COLS):
                    c1 = min(int(rows.numel()), c0 + _BLOCK_COLS)
                    tile = self._similarities(
                        xa, xbt[:, c0:c1], sqa, None if sqb is None else sqb[c0:c1], scratch=True
                    )
                    total[k0:k1] += tile.sum(dim=1, dtype=torch.float64)

            count = int(cands.numel())
            starts = list(range(0, count, _BLOCK_ROWS))
            return _in_threads(self.threads, starts, work, count, pairs=count * int(rows.numel()))

        cands = torch.arange(n)
        # a shortlist of at most n / 16 candidates, so that the guess stays a small part of the pass
        shortlist = min(_GUESS_SHORTLIST, max(_GUESS_FINAL, n // 16))
        for size, keep in ((_GUESS_SAMPLE, shortlist), (16 * _GUESS_SAMPLE, _GUESS_FINAL)):
            estimate = sums_over(cands, sample(size))
            best = torch.argsort(estimate, descending=True, stable=True)[:keep]
            cands = cands.index_select(0, best)
        cands = torch.sort(cands).values  # argmax below: ties to the lowest row
        return int(cands[int(torch.argmax(sums_over(cands, torch.arange(n))))])

    def update_sums(
        self,
        rows: torch.Tensor,
        old: torch.Tensor,
        span: torch.Tensor,
        threshold: torch.Tensor | None,
        col: torch.Tensor,
        subtract_from: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sum_i min(max(0, s(i, c) - old_i), span_i)`` over ``rows`` for every column ``c`` (float64).

        Only pairs with ``s(c, j) > threshold_i`` (``col = s(., j)``) are computed, the others
        count 0; ``threshold=None`` computes every pair. Rows are sorted by threshold and
        processed in blocks, each against the candidates above its smallest threshold: a prefix
        of the candidates sorted by ``s(c, j)``. Blocks are cache-sized (:meth:`blocked`).

        With ``subtract_from`` (float64, length n), the sums are subtracted from it in place
        (touching only the candidates computed) and it is returned.
        """
        n = self.n
        m = int(rows.numel())
        if threshold is None:
            order = None
            widths = [n] * ((m + _UPDATE_ROWS - 1) // _UPDATE_ROWS)
        elif m <= _UPDATE_ROWS:  # one block: every candidate above the smallest threshold, in any order
            order = (col > threshold.min()).nonzero().squeeze(1)
            widths = [int(order.numel())]
        else:
            above = (col > threshold.min()).nonzero().squeeze(1)
            order = above[torch.argsort(col.index_select(0, above), descending=True, stable=True)]
            by_thr = torch.argsort(threshold, descending=True)
            rows, old, span, threshold = rows[by_thr], old[by_thr], span[by_thr], threshold[by_thr]
            lows = threshold[[min(m, r0 + _UPDATE_ROWS) - 1 for r0 in range(0, m, _UPDATE_ROWS)]]
            # candidates with s(c, j) > low: a prefix of the descending order
            widths = torch.searchsorted(-col.index_select(0, order), -lows.to(col.dtype)).tolist()
        width = max(widths) if widths else 0
        if width == 0:
            return torch.zeros(n, dtype=torch.float64) if subtract_from is None else subtract_from
        cols = None if order is None else order[:width]
        xa = self.x.index_select(0, rows)
        sqa = None if self.sq is None else self.sq.index_select(0, rows)
        xbt = self.xt if cols is None else self.xt.index_select(1, cols)
        sqb = self.sq if self.sq is None or cols is None else self.sq.index_select(0, cols)
        # each row's own position among the candidates: s(i, i) = 1 exactly there
        if order is None:
            own = rows
        else:  # position of every candidate in the order (n elsewhere), reset after use
            if self._position is None:
                self._position = torch.full((n,), n, dtype=torch.int64)
            self._position.index_copy_(0, order, torch.arange(int(order.numel())))
            own = self._position.index_select(0, rows)
            self._position.index_fill_(0, order, n)

        if self.native is not None:
            assert sqa is not None and sqb is not None
            lib, q = self.native, self.needs_rounding
            lows, highs = old.contiguous(), (old + span).contiguous()  # new_i, exact

            def work_native(block: int, total: torch.Tensor) -> None:
                r0 = block * _UPDATE_ROWS
                r1 = min(m, r0 + _UPDATE_ROWS)
                w = widths[block]
                lib.clamped_sums(
                    xa[r0:r1],
                    sqa[r0:r1],
                    lows[r0:r1],
                    highs[r0:r1],
                    own[r0:r1],
                    xbt[:, :w],
                    sqb[:w],
                    q,
                    total,
                )

        def work(block: int, total: torch.Tensor) -> None:
            r0 = block * _UPDATE_ROWS
            r1 = min(m, r0 + _UPDATE_ROWS)
            w = widths[block]
            fixes: dict[int, list[tuple[int, int]]] = {}
            for r, c in enumerate(own[r0:r1].tolist()):
                if c < w:
                    fixes.setdefault(c // _UPDATE_COLS, []).append((r, c % _UPDATE_COLS))
            lo = old[r0:r1, None]
            hi = (old[r0:r1] + span[r0:r1])[:, None]  # new_i, exact
            for c0 in range(0, w, _UPDATE_COLS):
                c1 = min(w, c0 + _UPDATE_COLS)
                tile = self._similarities(
                    xa[r0:r1],
                    xbt[:, c0:c1],
                    None if sqa is None else sqa[r0:r1],
                    None if sqb is None else sqb[c0:c1],
                    scratch=True,
                )
                fix = fixes.get(c0 // _UPDATE_COLS)
                if fix is not None:
                    rr, cc = zip(*fix)
                    tile[list(rr), list(cc)] = 1.0
                # clamp(s, old_i, new_i): the gain change plus old_i, subtracted below (one tensor
                # call fewer per block than the gain change itself)
                torch.maximum(tile, lo, out=tile)
                total[c0:c1] += torch.minimum(tile, hi, out=tile).sum(dim=0, dtype=torch.float64)

        part = _in_threads(
            self.threads,
            [b for b, w in enumerate(widths) if w > 0],
            work if self.native is None else work_native,
            width,
            pairs=m * width,
        )
        # column c got old_i from every row of the blocks whose width exceeds c
        block_old = torch.zeros(len(widths), dtype=torch.float64)
        block_old.index_add_(0, torch.arange(m) // _UPDATE_ROWS, old.to(torch.float64))
        at_width = torch.zeros(width + 1, dtype=torch.float64).index_add_(0, torch.tensor(widths), block_old)
        part -= at_width.flip(0).cumsum(0).flip(0)[1:]
        if subtract_from is not None:
            if cols is None:
                return subtract_from.sub_(part)
            return subtract_from.index_add_(0, cols, part, alpha=-1.0)
        if cols is None:
            return part
        return torch.zeros(n, dtype=torch.float64).index_copy_(0, cols, part)

    def exact_gains(self, cur: torch.Tensor) -> torch.Tensor:
        """gain(c) = sum_i max(0, s(i, c) - cur_i) for every c, exactly (float64)."""
        return self.column_sums(lower=cur) - cur.sum(dtype=torch.float64)


_SCRATCH = threading.local()


def _scratch(slot: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous buffer of ``shape`` for this thread, reused across blocks (``slot`` tells apart
    buffers used at the same time). Blocks are a megabyte: fresh allocations of that size are
    page-faulted in every time, which doubles the time of a block's matrix product."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    numel = shape[0] * shape[1]
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(slot, dtype)] = torch.empty(max(numel, _BLOCK_ROWS * _BLOCK_COLS), dtype=dtype)
    return buf[:numel].view(shape)


def _in_threads(
    threads: int, items: list[int], work: Callable[[int, torch.Tensor], None], size: int, pairs: int
) -> torch.Tensor:
    """Runs ``work(item, total)`` for every item on ``threads`` threads, in order of ``items``.

    A pass over fewer than ``_THREADED_PAIRS`` similarities (``pairs``) runs on the calling
    thread alone: starting threads would cost more than they save.

    Each thread adds into its own float64 ``total`` of length ``size`` (zeros at first); the
    sum of them is returned. The items are taken from a shared queue, so a thread that finishes
    early takes the next one. Sums of multiples of ``2**-24`` below ``2**29`` are exact in
    float64, so the result does not depend on which thread did which item.
    """
    if threads <= 1 or len(items) < 2 or pairs < _THREADED_PAIRS:
        total = torch.zeros(size, dtype=torch.float64)
        for item in items:
            work(item, total)
        return total
    queue = iter(items)
    lock = threading.Lock()
    totals: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def run() -> None:
        total = torch.zeros(size, dtype=torch.float64)
        totals.append(total)
        try:
            while not errors:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                work(item, total)
        except BaseException as exc:  # re-raised by the calling thread
            errors.append(exc)

    pool = [threading.Thread(target=run, daemon=True) for _ in range(min(threads, len(items)))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return torch.stack(totals).sum(dim=0)


_POOL: list[tuple[int, concurrent.futures.ThreadPoolExecutor]] = []  # (workers, pool)
_POOL_LOCK = threading.Lock()


def _on_pool(parts: int, work: Callable[[int], int]) -> list[int]:
    """``[work(p) for p in range(parts)]``, part 0 on the calling thread and the others on a pool of
    threads kept for the process (a greedy step's column is too short a task to start threads for).
    """
    if parts <= 1:
        return [work(0)]
    with _POOL_LOCK:
        if not _POOL or _POOL[0][0] < parts - 1:
            workers = parts - 1
            if _POOL:
                _POOL[0][1].shutdown(wait=False)
            _POOL[:] = [
                (workers, concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="hf_epic"))
            ]
        pool = _POOL[0][1]
    futures = [pool.submit(work, p) for p in range(1, parts)]
    first = work(0)
    return [first] + [f.result() for f in futures]


def similarity_kernel(embeddings: torch.Tensor | np.ndarray, metric: str = "euclidean") -> torch.Tensor:
    """The dense float32 similarity matrix :func:`find_isolated` uses for one class.

    Meant for inspection and tests on small inputs (it allocates ``4 n^2`` bytes).

    Args:
        embeddings: Rows x D embeddings of one class.
        metric: A registered kernel (:func:`available_kernels`), e.g. ``"euclidean"``
            (``exp(-||a - b|| / D)``) or ``"cosine"``.
    """
    emb = _as_tensor(embeddings, "embeddings")
    get_kernel(metric)  # raises on an unknown name
    n = int(emb.shape[0])
    return _Kernel(emb, metric, budget_bytes=8 * n * n + (1 << 24)).matrix


def _isolation_scores(kernel: _Kernel, rows: torch.Tensor) -> torch.Tensor:
    """``1 - max(0, max_{j != i} s(i, j))`` for the class positions ``rows`` (float64, 1 for a one-row class).

    Touches ``len(rows) x n`` similarities, in tiles that fit the kernel's budget (rows of the dense
    kernel where it is held, recomputed from the embeddings otherwise); never ``n x n``.
    """
    out = torch.ones(int(rows.numel()), dtype=torch.float64, device=kernel.device)
    if kernel.n < 2 or rows.numel() == 0:
        return out.cpu()
    for k0, k1, tile in kernel.row_chunks(rows):  # fresh tensors (gathered or recomputed rows)
        idx = torch.arange(k1 - k0, device=kernel.device)
        tile[idx, rows[k0:k1]] = -math.inf  # not the row itself
        best = tile.max(dim=1).values.clamp_min_(0.0).to(torch.float64)
        out[k0:k1] = 1.0 - best
    return out.cpu()


# --------------------------------------------------------------------------- greedy


def _greedy_naive(kernel: _Kernel, budget: int) -> list[int]:
    """Plain greedy: every gain recomputed at every step (O(K n^2))."""
    n = kernel.n
    cur = torch.zeros(n, dtype=torch.float32, device=kernel.device)
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    order: list[int] = []
    for _ in range(budget):
        gains = kernel.exact_gains(cur).masked_fill_(taken, -math.inf)
        j = int(torch.argmax(gains))
        order.append(j)
        taken[j] = True
        torch.maximum(cur, kernel.column(j), out=cur)
    return order


def _gain_change_(s: torch.Tensor, old: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``min(max(0, s - old), span)`` in place on ``s`` (returned): how much a row whose best
    similarity rises from ``old`` by ``span`` lowers each candidate's gain. Equals
    ``clamp(s, old, old + span) - old`` exactly, about 5x faster than a three-tensor clamp."""
    s.sub_(old).clamp_min_(0.0)
    return torch.minimum(s, span, out=s)


def _exact_runs(span: torch.Tensor, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive runs ``[k0, k1)`` of the changed rows, at most ``max_rows`` each, whose float32
    column sums are exact.

    A changed row contributes ``min(max(0, s - old), new - old)`` to each column: a multiple
    of ``2**-24`` in ``[0, span]``. Where a run's spans sum below 1 (exactly, in float64), so does
    every partial sum of a column, which float32 therefore holds exactly; a single row is exact
    on its own.
    """
    m = int(span.numel())
    if m == 0:
        return []
    ends = torch.cumsum(span.to(torch.float64), dim=0).cpu().numpy()
    runs = []
    start, base = 0, 0.0
    while start < m:
        stop = int(np.searchsorted(ends, base + _FLOAT32_EXACT_SPAN, side="left"))
        stop = min(max(stop, start + 1), start + max_rows, m)
        runs.append((start, stop))
        base, start = float(ends[stop - 1]), stop
    return runs


def _update_gains(
    kernel: _Kernel,
    gains: torch.Tensor,
    rows: torch.Tensor,
    old: torch.Tensor,
    new: torch.Tensor,
    col: torch.Tensor,
) -> None:
    """Subtracts ``sum_i clamp(s(i, c), old_i, new_i) - old_i`` over ``rows`` from every gain.

    For the euclidean kernel a row only changes candidates with ``s(i, c) > old_i``, and
    those have ``s(c, j) > old_i * new_i`` (triangle inequality, ``col = s(., j)``): each row
    touches a prefix of the candidates sorted by ``s(c, j)``. Rows are grouped by that prefix
    length and each group is processed against its longest prefix only: in blocks of 64 rows
    without a dense kernel on the CPU (:meth:`_Kernel.update_sums`), in four groups otherwise.

    Args:
        kernel: The class's kernel.
        gains: Gains (float64), updated in place.
        rows: Row positions whose best similarity rose (int64).
        old: Their previous best similarity.
        new: Their new best similarity ``s(i, j)``.
        col: ``s(., j)`` for the new medoid ``j``.

    With a dense kernel, rows are summed in runs whose float32 column sums are exact
    (:func:`_exact_runs`); the blocks of :meth:`_Kernel.update_sums` sum in float64.
    """
    n = kernel.n
    m = int(rows.numel())
    span = new - old  # exact: multiples of 2**-24 in [0, 1]
    sim = kernel.sim
    thr = None
    if isinstance(sim, DistanceKernel):
        thr = sim.pair_threshold(old, new, kernel.dim) * (1.0 - _PRUNE_MARGIN)
    if kernel.blocked():
        kernel.update_sums(rows, old, span, thr, col, subtract_from=gains)
        return
    pieces: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)]
    if thr is not None and m * n > _SMALL_BLOCK:
        groups = 4 if m * n > 8 * _SMALL_BLOCK and m >= 16 else 1
        if groups > 1:
            thr, by_thr = torch.sort(thr, descending=True)
            bounds = [m * g // groups for g in range(groups + 1)]
            lows = thr[[b - 1 for b in bounds[1:]]].tolist()
        else:
            bounds, lows = [0, m], [float(thr.min())]
        pieces = []
        for g in range(groups):
            sel = by_thr[bounds[g] : bounds[g + 1]] if groups > 1 else None
            cols = (col > lows[g]).nonzero().squeeze(1)
            pieces.append((sel, None if cols.numel() * 2 > n else cols))
    for sel, cols in pieces:
        sub_rows = rows if sel is None else rows[sel]
        sub_old = old if sel is None else old[sel]
        sub_span = span if sel is None else span[sel]
        width = n if cols is None else int(cols.numel())
        delta = None
        for k0, k1 in _exact_runs(sub_span, max(1, _PIECE_ELEMENTS // max(width, 1))):
            piece = kernel.block(sub_rows[k0:k1], cols)
            change = _gain_change_(piece, sub_old[k0:k1, None], sub_span[k0:k1, None])
            part = change.sum(dim=0).to(torch.float64)
            delta = part if delta is None else delta.add_(part)
        assert delta is not None
        if cols is None:
            gains -= delta
        else:
            gains.index_add_(0, cols, delta, alpha=-1.0)


def _greedy_incremental(
    kernel: _Kernel,
    budget: int,
    generator: torch.Generator | None = None,
    sample_size: int = 0,
) -> tuple[list[int], torch.Tensor]:
    """Exact greedy with incrementally updated gains (stochastic when ``generator`` is given).

    Exact greedy on a dense CPU kernel takes :class:`_DenseSteps` instead (same arithmetic).
    Returns the medoids in greedy order and, for every row, the position (within the class)
    of the first-selected medoid with the largest similarity (-1 where every similarity is
    <= 0, possible only for the cosine metric).
    """
    n = kernel.n
    dev = kernel.device
    matrix = kernel.matrix
    # F(S) clips at 0: cur starts at 0, so a candidate's first gain is its column sum of max(0, s)
    cur = torch.zeros(n, dtype=torch.float32, device=dev)
    # (likely first medoid j, sum_i min(s(i, c), s(i, j)) for every c): its update, if it is chosen
    first: tuple[int, torch.Tensor] | None = None
    if generator is None and budget > 1 and kernel.blocked() and kernel.sim.nonnegative:
        # the first gains and the update for the likely first medoid in one pass over every pair
        # (the update's pass is run again if another medoid comes first)
        likely = kernel.likely_first_medoid()
        sums = kernel.symmetric_sums([(None, None), (None, kernel.column(likely).clone())])
        gains, first = sums[0], (likely, sums[1])
    else:
        gains = kernel.column_sums(lower=None if kernel.sim.nonnegative else cur)
    assign = torch.full((n,), -1, dtype=torch.int64, device=dev)
    sampler = FreeSampler(n, generator) if generator is not None else None
    order: list[int] = []
    for _ in range(budget):
        if sampler is None:
            j = int(torch.argmax(gains))
        else:
            # the sample, in row order so that ties go to the lowest row position
            cand = sampler.sample(sample_size).to(dev)
            j = int(cand[torch.argmax(gains[cand])])
            sampler.remove(j)
        order.append(j)
        gain = float(gains[j])
        gains[j] = -math.inf
        col, upd = kernel.column_changes(j, cur)
        m = upd.numel()
        if m == 0:
            continue
        # index_select / index_copy_ / index_fill_: less overhead than tensor indexing
        old = cur.index_select(0, upd)
        new = col.index_select(0, upd)
        # Every partial column sum is at most sum_i (new_i - old_i) = gain of j; below 1 a
        # float32 sum of these multiples of 2**-24 is exact (otherwise _update_gains sums runs).
        if matrix is not None and m * n <= _SMALL_BLOCK and gain < _FLOAT32_EXACT_SPAN:
            # the common late step: a few rows, full width, float32 sums exact (see above)
            piece = matrix.index_select(0, upd)
            gains -= _gain_change_(piece, old[:, None], (new - old)[:, None]).sum(dim=0)
        elif m == n and len(order) == 1 and kernel.sim.nonnegative:
            # the first medoid changes every row (cur was 0 < s): sum_i min(s(i, c), new_i)
            # over contiguous tiles, without gathering rows
            if first is not None and first[0] == j:
                gains -= first[1]  # computed in the first pass (new is the same column)
            else:
                gains -= kernel.column_sums(upper=new)
            first = None
        else:
            _update_gains(kernel, gains, upd, old, new, col)
        cur.index_copy_(0, upd, new)
        assign.index_fill_(0, upd, j)
    return order, assign


class _DenseSteps:
    """The exact steps of :func:`_greedy_incremental` for a dense kernel on the CPU, resumable.

    Identical arithmetic, but the many small late steps (a few updated rows each) go through
    numpy views of the same buffers: a numpy call costs about a microsecond, a torch call
    several, and a class of 5,000 rows at fraction 0.3 takes 1,500 such steps. Large steps
    still use the torch paths.

    The first steps of a flat kernel (every similarity near 1) update most rows each: a few
    large tensor operations, which release the GIL. The later ones are many small calls, which
    hold it. ``advance(heavy_only=True)`` runs steps until the next one would update fewer
    than ``_HEAVY_STEP / n`` rows, so that the scheduler can run the large steps on the
    thread that built the kernel while another thread runs the small steps of another class.
    """

    def __init__(self, kernel: _Kernel, budget: int) -> None:
        assert kernel.matrix is not None and kernel.device.type == "cpu"
        n = kernel.n
        self.kernel = kernel
        self.budget = budget
        # F(S) clips at 0: cur starts at 0, so a candidate's first gain is its column sum of max(0, s)
        self.cur = torch.zeros(n, dtype=torch.float32)
        self.gains = kernel.column_sums(lower=None if kernel.sim.nonnegative else self.cur)
        self.assign = torch.full((n,), -1, dtype=torch.int64)
        self.order: list[int] = []

    def advance(self, heavy_only: bool = False) -> None:
        """Runs the remaining steps (with ``heavy_only``, only the large ones in front)."""
        kernel = self.kernel
        n = kernel.n
        matrix = kernel.matrix
        assert matrix is not None
        gains, order = self.gains, self.order
        g, c, a, s = gains.numpy(), self.cur.numpy(), self.assign.numpy(), matrix.numpy()
        while len(order) < self.budget:
            j = int(g.argmax())  # first maximum: ties to the lowest row, as torch.argmax
            col = s[j]  # the kernel is exactly symmetric: row j is s(., j)
            upd = np.flatnonzero(col > c)
            m = int(upd.size)
            if heavy_only and m * n < _HEAVY_STEP:
                return
            order.append(j)
            gain = float(g[j])
            g[j] = -math.inf
            if m == 0:
                continue
            old = c[upd]
            new = col[upd]
            if m * n <= _SMALL_BLOCK and gain < _FLOAT32_EXACT_SPAN:
                # float32 sums are exact here (see _greedy_incremental)
                piece = s[upd]
                piece -= old[:, None]
                np.maximum(piece, 0.0, out=piece)
                np.minimum(piece, (new - old)[:, None], out=piece)
                g -= piece.sum(axis=0)
            elif m == n and len(order) == 1 and kernel.sim.nonnegative:
                gains -= kernel.column_sums(upper=torch.from_numpy(new))
            else:
                rows, old_t, new_t = torch.from_numpy(upd), torch.from_numpy(old), torch.from_numpy(new)
                _update_gains(kernel, gains, rows, old_t, new_t, matrix[j])
            c[upd] = new
            a[upd] = j


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Runs the CPU computation on one intra-op thread, restoring the setting afterwards.

    The selection is a long chain of small tensor operations; torch's thread pool costs more
    than it gains on them, and on a loaded machine its spinning threads slow everything
    down by an order of magnitude (measured here: 0.15 s vs 1-5 s for one class's kernel).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _select_class(
    kernel: _Kernel,
    fraction: float,
    greedy: str,
    generator: torch.Generator,
    epsilon: float,
    budget_bytes: int,
    steps: _DenseSteps | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy facility location on one class's kernel; returns (medoids, assignment) as class positions.

    ``steps``: exact greedy already started on this kernel (:func:`_start_class`), resumed here.
    """
    n = kernel.n
    cpu = kernel.device.type == "cpu"
    budget = class_budget(fraction, n)
    # stochastic greedy on a large class without a dense kernel, on the CPU: prune with cells
    # (hf_epic.cells); below _CELLS_MIN_ROWS, and for exact greedy at any size, the tiled
    # incremental path is faster (measured: 0.9 vs 1.6 s at 8,000 rows; exact greedy at 20,000
    # rows on one thread 4.5 s against 16.5 s for lazy greedy on the cells)
    cells = kernel.sim.distance_based and kernel.matrix is None and cpu and n >= _CELLS_MIN_ROWS
    if greedy != "stochastic" and kernel.matrix is None and cpu and n >= _SLOW_EXACT_ROWS:
        logger.warning(
            "A class of %d rows does not fit memory_budget_mb as a dense kernel: exact greedy recomputes "
            "O(n^2) similarities on the CPU, which takes minutes (under two at 200,000 rows on two "
            "cores with the C kernels). greedy='stochastic' takes about a minute at that size; a GPU or a larger "
            "memory_budget_mb also helps.",
            n,
        )
    if greedy == "naive":
        order = _greedy_naive(kernel, budget)
        assign = None
    elif greedy == "stochastic":
        size = min(n, max(1, math.ceil(n / budget * math.log(1.0 / epsilon))))
        if cells:
            order, assign = greedy_stochastic_cells(kernel, budget, size, generator, budget_bytes)
        else:
            order, assign = _greedy_incremental(kernel, budget, generator=generator, sample_size=size)
    else:
        # exact greedy: on a dense CPU kernel the resumable numpy steps (usually started by the
        # thread that built the kernel), elsewhere the torch steps
        steps = steps if steps is not None else _start_class(kernel, fraction, greedy)
        if steps is not None:
            steps.advance()
            order, assign = steps.order, steps.assign
        else:
            order, assign = _greedy_incremental(kernel, budget)
    medoids = torch.tensor(order, dtype=torch.int64, device=kernel.device)
    if assign is None:
        assign = torch.full((n,), -1, dtype=torch.int64, device=kernel.device)
        missing = torch.arange(n, device=kernel.device)
    else:
        missing = (assign < 0).nonzero().squeeze(1)
    for start in range(0, int(missing.numel()), kernel.tile_rows):
        rows = missing[start : start + kernel.tile_rows]
        sims = kernel.block(rows, medoids)
        assign[rows] = medoids[torch.argmax(sims, dim=1)]
    return medoids, assign


def _start_class(kernel: _Kernel, fraction: float, greedy: str) -> _DenseSteps | None:
    """Runs the large first steps of exact greedy on a dense CPU kernel (None on other paths)."""
    if greedy != "lazy" or kernel.matrix is None or kernel.device.type != "cpu":
        return None
    steps = _DenseSteps(kernel, class_budget(fraction, kernel.n))
    steps.advance(heavy_only=True)
    return steps


def _scheduled(
    jobs: list[int],
    build: Any,
    finish: Any,
    workers: int,
) -> dict[int, tuple[torch.Tensor, ...]]:
    """Runs ``finish(k, build(k, workspace))`` for every job on ``workers`` threads.

    ``build`` makes a class's kernel and runs its first, large greedy steps: a few large tensor
    operations, which release the GIL. ``finish`` runs the rest of the greedy: many small
    operations, which hold it most of the time, so two of them at once only fight over it. Each
    thread therefore takes the ``finish`` of a built class when no other thread is running one,
    and otherwise builds the next class if one of the ``workers`` workspaces is free: the small
    steps run back to back on some thread while the classes are built on the others (with wide
    embeddings, where building dominates, several at a time). At most ``workers`` kernels exist
    at once, as with one class per thread.
    """
    lock = threading.Condition()
    free = [[] for _ in range(workers)]  # workspaces (reused buffers for the dense kernel)
    built: list[tuple[int, Any, list[torch.Tensor]]] = []  # (job, what build returned, workspace)
    state = {"next": 0, "greedy": False, "error": None}
    done: dict[int, tuple[torch.Tensor, ...]] = {}

    def worker() -> None:
        while True:
            with lock:
                while True:
                    if state["error"] is not None or len(done) == len(jobs):
                        return
                    if built and not state["greedy"]:
                        k, prepared, workspace = built.pop(0)
                        state["greedy"] = True
                        action = "greedy"
                        break
                    if state["next"] < len(jobs) and free:
                        k = jobs[state["next"]]
                        state["next"] += 1
                        workspace = free.pop()
                        action = "build"
                        break
                    lock.wait()
            try:
                if action == "build":
                    prepared = build(k, workspace)
                    with lock:
                        built.append((k, prepared, workspace))
                        lock.notify_all()
                else:
                    result = finish(k, prepared)
                    del prepared
                    with lock:
                        done[k] = result
                        free.append(workspace)
                        state["greedy"] = False
                        lock.notify_all()
            except BaseException as exc:  # re-raised by the calling thread
                with lock:
                    state["error"] = exc
                    lock.notify_all()
                return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if state["error"] is not None:
        raise state["error"]
    return done


def find_isolated(
    embeddings: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    fraction: float,
    *,
    metric: str = "euclidean",
    greedy: str = "lazy",
    cluster_threshold: int = 1,
    seed: int = 0,
    epsilon: float = 0.01,
    memory_budget_mb: float = 1024,
    classes: Sequence[int] | None = None,
    isolation_scores: bool = False,
) -> SelectionResult:
    """Finds EPIC's isolated points: rows in small clusters of per-class facility location.

    Per class ``c`` it selects ``ceil(fraction * n_c)`` medoids by greedy facility location
    on the similarity ``exp(-||g_i - g_j|| / D)`` (or cosine), assigns every row to its most
    similar medoid, and drops the rows of clusters with at most ``cluster_threshold`` rows.
    See the module docstring for the exact definitions. The computation runs on the device
    of ``embeddings``; the result is on the CPU.

    Args:
        embeddings: ``(N, D)`` float tensor (CPU or CUDA) or numpy array, e.g. the gradient
            embeddings ``softmax(z) - onehot(y)``.
        labels: ``(N,)`` integer class ids (any values, e.g. ``{3, 7, 100}``).
        fraction: Share of each class selected as medoids, in (0, 1].
        metric: A registered kernel's name (:func:`available_kernels`): ``"euclidean"`` (the
            EPIC reference's kernel) or ``"cosine"`` built in.
        greedy: ``"lazy"`` (exact greedy, fast), ``"naive"`` (exact greedy by definition,
            ``O(K n^2)``, for testing) or ``"stochastic"`` (seeded stochastic greedy).
        cluster_threshold: Rows in clusters of at most this many rows are dropped.
        seed: Seed of the stochastic greedy's sampling (ignored otherwise).
        epsilon: Stochastic greedy's accuracy; each step samples
            ``ceil((n_c / K_c) log(1 / epsilon))`` candidates.
        memory_budget_mb: The largest similarity matrix (plus tiles) held in memory, in MiB;
            bigger classes are processed in tiles without materialising it.
        classes: Select only these labels (None: every class). Rows of other classes get
            assignment -1 and are neither dropped nor kept; each selected class gets the same
            medoids, assignment and seed as in a call over every class, so the results of
            disjoint ``classes`` covering every label, combined by :func:`merge_results`, equal
            that call's (see :func:`partition_classes` to split the classes among processes).
        isolation_scores: Also score every dropped row by ``1 - max(0, max_{j != i} s(i, j))`` over
            the other rows ``j`` of its class (``SelectionResult.isolation_scores``); costs
            ``len(dropped) x n_c`` similarity evaluations per class, in tiles.

    Returns:
        A :class:`SelectionResult`.

    Raises:
        ValueError: On NaN/inf embeddings, mismatched shapes, an empty input, non-integer
            labels, a fraction outside (0, 1], an unknown metric/greedy, a negative threshold,
            ``classes`` naming a label that does not occur.
        TypeError: If the inputs are neither torch tensors nor numpy arrays.
    """
    if isinstance(fraction, (int, float)) and fraction >= 1 and cluster_threshold >= 1:
        warnings.warn(
            f"find_isolated(fraction={fraction}) makes every row its own medoid, so every row is isolated and "
            "dropped; use a fraction below 1 (EPIC uses 0.1-0.3).",
            UserWarning,
            stacklevel=2,
        )
    start = time.perf_counter()
    device = embeddings.device if isinstance(embeddings, torch.Tensor) else torch.device("cpu")
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    with _one_thread(device):
        result = _find_isolated(
            embeddings,
            labels,
            fraction,
            metric,
            greedy,
            cluster_threshold,
            seed,
            epsilon,
            memory_budget_mb,
            workers=workers,
            only=classes,
            scores=isolation_scores,
        )
    result.seconds = time.perf_counter() - start
    return result


def _find_isolated(
    embeddings: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    fraction: float,
    metric: str,
    greedy: str,
    cluster_threshold: int,
    seed: int,
    epsilon: float,
    memory_budget_mb: float,
    workers: int = 1,
    only: Sequence[int] | None = None,
    scores: bool = False,
) -> SelectionResult:
    """:func:`find_isolated` without the thread setting and timing (same arguments).

    ``workers`` classes are processed concurrently; ``only`` is ``classes``; ``scores`` is
    ``isolation_scores``.
    """
    emb, lab = _check_inputs(
        embeddings, labels, fraction, metric, greedy, cluster_threshold, seed, epsilon, memory_budget_mb
    )
    n = int(emb.shape[0])
    dev = emb.device
    budget_bytes = int(float(memory_budget_mb) * (1 << 20))
    classes, inverse = torch.unique(lab, sorted=True, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=int(classes.numel())).tolist()
    label_list = [int(v) for v in classes.tolist()]
    chosen = _chosen_classes(only, label_list)

    assignment = torch.full((n,), -1, dtype=torch.int64, device=dev)
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)
    # Classes are independent; on a CPU with several threads they run concurrently (each on
    # one intra-op thread) if the largest class's dense kernel fits the budget's share.
    # Otherwise one class at a time, its large tiled passes shared by the threads.
    threads = workers
    workers = max(1, min(workers, len(chosen)))
    if (
        workers > 1
        and not _tile_plan(max(counts[k] for k in chosen), budget_bytes // workers, concurrent=True)[1]
    ):
        workers = 1
    share = budget_bytes // workers

    def build(k: int, workspace: list[torch.Tensor]) -> tuple[_Kernel, _DenseSteps | None]:
        rows = order[starts[k] : starts[k] + counts[k]]
        kernel = _Kernel(
            emb[rows],
            metric,
            share,
            workspace,
            threads=threads if workers == 1 else 1,
            concurrent=workers > 1,
        )
        return kernel, _start_class(kernel, float(fraction), greedy)

    def finish(k: int, built: tuple[_Kernel, _DenseSteps | None]) -> tuple[torch.Tensor, ...]:
        rows = order[starts[k] : starts[k] + counts[k]]
        generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + k) % (1 << 63))
        kernel, steps = built
        med, assign = _select_class(kernel, float(fraction), greedy, generator, epsilon, share, steps)
        if not scores:
            return rows[med], rows[assign]
        sizes = torch.bincount(assign, minlength=kernel.n)
        isolated = (sizes[assign] <= int(cluster_threshold)).nonzero().squeeze(1)
        return rows[med], rows[assign], rows[isolated].cpu(), _isolation_scores(kernel, isolated)

    by_size = sorted(chosen, key=lambda k: -counts[k])  # largest first
    if workers > 1:
        done = _scheduled(by_size, build, finish, workers)
    else:
        workspace: list[torch.Tensor] = []  # the dense kernel's memory, reused class after class
        done = {k: finish(k, build(k, workspace)) for k in by_size}
    all_medoids: list[torch.Tensor] = []
    per_class: dict[int, dict[str, int]] = {}
    score_by_row = torch.full((n,), math.nan, dtype=torch.float64) if scores else None
    for k in sorted(chosen):
        label = label_list[k]
        med, assign = done[k][:2]
        if score_by_row is not None:
            score_by_row[done[k][2]] = done[k][3]
        assignment[order[starts[k] : starts[k] + counts[k]]] = assign
        all_medoids.append(med)
        per_class[int(label)] = {"n": counts[k], "budget": int(med.numel()), "num_dropped": 0}

    medoids = torch.cat(all_medoids).cpu() if all_medoids else torch.zeros(0, dtype=torch.int64)
    assignment = assignment.cpu()
    selected = assignment >= 0
    # cluster size of every row position that is a medoid
    sizes_by_row = torch.bincount(assignment[selected], minlength=n)
    cluster_sizes = sizes_by_row[medoids]
    dropped_mask = selected & (sizes_by_row[assignment.clamp_min(0)] <= int(cluster_threshold))
    dropped = dropped_mask.nonzero().squeeze(1)
    kept = (selected & ~dropped_mask).nonzero().squeeze(1)
    lab_cpu = lab.cpu()
    if dropped.numel():
        dl, dc = torch.unique(lab_cpu[dropped], return_counts=True)
        for label, cnt in zip(dl.tolist(), dc.tolist()):
            per_class[int(label)]["num_dropped"] = int(cnt)
    return SelectionResult(
        medoids=medoids,
        assignment=assignment,
        cluster_sizes=cluster_sizes,
        dropped=dropped,
        kept=kept,
        per_class=per_class,
        isolation_scores=None if score_by_row is None else score_by_row[dropped],
    )


# --------------------------------------------------------------------------- several processes


def _chosen_classes(only: Sequence[int] | None, labels: list[int]) -> list[int]:
    """Indices (into the sorted distinct ``labels``) of the classes to select."""
    if only is None:
        return list(range(len(labels)))
    if isinstance(only, (str, bytes)) or not isinstance(only, (Sequence, torch.Tensor, np.ndarray)):
        raise ValueError(f"classes must be a sequence of labels or None, got {only!r}.")
    wanted = [int(v) for v in (only.tolist() if isinstance(only, (torch.Tensor, np.ndarray)) else only)]
    position = {label: k for k, label in enumerate(labels)}
    missing = sorted({v for v in wanted if v not in position})
    if missing:
        raise ValueError(
            f"classes contains label(s) {missing} that no row has; pass labels that occur in labels "
            "(e.g. from partition_classes(labels, world_size))."
        )
    return sorted({position[v] for v in wanted})


def partition_classes(labels: torch.Tensor | np.ndarray, world_size: int) -> list[list[int]]:
    """Splits the classes of ``labels`` among ``world_size`` processes, balanced by rows.

    Longest processing time first: classes by decreasing row count (ties: lower label first)
    go one by one to the process with the fewest rows so far (ties: the lowest rank). The
    result depends only on the labels, so every process computes the same partition. The
    largest share is at most 4/3 of the best possible one (Graham, 1969); a class is never split.

    Args:
        labels: ``(N,)`` integer class ids, as passed to :func:`find_isolated`.
        world_size: Number of processes (>= 1).

    Returns:
        For every rank, the sorted labels it selects (empty when there are fewer classes than
        processes); pass ``classes=partition[rank]`` to :func:`find_isolated`.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}.")
    lab = _as_tensor(labels, "labels")
    if lab.dim() != 1 or lab.dtype == torch.bool or lab.is_floating_point() or lab.is_complex():
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {tuple(lab.shape)} and dtype {lab.dtype}."
        )
    values, counts = torch.unique(lab.cpu(), sorted=True, return_counts=True)
    loads = [0] * int(world_size)
    shares: list[list[int]] = [[] for _ in range(int(world_size))]
    for label, count in sorted(zip(values.tolist(), counts.tolist()), key=lambda lc: (-lc[1], lc[0])):
        rank = min(range(len(loads)), key=lambda r: (loads[r], r))
        loads[rank] += int(count)
        shares[rank].append(int(label))
    return [sorted(share) for share in shares]


def merge_results(results: Sequence[SelectionResult]) -> SelectionResult:
    """Combines the results of :func:`find_isolated` on disjoint ``classes`` into one.

    With the same embeddings, labels and settings on every process and ``classes`` from
    :func:`partition_classes`, the merged result equals that of one call over every class
    (medoids class by class in sorted label order, assignment, cluster sizes, dropped and
    kept rows, per-class counts, isolation scores where every part has them); ``seconds`` is the longest of the parts (they run side by side).

    Args:
        results: One result per process (e.g. gathered with
            ``torch.distributed.all_gather_object``), in any order.

    Raises:
        ValueError: If two results selected the same class, if they disagree on the number of
            rows, or if some row belongs to no result's classes.
    """
    if not results:
        raise ValueError("merge_results needs at least one SelectionResult.")
    n = int(results[0].assignment.numel())
    assignment = torch.full((n,), -1, dtype=torch.int64)
    per_class: dict[int, dict[str, int]] = {}
    pieces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    dropped, kept = [], []
    scored = all(res.isolation_scores is not None for res in results)
    score_by_row = torch.full((n,), math.nan, dtype=torch.float64) if scored else None
    for res in results:
        if int(res.assignment.numel()) != n:
            raise ValueError(
                f"results cover different numbers of rows ({n} and {int(res.assignment.numel())}); "
                "every process must select on the same embeddings and labels."
            )
        start = 0
        for label in sorted(res.per_class):
            if label in per_class:
                raise ValueError(f"class {label} was selected by two results; pass disjoint classes.")
            info = res.per_class[label]
            per_class[label] = dict(info)
            end = start + int(info["budget"])
            pieces[label] = (res.medoids[start:end], res.cluster_sizes[start:end])
            start = end
        mine = res.assignment >= 0
        assignment[mine] = res.assignment[mine]
        dropped.append(res.dropped)
        kept.append(res.kept)
        if score_by_row is not None and res.isolation_scores is not None:
            score_by_row[res.dropped] = res.isolation_scores.to(torch.float64)
    if bool((assignment < 0).any()):
        raise ValueError(
            f"{int((assignment < 0).sum())} row(s) belong to classes that no result selected; "
            "merge the results of every process (their classes must cover every label)."
        )
    labels = sorted(pieces)
    all_dropped = torch.sort(torch.cat(dropped)).values
    return SelectionResult(
        medoids=torch.cat([pieces[label][0] for label in labels]),
        assignment=assignment,
        cluster_sizes=torch.cat([pieces[label][1] for label in labels]),
        dropped=all_dropped,
        kept=torch.sort(torch.cat(kept)).values,
        per_class={label: per_class[label] for label in labels},
        seconds=max(float(res.seconds) for res in results),
        isolation_scores=None if score_by_row is None else score_by_row[all_dropped],
    )
