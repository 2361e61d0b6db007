"""Tests of the EPIC selection engine (hf_epic.selection): golden results, defects of the
reference implementation, memory-bounded tiles and input validation. CPU only, seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_epic.kernels import DistanceKernel, register_kernel, unregister_kernel
from hf_epic.selection import (
    KERNELS,
    SelectionResult,
    available_kernels,
    class_budget,
    find_isolated,
    similarity_kernel,
)

ALL_KERNELS = available_kernels()


def _clustered(n_per_cluster: int, clusters: int, dim: int, isolated: int, seed: int) -> torch.Tensor:
    """Tight gaussian clusters plus far-away isolated points (the isolated ones come last)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g) * 3.0
    pts = centers.repeat_interleave(n_per_cluster, 0) + 0.05 * torch.randn(
        clusters * n_per_cluster, dim, generator=g
    )
    far = 25.0 + 3.0 * torch.randn(isolated, dim, generator=g)
    far = far * torch.sign(torch.randn(isolated, dim, generator=g))
    return torch.cat([pts, far]).double()


def _gradient_like(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(z) - onehot(y) of random logits, the embedding EPIC uses."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g) * 2.0
    logits[torch.arange(n), labels] += 3.0
    emb = torch.softmax(logits, 1)
    emb[torch.arange(n), labels] -= 1.0
    return emb, labels


def _check_consistent(res: SelectionResult, labels: torch.Tensor, threshold: int = 1) -> None:
    n = labels.numel()
    assert res.assignment.shape == (n,)
    assert set(res.assignment.unique().tolist()) <= set(res.medoids.tolist())
    # every row is assigned to a medoid of its own class
    assert torch.equal(labels[res.assignment], labels)
    sizes = torch.bincount(res.assignment, minlength=n)
    assert torch.equal(res.cluster_sizes, sizes[res.medoids])
    expected_drop = (sizes[res.assignment] <= threshold).nonzero().squeeze(1)
    assert torch.equal(res.dropped, expected_drop)
    assert torch.equal(torch.sort(torch.cat([res.dropped, res.kept])).values, torch.arange(n))


# --------------------------------------------------------------------------- golden tests


def test_kernel_matches_hand_computation():
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [1.0, 2.0, 2.0]])
    s = similarity_kernel(x, "euclidean")
    # ||a-b|| = 5, 3 and sqrt(4 + 4 + 4) = sqrt(12); D = 3
    expect = torch.tensor(
        [
            [1.0, math.exp(-5 / 3), math.exp(-3 / 3)],
            [math.exp(-5 / 3), 1.0, math.exp(-math.sqrt(12) / 3)],
            [math.exp(-3 / 3), math.exp(-math.sqrt(12) / 3), 1.0],
        ]
    )
    assert s.dtype == torch.float32
    assert torch.allclose(s, expect, atol=1e-6, rtol=0)
    c = similarity_kernel(x[1:], "cosine")
    cos = (3 * 1 + 4 * 2) / (5 * 3)
    assert torch.allclose(c, torch.tensor([[1.0, cos], [cos, 1.0]]), atol=1e-6)


