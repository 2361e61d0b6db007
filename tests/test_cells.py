"""Tests of the cell-pruned greedy for classes too large for a dense kernel (hf_epic.cells).

The pruning must never change a result: every gain equals the brute-force gain of the dense
kernel, and stochastic greedy on cells picks the dense path's stochastic medoids for the same
seed. CPU only, seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_epic import selection
from hf_epic.cells import Cells, FreeSampler, _kd_cells
from hf_epic.selection import _Kernel, find_isolated

# forces the cells path: 0.05 MiB cannot hold the dense kernel of these classes
TINY_BUDGET_MB = 0.05


def _gradient_like(n: int, classes: int, seed: int, isolated: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(z) - onehot(y) around a few modes per class, plus ``isolated`` random rows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    modes = torch.randn(classes, 4, classes, generator=g) * 1.5
    which = torch.randint(0, 4, (n,), generator=g)
    logits = modes[labels, which] + 0.15 * torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 4.0
    logits[:isolated] = 3.0 * torch.randn(isolated, classes, generator=g)
    emb = torch.softmax(logits, 1)
    emb[torch.arange(n), labels] -= 1.0
    return emb, labels


def _brute_gains(kernel: _Kernel, cur: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    s = kernel.matrix[:, cands]
    return (s - cur[:, None]).clamp_min(0.0).sum(dim=0, dtype=torch.float64)


@pytest.mark.parametrize("dim", [6, 80])
def test_gains_equal_brute_force_at_every_stage(dim):
    emb, _ = _gradient_like(500, dim, seed=1, isolated=8)
    dense = _Kernel(emb, "euclidean", budget_bytes=1 << 26)
    cells = Cells(_Kernel(emb, "euclidean", budget_bytes=1 << 12), leaf=8)
    cur = torch.zeros(500, dtype=torch.float32)
    cands = torch.arange(0, 500, 7)
    g = torch.Generator().manual_seed(0)
    from_contributors = 0
    for step in range(40):
        got, expect = cells.gains(cands), _brute_gains(dense, cur, cands)
        if dim <= 64:  # float64 distances: bit-identical similarities, so identical sums
            assert torch.equal(got, expect), f"step {step}"
        else:  # float32 distances from differently shaped products may differ in the last bit
            assert torch.allclose(got, expect, rtol=0, atol=500 * 2.0**-22), f"step {step}"
        # a just-evaluated candidate (selected from the rows its evaluation found) or any row
        pick = cands if step % 2 else torch.arange(500)
        j = int(pick[torch.randint(pick.numel(), (1,), generator=g)])
        from_contributors += j in cells.contributors
        cells.select(j)
        torch.maximum(cur, dense.matrix[:, j], out=cur)
    if dim <= 64:  # (at D = 80 every gain of these 500 rows stays on the dense path)
        assert from_contributors >= 5  # selections from the rows an evaluation found were checked
    # the rows' best similarities and medoids match the dense bookkeeping
    assert (cells.assign >= 0).all()
    assert torch.equal(dense.matrix[torch.arange(500), cells.assign], cur)


@pytest.fixture
def cells_for_small_classes(monkeypatch):
    """Routes stochastic greedy through cells for the small classes of these tests."""
    monkeypatch.setattr(selection, "_CELLS_MIN_ROWS", 0)


def test_stochastic_on_cells_equals_dense_stochastic(cells_for_small_classes):
    emb, labels = _gradient_like(600, 3, seed=3, isolated=6)
    emb[50] = emb[51]  # an exact duplicate: ties must break the same way
    for seed in (0, 5):
        dense = find_isolated(emb, labels, 0.2, greedy="stochastic", seed=seed)
        pruned = find_isolated(
            emb, labels, 0.2, greedy="stochastic", seed=seed, memory_budget_mb=TINY_BUDGET_MB
        )
        assert torch.equal(dense.medoids, pruned.medoids)
        assert torch.equal(dense.assignment, pruned.assignment)
    other = find_isolated(emb, labels, 0.2, greedy="stochastic", seed=1, memory_budget_mb=TINY_BUDGET_MB)
    assert not torch.equal(other.medoids, pruned.medoids)


def test_planted_isolated_points_found_on_cells(cells_for_small_classes):
    emb, labels = _gradient_like(900, 2, seed=4, isolated=0)
    far = torch.tensor([[0.9, -0.9], [-0.8, 0.8], [0.7, -0.7]])  # far from every mode
    emb = torch.cat([emb, far])
    labels = torch.cat([labels, torch.tensor([0, 1, 0])])
    res = find_isolated(emb, labels, 0.1, greedy="stochastic", memory_budget_mb=TINY_BUDGET_MB)
    assert {900, 901, 902} <= set(res.dropped.tolist())


def test_kd_cells_partition_rows_and_split_outliers():
    emb, _ = _gradient_like(800, 5, seed=5, isolated=0)
    outliers = torch.eye(5)[:3] * 3.0  # far from everything
    x = torch.cat([emb, outliers]).double()
    cell = _kd_cells(x, leaf=8)
    counts = torch.bincount(cell)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 8
    assert int(counts.sum()) == len(x)
    # with a width limit, the wide cells holding outliers are split down to single rows
    narrow = _kd_cells(x, leaf=8, start=cell, max_width=0.05)
    sizes = torch.bincount(narrow)
    assert all(int(sizes[narrow[i]]) == 1 for i in range(800, 803))
    # each cell's radius (in Cells) covers its rows
    cells = Cells(_Kernel(x, "euclidean", budget_bytes=1 << 12), leaf=8)
    dist = (cells.x.double() - cells.center[cells.cell_of]).norm(dim=1)
    assert bool((dist <= cells.radius[cells.cell_of]).all())


def test_free_sampler_samples_distinct_free_rows_reproducibly():
    def draws(seed: int) -> list[list[int]]:
        sampler = FreeSampler(50, torch.Generator().manual_seed(seed))
        out = []
        for row in (3, 10, 49, 0):
            sample = sampler.sample(12)
            assert sample.numel() == 12 and sample.unique().numel() == 12
            assert torch.equal(sample, sample.sort().values)
            out.append(sample.tolist())
            sampler.remove(row)
        # the removed rows never come back, and a sample larger than what is left is all of it
        rest = sampler.sample(1000).tolist()
        assert rest == sorted(set(range(50)) - {3, 10, 49, 0})
        return out

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    # uniform: over many draws every free row is picked about equally often
    sampler = FreeSampler(20, torch.Generator().manual_seed(0))
    hits = torch.zeros(20)
    for _ in range(2000):
        hits[sampler.sample(5)] += 1
    assert float(hits.min()) > 0.8 * 500 and float(hits.max()) < 1.2 * 500


def test_cells_path_runs_on_a_class_larger_than_the_budget():
    emb, labels = _gradient_like(12_000, 4, seed=6, isolated=120)
    labels = torch.zeros_like(labels)  # one class of 12,000 rows: 576 MB dense, budget 64 MB
    res = find_isolated(emb, labels, 0.1, greedy="stochastic", memory_budget_mb=64)
    assert res.medoids.numel() == math.ceil(0.1 * 12_000)
    found = len(set(res.dropped.tolist()) & set(range(120)))
    assert found >= 90, found


def test_exact_greedy_on_a_huge_class_warns_it_will_be_slow(monkeypatch, caplog):
    monkeypatch.setattr(selection, "_SLOW_EXACT_ROWS", 500)
    emb, labels = _gradient_like(600, 2, seed=7)
    labels = torch.zeros_like(labels)
    with caplog.at_level("WARNING", logger="hf_epic.selection"):
        find_isolated(emb, labels, 0.1, memory_budget_mb=TINY_BUDGET_MB)
    assert "greedy='stochastic'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_epic.selection"):
        find_isolated(emb, labels, 0.1)  # dense kernel: nothing to warn about
        find_isolated(emb, labels, 0.1, greedy="stochastic", memory_budget_mb=TINY_BUDGET_MB)
    assert caplog.text == ""


def test_isolation_scores_on_cells_equal_the_dense_ones(cells_for_small_classes):
    emb, labels = _gradient_like(600, 3, seed=3, isolated=6)
    dense = find_isolated(emb, labels, 0.2, greedy="stochastic", isolation_scores=True)
    pruned = find_isolated(
        emb, labels, 0.2, greedy="stochastic", isolation_scores=True, memory_budget_mb=TINY_BUDGET_MB
    )
    assert torch.equal(dense.dropped, pruned.dropped)
    assert pruned.isolation_scores.tolist() == pytest.approx(dense.isolation_scores.tolist(), abs=1e-6)


def _exact_test(cells: Cells, xc: torch.Tensor, center, reach, radius) -> torch.Tensor:
    """Test (1) in float64 for every candidate against every ball (shrunk by 1e-9 for rounding)."""
    limit = (reach + cells.slack) / (1.0 - 1e-6) + radius
    limit = torch.where(limit > 0, limit * limit, -1.0)
    return torch.cdist(xc, center) ** 2 < limit * (1.0 - 1e-9)


@pytest.mark.parametrize("dim", [6, 80])
def test_float32_group_and_cell_tests_pass_every_pair_the_exact_test_passes(dim):
    emb, _ = _gradient_like(700, dim, seed=8, isolated=10)
    cells = Cells(_Kernel(emb, "euclidean", budget_bytes=1 << 12), leaf=8)
    num_groups = cells.group_center.shape[0]
    g = torch.Generator().manual_seed(1)
    xc = cells.x.to(torch.float64)
    for _ in range(6):
        for j in torch.randint(700, (5,), generator=g).tolist():
            cells.select(j)
        which, group = cells._active_groups(xc)
        got = torch.zeros(700, num_groups, dtype=torch.bool)
        got[which, group] = True
        want = _exact_test(cells, xc, cells.group_center, cells.group_reach, cells.group_radius)
        assert bool((got | ~want).all())
        # every (candidate, group) pair, so every cell
        which, cell = cells._active_cells(
            xc, torch.arange(700).repeat_interleave(num_groups), torch.arange(num_groups).repeat(700)
        )
        got = torch.zeros(700, cells.num_cells, dtype=torch.bool)
        got[which, cell] = True
        want = _exact_test(cells, xc, cells.center, cells.reach[:-1], cells.radius)
        assert bool((got | ~want).all())
        assert 0 < int(got.sum()) < got.numel()  # the test prunes something
