"""Tests of the fused C kernels (hf_epic.native): they compute the euclidean similarity and its sums
bit for bit as the torch kernels do, the greedy gives the same medoids with and without them, and a
missing or broken compiler falls back to torch with a warning. CPU only, seconds (a first compile
is under a second)."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import torch

from hf_epic import native, selection
from hf_epic.kernels import DistanceKernel, EuclideanKernel
from hf_epic.selection import find_isolated


def _gradient_like(n: int, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    probs = torch.softmax(2.0 * torch.randn(n, classes, generator=g, dtype=torch.float64), dim=1)
    probs[torch.arange(n), labels] -= 1.0
    return probs


def _strip(n: int, seed: int) -> torch.Tensor:
    # far-apart rows in 2-D: similarities below 0.5, so they are rounded to multiples of 2**-24
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([8.0, 0.05], dtype=torch.float64)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no kernels loaded or warnings given in this process yet."""
    monkeypatch.setenv("HF_EPIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(native, "_WARNED", set())
    return tmp_path


def _without_c(monkeypatch) -> None:
    monkeypatch.setenv("HF_EPIC_NATIVE", "0")
    monkeypatch.setattr(native, "_LOADED", {})


def test_c_similarities_are_the_torch_kernels_bit_for_bit():
    for x in (_gradient_like(300, 10, 1), _strip(300, 2)):
        kernel = selection._Kernel(x, "euclidean", 1 << 30)
        lib = kernel.native
        assert lib is not None, "a C compiler is part of the test set-up (make install)"
        xa, xbt = kernel.x[:120], kernel.xt[:, 40:290]  # a strided block of columns
        c = lib.block(
            xa, kernel.sq[:120], xbt, kernel.sq[40:290], kernel.needs_rounding, torch.empty(120, 250)
        )
        work = torch.empty(120, 250, dtype=torch.float64)
        reference = DistanceKernel.tile(
            kernel.sim, xa, xbt, kernel.sq[:120], kernel.sq[40:290], kernel.dim, None, work
        )
        if kernel.needs_rounding:
            reference = reference.mul_(2.0**24).round_().div_(2.0**24)
        assert torch.equal(c, reference)
        # the dense kernel is built by the C kernel and is exactly symmetric
        assert torch.equal(kernel.matrix, kernel.matrix.T)
        # the definition: exp(-||a - b|| / D) in float64, rounded to float32 once
        exact = torch.exp(-torch.cdist(x, x) / x.shape[1]).float()
        assert (kernel.matrix - exact).abs().max() <= 2**-23


def test_fused_sums_equal_the_torch_blocks(monkeypatch):
    monkeypatch.setattr(selection, "_BLOCK_ROWS", 16)
    monkeypatch.setattr(selection, "_UPDATE_ROWS", 8)
    monkeypatch.setattr(selection, "_THREADED_PAIRS", 1)
    monkeypatch.setattr(selection, "_THREADED_COLUMN", 1)  # columns split between two threads
    # spread-out rows (norms ~100): a row's distance to itself, computed as ||a||^2 + ||a||^2 - 2 a.a,
    # is not 0, so s(i, i) = 1 must be set where a row meets its own column
    for x in (_gradient_like(250, 10, 3), _strip(250, 4), 60.0 * _gradient_like(250, 10, 5)):
        with_c = selection._Kernel(x, "euclidean", 1 << 10, threads=2)
        torch_only = selection._Kernel(x, "euclidean", 1 << 10, threads=2)
        torch_only.native = None
        assert with_c.blocked() and with_c.native is not None
        for j in range(250):
            assert torch.equal(with_c.column(j), torch_only.column(j)), j
        column = with_c.column(5).clone()
        lower, upper = with_c.column(100).clone(), column
        # a greedy step's column with the rows it takes over (those above cur), in ascending order
        col, changed = with_c.column_changes(100, upper)
        assert torch.equal(col, lower)
        assert torch.equal(changed, (lower > upper).nonzero().squeeze(1))
        assert 0 < changed.numel() < 250
        for clamps in ([(None, None)], [(lower, None)], [(None, upper)], [(None, None), (None, upper)]):
            assert torch.equal(with_c.symmetric_sums(clamps), torch_only.symmetric_sums(clamps)), clamps
        # an update whose rows include candidates (s(i, i) = 1 there), the new medoid 7 among them
        # (its best similarity rises to s(7, 7) = 1), with and without pruning
        rows = torch.arange(1, 250, 3)
        old = torch.minimum(lower[rows], with_c.column(7)[rows])
        new = with_c.column(7)[rows].clone()
        thr = with_c.sim.pair_threshold(old, new, with_c.dim) * (1.0 - selection._PRUNE_MARGIN)
        col = with_c.column(7).clone()
        for threshold in (None, thr):
            got = with_c.update_sums(rows, old, new - old, threshold, col)
            assert torch.equal(got, torch_only.update_sums(rows, old, new - old, threshold, col))
            assert float(got.sum()) > 0
        # every row's best similarity rising to 1 (as if each were selected): every own pair counts
        ones = torch.ones(250)
        got = with_c.update_sums(torch.arange(250), lower, ones - lower, None, col)
        assert torch.equal(got, torch_only.update_sums(torch.arange(250), lower, ones - lower, None, col))
        # the formula alone would give some rows less than 1 with themselves here
        own = selection._Kernel(x, "euclidean", 1 << 30)
        assert torch.equal(own.matrix.diagonal(), torch.ones(250))


def test_greedy_gives_the_same_medoids_with_and_without_c_kernels(monkeypatch):
    x = torch.cat([_gradient_like(700, 10, 5), _gradient_like(60, 10, 6) * 3.0])
    labels = torch.zeros(len(x), dtype=torch.long)
    runs = {}
    for name in ("c", "torch"):
        if name == "torch":
            _without_c(monkeypatch)
        for greedy in ("lazy", "stochastic"):
            for budget in (None, 0.5):  # dense kernel; tiled (0.5 MiB cannot hold 760^2 floats)
                args = {} if budget is None else {"memory_budget_mb": budget}
                res = find_isolated(x, labels, 0.2, greedy=greedy, seed=3, **args)
                runs[name, greedy, budget] = (res.medoids, res.assignment)
    naive = find_isolated(x, labels, 0.2, greedy="naive")
    for (name, greedy, budget), (medoids, assignment) in runs.items():
        want = runs["torch", greedy, None]
        assert torch.equal(medoids, want[0]) and torch.equal(assignment, want[1]), (name, greedy, budget)
        if greedy == "lazy":
            assert torch.equal(medoids, naive.medoids), (name, budget)


def test_compiled_once_per_dimension_and_cached(fresh):
    lib = native.load(7)
    assert lib is not None and lib.dim == 7
    built = sorted((fresh / "cache" / "native").glob("epic_d7_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._LOADED.clear()
    assert native.load(7) is not None
    assert sorted((fresh / "cache" / "native").glob("*.so")) == built
    assert built[0].stat().st_mtime_ns == stamp
    assert native.load(native.MAX_DIM + 1) is None  # wide embeddings: torch's matrix product


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("HF_EPIC_NATIVE", "0")
    assert native.load(10) is None
    assert selection._Kernel(_gradient_like(50, 10, 1), "euclidean", 1 << 30).native is None
    assert not (fresh / "cache" / "native").exists()


def test_a_redefined_similarity_never_uses_the_c_kernels():
    class Steeper(EuclideanKernel):
        def from_distance_(self, d, dim):
            return d.mul_(-2.0 / dim).exp_()

    assert EuclideanKernel().native(10) is not None
    assert Steeper().native(10) is None
    x = _gradient_like(40, 10, 2)
    s = selection._Kernel(x, Steeper(), 1 << 30).matrix
    assert torch.allclose(s.double(), torch.exp(-2.0 * torch.cdist(x, x) / 10), atol=1e-6)


def test_no_compiler_falls_back_to_torch_with_a_warning(fresh, monkeypatch, caplog):
    empty = fresh / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setattr(native.sysconfig, "get_config_var", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="hf_epic.native"):
        assert native.load(10) is None
        assert native.load(10) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "no C compiler found" in messages[0] and "HF_EPIC_NATIVE=0" in messages[0]
    x = _gradient_like(300, 10, 8)
    labels = torch.zeros(300, dtype=torch.long)
    assert find_isolated(x, labels, 0.2, memory_budget_mb=0.05).medoids.numel() == 60


def test_a_failing_compiler_falls_back_with_its_message(fresh, monkeypatch, caplog):
    cc = fresh / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken-cc: cannot compile today' >&2\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(cc))
    with caplog.at_level(logging.WARNING, logger="hf_epic.native"):
        assert native.load(10) is None
    (message,) = [r.getMessage() for r in caplog.records]
    assert "cannot compile today" in message and "Set CC" in message
    assert not [p for p in (fresh / "cache" / "native").iterdir() if p.is_file()]  # no partial files
    assert os.environ["CC"] == str(cc)


def test_cells_compute_the_same_similarities_with_and_without_c_kernels():
    from hf_epic.cells import Cells

    for x in (_gradient_like(400, 10, 9), _strip(400, 10)):
        with_c = Cells(selection._Kernel(x, "euclidean", 1 << 12), leaf=8)
        kernel = selection._Kernel(x, "euclidean", 1 << 12)
        kernel.native = None
        torch_only = Cells(kernel, leaf=8)
        assert with_c.native is not None and torch_only.native is None
        cell = torch.arange(with_c.num_cells).repeat(3)
        cands = torch.randint(0, 400, (cell.numel(),), generator=torch.Generator().manual_seed(1))
        cands[:5] = with_c.members[cell[:5], 0]  # a row against its own cell: s = 1 there
        assert torch.equal(with_c._similarities(cell, cands), torch_only._similarities(cell, cands))
        # gains over every row (a first step) and after a few medoids
        for j in (0, 17, 230):
            rows = torch.arange(0, 400, 7)
            assert torch.equal(with_c._dense_gains(rows), torch_only._dense_gains(rows))
            with_c.select(j)
            torch_only.select(j)