def test_budget_is_ceil_of_fraction():
    assert class_budget(0.1, 50) == 5
    assert class_budget(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert class_budget(0.1, 51) == 6
    assert class_budget(0.2, 1) == 1
    assert class_budget(1.0, 7) == 7


def _brute_force_greedy(x: torch.Tensor, k: int, metric: str = "euclidean") -> list[int]:
    """Facility-location greedy written out from the definition, in float64."""
    s = similarity_kernel(x, metric).double()
    cur = torch.zeros(len(x), dtype=torch.float64)
    order: list[int] = []
    for _ in range(k):
        gains = (s - cur[:, None]).clamp_min(0).sum(0)
        gains[order] = -1.0
        j = int(torch.argmax(gains))
        order.append(j)
        cur = torch.maximum(cur, s[:, j])
    return order


@pytest.mark.parametrize("metric", ALL_KERNELS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_lazy_equals_naive_greedy(seed, metric):
    emb, labels = _gradient_like(300, 3, seed)
    lazy = find_isolated(emb, labels, 0.3, greedy="lazy", metric=metric)
    naive = find_isolated(emb, labels, 0.3, greedy="naive", metric=metric)
    assert torch.equal(lazy.medoids, naive.medoids)
    assert torch.equal(lazy.assignment, naive.assignment)
    assert torch.equal(lazy.dropped, naive.dropped)
    _check_consistent(lazy, labels)
    # and the naive path is the textbook definition
    rows = (labels == labels.unique()[0]).nonzero().squeeze(1)
    k = class_budget(0.3, rows.numel())
    assert lazy.medoids[:k].tolist() == rows[_brute_force_greedy(emb[rows], k, metric)].tolist()


@pytest.mark.parametrize("metric", ALL_KERNELS)
def test_lazy_equals_naive_with_duplicates_and_ties(metric):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(12, 4, generator=g)
    # every point three times, a row of exact zeros, fraction 1.0: many exact (zero-gain) ties
    x = torch.cat([base, base, base, torch.zeros(2, 4)])
    labels = torch.zeros(len(x), dtype=torch.long)
    for fraction in (0.2, 0.5, 1.0):
        lazy = find_isolated(x, labels, fraction, greedy="lazy", metric=metric)
        naive = find_isolated(x, labels, fraction, greedy="naive", metric=metric)
        assert torch.equal(lazy.medoids, naive.medoids), fraction
        assert torch.equal(lazy.assignment, naive.assignment), fraction
    if metric != "euclidean":
        return
    # ties go to the lowest row position: the first copy of each point is chosen first
    lazy = find_isolated(x, labels, 12 / 38, greedy="lazy")
    assert lazy.medoids.numel() == 12
    assert all(m < 12 for m in lazy.medoids.tolist())
    # duplicates are never isolated: each copy shares a cluster with the others
    assert lazy.dropped.numel() == 0


def test_lazy_equals_naive_cosine():
    emb, labels = _gradient_like(240, 4, 11)
    lazy = find_isolated(emb, labels, 0.2, metric="cosine")
    naive = find_isolated(emb, labels, 0.2, metric="cosine", greedy="naive")
    assert torch.equal(lazy.medoids, naive.medoids)
    assert torch.equal(lazy.assignment, naive.assignment)
    _check_consistent(lazy, labels)


def test_stochastic_reproducible_by_seed():
    emb, labels = _gradient_like(400, 2, 3)
    a = find_isolated(emb, labels, 0.1, greedy="stochastic", seed=7)
    b = find_isolated(emb, labels, 0.1, greedy="stochastic", seed=7)
    c = find_isolated(emb, labels, 0.1, greedy="stochastic", seed=8)
    assert torch.equal(a.medoids, b.medoids) and torch.equal(a.dropped, b.dropped)
    assert not torch.equal(a.medoids, c.medoids)
    _check_consistent(a, labels)
    # with epsilon tiny the sample is the whole class: exactly lazy greedy
    full = find_isolated(emb, labels, 0.1, greedy="stochastic", epsilon=1e-300**0.5)
    lazy = find_isolated(emb, labels, 0.1)
    assert torch.equal(full.medoids, lazy.medoids)


def test_planted_isolated_points_are_dropped():
    x = _clustered(n_per_cluster=40, clusters=5, dim=6, isolated=6, seed=0)
    labels = torch.zeros(len(x), dtype=torch.long)
    # one medoid per cluster plus one per isolated point
    res = find_isolated(x, labels, 11 / 206)
    planted = set(range(200, 206))
    assert set(res.dropped.tolist()) == planted
    assert res.per_class == {0: {"n": 206, "budget": 11, "num_dropped": 6}}
    # a larger budget still drops every planted point
    assert planted <= set(find_isolated(x, labels, 0.2).dropped.tolist())
    _check_consistent(res, labels)


def test_matches_submodlib_lazy_greedy():
    submodlib = pytest.importorskip("submodlib")
    emb, labels = _gradient_like(600, 3, 21)
    x = emb[labels == 0].numpy().astype(np.float32)
    obj = submodlib.FacilityLocationFunction(n=len(x), mode="dense", data=x, metric="euclidean")
    assert np.abs(obj.sijs - similarity_kernel(x).numpy()).max() < 1e-6  # the same kernel
    budget = math.ceil(0.15 * len(x))
    greedy = obj.maximize(
        budget=budget, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False, verbose=False
    )
    ref = [int(i) for i, _ in greedy]
    ours = find_isolated(x, np.zeros(len(x), dtype=np.int64), 0.15).medoids.tolist()
    assert len(ours) == len(ref) == budget
    # identical until the first exact tie, which submodlib breaks differently (we take the lowest row)
    s = similarity_kernel(x).double()
    cur = torch.zeros(len(x), dtype=torch.float64)
    for step, (a, b) in enumerate(zip(ours, ref)):
        gains = (s - cur[:, None]).clamp_min(0).sum(0)
        assert abs(float(gains[b]) - greedy[step][1]) < 1e-4
        if a != b:
            assert abs(float(gains[a] - gains[b])) < 1e-9 and a < b
            break
        cur = torch.maximum(cur, s[:, a])
    assert step >= 20


class _Gaussian(DistanceKernel):
    """exp(-||a - b||^2 / D): a distance-based kernel defined only here, to test the registry."""

    def from_distance_(self, d: torch.Tensor, dim: int) -> torch.Tensor:
        return d.square_().mul_(-1.0 / dim).exp_()

    def to_distance(self, s: torch.Tensor, dim: int) -> torch.Tensor:
        s = s.to(torch.float64)
        return torch.where(
            s > 0, torch.sqrt((-dim * torch.log(s.clamp_min(1e-300))).clamp_min(0.0)), math.inf
        )


@pytest.fixture
def gaussian_kernel():
    register_kernel("test_gaussian")(_Gaussian)
    try:
        yield "test_gaussian"
    finally:
        unregister_kernel("test_gaussian")


def test_builtin_kernels_are_registered_once():
    assert ALL_KERNELS[:2] == ("euclidean", "cosine")
    assert KERNELS["euclidean"].name == "euclidean" and KERNELS["euclidean"].distance_based
    assert not KERNELS["cosine"].distance_based and not KERNELS["cosine"].nonnegative
    with pytest.raises(ValueError, match="already registered"):
        register_kernel("euclidean")(_Gaussian)
    with pytest.raises(ValueError, match="unknown metric 'nope'; choose one of euclidean, cosine"):
        find_isolated(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 0.5, metric="nope")


def test_a_new_kernel_is_one_class(gaussian_kernel, monkeypatch):
    from hf_epic import selection

    assert gaussian_kernel in available_kernels()
    emb, labels = _gradient_like(400, 2, 17)
    s = similarity_kernel(emb[:50], gaussian_kernel).double()
    exact = torch.exp(-(torch.cdist(emb[:50].double(), emb[:50].double()) ** 2) / emb.shape[1])
    assert (s - exact).abs().max() < 1e-6
    lazy = find_isolated(emb, labels, 0.2, metric=gaussian_kernel)
    naive = find_isolated(emb, labels, 0.2, metric=gaussian_kernel, greedy="naive")
    tiled = find_isolated(emb, labels, 0.2, metric=gaussian_kernel, memory_budget_mb=0.05)
    for other in (naive, tiled):
        assert torch.equal(lazy.medoids, other.medoids)
        assert torch.equal(lazy.assignment, other.assignment)
    _check_consistent(lazy, labels)
    # its pruning bounds drive the k-d cells: stochastic greedy on cells equals the dense path
    monkeypatch.setattr(selection, "_CELLS_MIN_ROWS", 0)
    dense = find_isolated(emb, labels, 0.2, metric=gaussian_kernel, greedy="stochastic", seed=2)
    cells = find_isolated(
        emb, labels, 0.2, metric=gaussian_kernel, greedy="stochastic", seed=2, memory_budget_mb=0.05
    )
    assert torch.equal(dense.medoids, cells.medoids)
    assert torch.equal(dense.assignment, cells.assignment)


# --------------------------------------------------------------------------- reference defects


def test_imbalanced_classes_and_arbitrary_labels():
    x1 = _clustered(30, 3, 5, 2, seed=1)  # 92 rows
    x2 = _clustered(5, 2, 5, 1, seed=2)  # 11 rows
    x3 = torch.randn(1, 5, dtype=torch.float64)  # a class with one example
    x = torch.cat([x2, x1, x3])
    labels = torch.tensor([7] * len(x2) + [100] * len(x1) + [3])
    res = find_isolated(x, labels, 0.1)
    assert res.per_class[100]["budget"] == 10
    assert res.per_class[7]["budget"] == 2
    assert res.per_class[3] == {"n": 1, "budget": 1, "num_dropped": 1}
    _check_consistent(res, labels)
    # same answer as running each class alone
    for lab in (7, 100, 3):
        rows = (labels == lab).nonzero().squeeze(1)
        alone = find_isolated(x[rows], torch.zeros(len(rows), dtype=torch.long), 0.1)
        mask = labels[res.medoids] == lab
        assert torch.equal(res.medoids[mask], rows[alone.medoids])
        assert torch.equal(res.assignment[rows], rows[alone.assignment])


def test_fraction_one_makes_every_distinct_row_isolated():
    emb, labels = _gradient_like(60, 3, 4)
    res = find_isolated(emb, labels, 1.0)
    assert res.medoids.numel() == 60
    assert torch.equal(res.assignment, torch.arange(60))
    assert torch.equal(res.dropped, torch.arange(60))
    keep_all = find_isolated(emb, labels, 1.0, cluster_threshold=0)
    assert keep_all.dropped.numel() == 0


def test_numpy_input_equals_torch_input():
    emb, labels = _gradient_like(200, 3, 8)
    a = find_isolated(emb.numpy(), labels.numpy().astype(np.int32), 0.2)
    b = find_isolated(emb, labels, 0.2)
    assert torch.equal(a.medoids, b.medoids) and torch.equal(a.dropped, b.dropped)
    assert a.medoids.dtype == torch.int64 and a.dropped.device.type == "cpu"


@pytest.mark.parametrize("metric", ALL_KERNELS)
@pytest.mark.parametrize("greedy", ["lazy", "naive"])
def test_tiled_path_equals_dense_path(metric, greedy):
    emb, labels = _gradient_like(300, 2, 9)
    dense = find_isolated(emb, labels, 0.2, metric=metric, greedy=greedy)
    # 0.05 MiB cannot hold a 150 x 150 float32 kernel plus tiles: forces the tiled path
    tiled = find_isolated(emb, labels, 0.2, metric=metric, greedy=greedy, memory_budget_mb=0.05)
    assert torch.equal(dense.medoids, tiled.medoids)
    assert torch.equal(dense.assignment, tiled.assignment)


@pytest.mark.parametrize("metric", ALL_KERNELS)
def test_blocked_threaded_tiled_path_equals_naive_greedy(metric, monkeypatch):
    # small blocks and a zero threading threshold: many blocks per pass (diagonal blocks, partial
    # edge blocks, rows sorted by pruning threshold, duplicates whose s(i, i) is set to 1), split
    # between two threads, must give naive greedy's medoids on the dense kernel
    from hf_epic import selection

    monkeypatch.setattr(selection, "_BLOCK_ROWS", 16)
    monkeypatch.setattr(selection, "_BLOCK_COLS", 48)
    monkeypatch.setattr(selection, "_UPDATE_ROWS", 8)
    monkeypatch.setattr(selection, "_UPDATE_COLS", 40)
    monkeypatch.setattr(selection, "_THREADED_PAIRS", 1)
    # one class of D = 10 gradient embeddings with exact duplicates (ties, zero distances)
    emb, _ = _gradient_like(330, 10, 17)
    emb = torch.cat([emb, emb[:40]])
    # a thin strip (nearly collinear rows): the triangle-inequality bounds are nearly tight, so
    # a block pruned by any threshold but its smallest loses pairs that count
    strip = torch.rand(400, 2, generator=torch.Generator().manual_seed(3)) * torch.tensor([8.0, 0.05])
    before = torch.get_num_threads()
    try:
        for x in (emb, strip):
            labels = torch.zeros(len(x), dtype=torch.long)
            naive = find_isolated(x, labels, 0.15, metric=metric, greedy="naive")
            for threads in (1, 2):
                torch.set_num_threads(threads)
                tiled = find_isolated(x, labels, 0.15, metric=metric, memory_budget_mb=0.05)
                assert torch.equal(tiled.medoids, naive.medoids), threads
                assert torch.equal(tiled.assignment, naive.assignment), threads
    finally:
        torch.set_num_threads(before)


def test_blocked_passes_equal_the_dense_kernel_sums(monkeypatch):
    # the symmetric column sums and the pruned update sums against the same sums on the dense kernel,
    # on gradient embeddings (every similarity >= 0.5) and on the thin strip (thresholds nearly tight)
    from hf_epic import selection

    monkeypatch.setattr(selection, "_BLOCK_ROWS", 16)
    monkeypatch.setattr(selection, "_BLOCK_COLS", 32)
    monkeypatch.setattr(selection, "_UPDATE_ROWS", 8)
    monkeypatch.setattr(selection, "_UPDATE_COLS", 24)
    monkeypatch.setattr(selection, "_THREADED_PAIRS", 1)
    strip = torch.rand(200, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    strip *= torch.tensor([8.0, 0.05], dtype=torch.float64)
    for x, upper_half in ((_gradient_like(200, 10, 23)[0].to(torch.float64), True), (strip, False)):
        dense = selection._Kernel(x, "euclidean", 1 << 30)
        tiled = selection._Kernel(x, "euclidean", 1 << 10, threads=2)
        assert dense.matrix is not None and tiled.blocked()
        assert tiled.needs_rounding is not upper_half
        s = dense.matrix
        upper = s[:, 5].clone()
        lower = s[:, 150].clone()
        assert torch.equal(tiled.column_sums(), s.sum(dim=0, dtype=torch.float64))
        want = torch.minimum(s, upper[:, None]).sum(0, dtype=torch.float64)
        assert torch.equal(tiled.column_sums(upper=upper), want)
        want = torch.maximum(s, lower[:, None]).sum(0, dtype=torch.float64)
        assert torch.equal(tiled.column_sums(lower=lower), want)
        # rows whose best similarity rises from old to new = s(i, 7), with and without pruning
        rows = torch.arange(0, 200, 3)
        old = torch.minimum(lower[rows], s[rows, 7])
        new = s[rows, 7]
        span = new - old
        assert bool((span > 0).any())
        want = torch.minimum((s[rows] - old[:, None]).clamp_min(0), span[:, None]).sum(0, dtype=torch.float64)
        assert torch.equal(tiled.update_sums(rows, old, span, None, s[7]), want)
        thr = tiled.sim.pair_threshold(old, new, tiled.dim) * (1.0 - selection._PRUNE_MARGIN)
        assert torch.equal(tiled.update_sums(rows, old, span, thr, s[7]), want)
        gains = torch.ones(200, dtype=torch.float64)
        assert tiled.update_sums(rows, old, span, thr, s[7], subtract_from=gains) is gains
        assert torch.equal(gains, 1.0 - want)
        # several sums in one pass over the blocks: each equals its own pass
        both = tiled.symmetric_sums([(None, None), (lower, upper), (None, upper)])
        assert both.shape == (3, 200)
        assert torch.equal(both[0], tiled.column_sums())
        assert torch.equal(both[1], tiled.column_sums(lower=lower, upper=upper))
        assert torch.equal(both[2], tiled.column_sums(upper=upper))


def test_one_pass_for_the_first_gains_and_the_first_update(monkeypatch):
    # exact greedy on a tiled kernel computes the first gains and the update of a guessed first
    # medoid in one pass over the blocks; a wrong guess costs a second pass, never another result
    from hf_epic import selection

    x, _ = _gradient_like(2000, 10, 37)
    kernel = selection._Kernel(x, "euclidean", 1 << 20)
    assert kernel.blocked()
    first = int(torch.argmax(kernel.column_sums()))
    # the guess from samples much smaller than the class finds it
    monkeypatch.setattr(selection, "_GUESS_SAMPLE", 64)
    monkeypatch.setattr(selection, "_GUESS_SHORTLIST", 128)
    monkeypatch.setattr(selection, "_GUESS_FINAL", 8)
    assert kernel.likely_first_medoid() == first

    x, labels = x[:400], torch.zeros(400, dtype=torch.long)
    naive = find_isolated(x, labels, 0.2, greedy="naive")
    first = int(naive.medoids[0])
    passes: list[int] = []
    sweep = selection._Kernel.symmetric_sums

    def counted(self, clamps):
        passes.append(len(clamps))
        return sweep(self, clamps)

    monkeypatch.setattr(selection._Kernel, "symmetric_sums", counted)
    for guess, want in ((None, [2]), ((first + 1) % 400, [2, 1])):
        if guess is not None:
            monkeypatch.setattr(selection._Kernel, "likely_first_medoid", lambda self, g=guess: g)
        passes.clear()
        tiled = find_isolated(x, labels, 0.2, memory_budget_mb=0.05)
        assert passes == want
        assert torch.equal(tiled.medoids, naive.medoids)
        assert torch.equal(tiled.assignment, naive.assignment)


def test_float32_runs_of_an_update_are_exact():
    # a dense kernel's update sums its changed rows in float32 runs whose spans (new - old) sum
    # below 1: the runs must tile the rows and the sums equal float64 sums bit for bit
    from hf_epic import selection

    g = torch.Generator().manual_seed(8)
    span = torch.round(torch.rand(500, generator=g) * 0.3 * 2**24) / 2**24
    for stop, max_rows in ((500, 1000), (301, 9), (0, 4)):
        runs = selection._exact_runs(span[:stop], max_rows)
        assert [a for a, _ in runs] == [0, *[b for _, b in runs[:-1]]][: len(runs)]
        assert (runs[-1][1] == stop) if stop else runs == []
        for a, b in runs:
            assert b - a <= max_rows
            assert b - a == 1 or float(span[a:b].double().sum()) < 1.0
    assert len(selection._exact_runs(span, 1000)) > 20  # the spans sum to ~75: many runs

    x = _gradient_like(200, 10, 29)[0].to(torch.float64)
    dense = selection._Kernel(x, "euclidean", 1 << 30)
    s = dense.matrix
    assert s is not None
    rows = torch.arange(0, 200, 2)
    new = s[rows, 11]
    old = new - torch.round(torch.rand(100, generator=g) * 0.4 * new * 2**24) / 2**24
    span = new - old
    assert float(span.double().sum()) > 5.0  # several runs
    want = torch.minimum((s[rows] - old[:, None]).clamp_min(0), span[:, None]).sum(0, dtype=torch.float64)
    gains = torch.zeros(200, dtype=torch.float64)
    selection._update_gains(dense, gains, rows, old, new, s[11])
    assert torch.equal(gains, -want)


def test_threshold_controls_dropping():
    x = _clustered(n_per_cluster=2, clusters=10, dim=4, isolated=3, seed=3)
    labels = torch.zeros(len(x), dtype=torch.long)
    one = find_isolated(x, labels, 0.5, cluster_threshold=1)
    two = find_isolated(x, labels, 0.5, cluster_threshold=2)
    assert set(one.dropped.tolist()) <= set(two.dropped.tolist())
    _check_consistent(two, labels, threshold=2)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": torch.tensor([[0.0, float("nan")], [1.0, 1.0]])}, "NaN or infinite"),
        ({"embeddings": torch.tensor([[0.0, float("inf")], [1.0, 1.0]])}, "NaN or infinite"),
        ({"labels": torch.tensor([0, 1, 1])}, "shape mismatch"),
        ({"embeddings": torch.zeros(0, 3), "labels": torch.zeros(0, dtype=torch.long)}, "empty"),
        ({"embeddings": torch.zeros(2)}, "2-D"),
        ({"labels": torch.tensor([0.0, 1.0])}, "labels must be integers"),
        ({"labels": torch.tensor([True, False])}, "labels must be integers"),
        ({"labels": torch.tensor([[0, 1]])}, "1-D"),
        ({"fraction": 0.0}, "fraction must be in"),
        ({"fraction": 1.5}, "fraction must be in"),
        ({"fraction": float("nan")}, "fraction must be in"),
        ({"fraction": "0.1"}, "fraction must be a number"),
        ({"metric": "manhattan"}, "unknown metric"),
        ({"greedy": "fast"}, "unknown greedy"),
        ({"cluster_threshold": -1}, "cluster_threshold must be >= 0"),
        ({"cluster_threshold": 1.5}, "cluster_threshold must be an integer"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"memory_budget_mb": 0}, "memory_budget_mb"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = {
        "embeddings": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        "labels": torch.tensor([0, 1]),
        "fraction": 0.5,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        find_isolated(args.pop("embeddings"), args.pop("labels"), args.pop("fraction"), **args)


def test_wrong_container_type_raises_type_error():
    with pytest.raises(TypeError, match="torch.Tensor or a numpy.ndarray"):
        find_isolated([[0.0, 1.0]], torch.tensor([0]), 0.5)


def test_inputs_are_not_modified():
    emb, labels = _gradient_like(100, 2, 1)
    e0, l0 = emb.clone(), labels.clone()
    find_isolated(emb, labels, 0.2)
    assert torch.equal(emb, e0) and torch.equal(labels, l0)


@pytest.mark.parametrize("greedy", ["lazy", "stochastic"])
def test_concurrent_classes_give_the_same_result(greedy):
    emb, labels = _gradient_like(600, 5, 12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = find_isolated(emb, labels, 0.2, greedy=greedy, seed=3)
        torch.set_num_threads(2)  # a pipeline: one thread builds kernels, one runs greedy steps
        two = find_isolated(emb, labels, 0.2, greedy=greedy, seed=3)
        torch.set_num_threads(3)  # three classes at a time
        three = find_isolated(emb, labels, 0.2, greedy=greedy, seed=3)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    for other in (two, three):
        assert torch.equal(one.medoids, other.medoids) and torch.equal(one.assignment, other.assignment)


def test_wide_embeddings_lazy_equals_naive_and_kernel_is_right():
    # D > 64 takes the float32 matrix-product path
    g = torch.Generator().manual_seed(13)
    x = torch.softmax(3.0 * torch.randn(200, 100, generator=g), dim=1)
    labels = torch.zeros(200, dtype=torch.long)
    lazy = find_isolated(x, labels, 0.2)
    naive = find_isolated(x, labels, 0.2, greedy="naive")
    assert torch.equal(lazy.medoids, naive.medoids)
    s = similarity_kernel(x).double()
    exact = torch.exp(-torch.cdist(x.double(), x.double()) / 100)
    assert (s - exact).abs().max() < 1e-6
    assert torch.equal(s, s.T)


@pytest.mark.timeout(60)
def test_an_error_in_a_worker_thread_reaches_the_caller(monkeypatch):
    # a class whose kernel cannot be built (simulated out-of-memory) must fail the call, not hang it
    from hf_epic import selection

    real = selection._Kernel

    class FailingKernel(real):
        def __init__(self, x, *args, **kwargs):
            if x.shape[0] == 7:
                raise MemoryError("kernel of the 7-row class")
            super().__init__(x, *args, **kwargs)

    monkeypatch.setattr(selection, "_Kernel", FailingKernel)
    emb, _ = _gradient_like(200, 4, 21)
    labels = torch.cat([torch.zeros(7, dtype=torch.long), torch.randint(1, 4, (193,))])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(MemoryError, match="7-row class"):
            find_isolated(emb, labels, 0.2)
    finally:
        torch.set_num_threads(before)


def test_greedy_resumed_after_its_large_steps_equals_naive_greedy():
    # one flat class of 1,200 rows: its first greedy steps update most rows (>= _HEAVY_STEP
    # elements each); find_isolated runs them right after building the kernel (on a second
    # thread, while another class's small steps run) and resumes the rest later
    from hf_epic import selection

    emb, _ = _gradient_like(1200, 3, 21)
    kernel = selection._Kernel(emb, "euclidean", 1 << 30)
    budget = 40
    started = selection._DenseSteps(kernel, budget)
    started.advance(heavy_only=True)
    assert 1 <= len(started.order) < budget  # some large steps ran, not all steps
    started.advance()
    naive = selection._greedy_naive(kernel, budget)
    assert started.order == naive
    whole = selection._DenseSteps(kernel, budget)
    whole.advance()
    assert whole.order == naive and torch.equal(whole.assign, started.assign)
    result = find_isolated(emb, torch.zeros(len(emb), dtype=torch.long), budget / len(emb))
    assert result.medoids.tolist() == naive


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("metric", ALL_KERNELS)
def test_cuda_lazy_equals_naive_and_agrees_with_cpu(metric):
    emb, labels = _gradient_like(900, 3, 31)
    on_gpu = find_isolated(emb.cuda(), labels.cuda(), 0.2, metric=metric)
    naive = find_isolated(emb.cuda(), labels.cuda(), 0.2, metric=metric, greedy="naive")
    tiled = find_isolated(emb.cuda(), labels.cuda(), 0.2, metric=metric, memory_budget_mb=0.5)
    for other in (naive, tiled):
        assert torch.equal(on_gpu.medoids, other.medoids)
        assert torch.equal(on_gpu.assignment, other.assignment)
    assert on_gpu.medoids.device.type == "cpu" and on_gpu.dropped.device.type == "cpu"
    _check_consistent(on_gpu, labels)
    # the GPU's exp/sqrt may round differently from the CPU's in the last bit: near-exact agreement
    on_cpu = find_isolated(emb, labels, 0.2, metric=metric)
    a, b = set(on_gpu.dropped.tolist()), set(on_cpu.dropped.tolist())
    assert len(a & b) >= 0.95 * len(a | b)


@pytest.mark.gpu
@needs_cuda
def test_cuda_stochastic_reproducible_and_planted_points_found():
    x = _clustered(n_per_cluster=20, clusters=30, dim=8, isolated=12, seed=4).float()
    labels = torch.zeros(len(x), dtype=torch.long)
    first = find_isolated(x.cuda(), labels.cuda(), 0.1, greedy="stochastic", seed=5)
    second = find_isolated(x.cuda(), labels.cuda(), 0.1, greedy="stochastic", seed=5)
    assert torch.equal(first.medoids, second.medoids)
    planted = set(range(len(x) - 12, len(x)))
    exact = find_isolated(x.cuda(), labels.cuda(), 0.1)
    assert planted <= set(exact.dropped.tolist())


# --------------------------------------------------------------------------- isolation scores


def _brute_isolation(emb: torch.Tensor, labels: torch.Tensor, row: int, metric: str) -> float:
    """1 - max(0, max_{j != row} s(row, j)) over the row's class, from the dense kernel."""
    mine = (labels == labels[row]).nonzero().squeeze(1)
    if mine.numel() == 1:
        return 1.0
    sims = similarity_kernel(emb[mine], metric)[(mine == row).nonzero().item()].double()
    sims[(mine == row).nonzero().item()] = -math.inf
    return 1.0 - max(0.0, float(sims.max()))


@pytest.mark.parametrize("metric", ALL_KERNELS)
def test_isolation_scores_are_one_minus_the_nearest_other_rows_similarity(metric):
    emb, labels = _gradient_like(400, 3, 21)
    emb, labels = torch.cat([emb, emb[:1] + 0.3]), torch.cat([labels, torch.tensor([7])])  # a one-row class
    plain = find_isolated(emb, labels, 0.3, metric=metric)
    scored = find_isolated(emb, labels, 0.3, metric=metric, isolation_scores=True)
    assert plain.isolation_scores is None
    assert torch.equal(plain.dropped, scored.dropped) and torch.equal(plain.medoids, scored.medoids)
    assert scored.isolation_scores.dtype == torch.float64
    assert scored.isolation_scores.shape == scored.dropped.shape
    want = [_brute_isolation(emb, labels, r, metric) for r in scored.dropped.tolist()]
    assert scored.isolation_scores.tolist() == pytest.approx(want, abs=1e-6)
    assert scored.isolation_scores[scored.dropped == 400].tolist() == [1.0]  # alone in class 7
    # in tiles (the kernel is not held) the scores are the same
    tiled = find_isolated(emb, labels, 0.3, metric=metric, isolation_scores=True, memory_budget_mb=0.05)
    assert torch.equal(tiled.dropped, scored.dropped)
    assert tiled.isolation_scores.tolist() == pytest.approx(scored.isolation_scores.tolist(), abs=1e-6)


def test_isolation_scores_with_concurrent_classes_and_a_larger_threshold():
    emb, labels = _gradient_like(600, 5, 12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = find_isolated(emb, labels, 0.2, cluster_threshold=2, isolation_scores=True)
        torch.set_num_threads(3)
        three = find_isolated(emb, labels, 0.2, cluster_threshold=2, isolation_scores=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.dropped, three.dropped)
    assert torch.equal(one.isolation_scores, three.isolation_scores)
    want = [_brute_isolation(emb, labels, r, "euclidean") for r in one.dropped.tolist()]
    assert one.isolation_scores.tolist() == pytest.approx(want, abs=1e-6)
