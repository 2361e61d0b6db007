"""Speed, agreement and memory of ``hf_epic.find_isolated`` against the EPIC reference's selection.

The reference is what the EPIC code runs every selection round: per class, submodlib's
``FacilityLocationFunction(n=n_c, mode="dense", data=X_c, metric="euclidean")`` and
``.maximize(budget=K_c, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False)``,
then every row is assigned to the medoid with the largest similarity (``argmax`` over the dense
kernel ``obj.sijs``) and rows in clusters of size <= 1 are dropped. Both run in this one process,
interleaved (reference, then ours, per case), so machine load hits both alike.

Printed per case: wall time of each, the ratio reference / ours (wall and CPU time; the reference
is single-threaded C++, ours uses torch's threads), the Jaccard overlap of the dropped sets, and
peak memory. Ours runs ``--repeats`` times per case and fraction (3 by default) and the run with
the median wall time is reported, with every run's time: one run of ours (about a second) varies
by ~25 % with the machine's state, one of the reference (half a minute) far less. Peak memory is
the growth of the process's peak resident set size (``VmHWM`` from ``/proc/self/status``, reset
through ``/proc/self/clear_refs`` before each run) over the resident size when the run started:
it counts torch's and submodlib's native allocations, which ``tracemalloc`` cannot see.

Embeddings: ``softmax(z) - onehot(y)`` of logits drawn around a few tight per-class modes, plus
~1% isolated rows with random logits (the EPIC gradient embedding of a trained classifier: most
rows sit in tight clusters, a few are far from everything), and optionally a real classifier
trained on scikit-learn's digits.

    .venv/bin/python benchmarks/bench_selection.py                        # all cases
    .venv/bin/python benchmarks/bench_selection.py --cases cifar10 --fractions 0.1
    .venv/bin/python benchmarks/bench_selection.py --cases large --no-reference       # 200k rows, stochastic
    .venv/bin/python benchmarks/bench_selection.py --cases large-exact --threads 1   # 200k rows, exact
    .venv/bin/python benchmarks/bench_selection.py --cases million --threads 1       # 1M rows, stochastic
    .venv/bin/python benchmarks/bench_selection.py --cases scores --threads 1        # isolation scores' cost
    .venv/bin/python benchmarks/bench_selection.py --cases cifar10 --device cuda --no-reference
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_epic.selection import class_budget, find_isolated  # noqa: E402

# --------------------------------------------------------------------------- embeddings


def make_gradient_embeddings(
    num_rows: int,
    num_classes: int,
    dim: int,
    *,
    modes_per_class: int = 20,
    spread: float = 0.15,
    isolated_fraction: float = 0.01,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Realistic EPIC gradient embeddings ``softmax(z) - onehot(y)``.

    Every class has ``modes_per_class`` modes in logit space (the label's logit raised by 5,
    so most rows are confidently right); a row is a mode plus gaussian noise of scale
    ``spread``, which makes tight clusters of unequal sizes. ``isolated_fraction`` of the rows
    get random logits instead (far from everything: the isolated points EPIC should drop).

    Args:
        num_rows: Rows N.
        num_classes: Classes (labels are 0..num_classes-1, balanced, shuffled).
        dim: Number of logits D (>= num_classes); the embedding has D dimensions.
        modes_per_class: Modes (clusters) per class.
        spread: Standard deviation of the logit noise around a mode.
        isolated_fraction: Share of rows with random logits.
        seed: Random seed.

    Returns:
        ``(embeddings float32 N x D, labels int64 N, is_isolated bool N)``.
    """
    if dim < num_classes:
        raise ValueError(f"dim ({dim}) must be >= num_classes ({num_classes})")
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(num_rows) % num_classes)[torch.randperm(num_rows, generator=g)]
    logits = torch.empty(num_rows, dim)
    for c in range(num_classes):
        rows = (labels == c).nonzero().squeeze(1)
        modes = 1.5 * torch.randn(modes_per_class, dim, generator=g)
        modes[:, c] += 5.0
        weights = torch.rand(modes_per_class, generator=g) + 0.2
        which = torch.multinomial(weights, rows.numel(), replacement=True, generator=g)
        logits[rows] = modes[which] + spread * torch.randn(rows.numel(), dim, generator=g)
    isolated = torch.rand(num_rows, generator=g) < isolated_fraction
    logits[isolated] = 3.0 * torch.randn(int(isolated.sum()), dim, generator=g)
    emb = torch.softmax(logits, dim=1)
    emb[torch.arange(num_rows), labels] -= 1.0
    return emb, labels, isolated


def digits_embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient embeddings of a small MLP trained (full batch, 300 steps) on sklearn's digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        emb = torch.softmax(model(x), dim=1)
    emb[torch.arange(len(y)), y] -= 1.0
    return emb, y


# --------------------------------------------------------------------------- measurement


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"{field}:\s+(\d+)", fh.read())
    return int(match.group(1)) if match else 0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences C++ output on file descriptors 1 and 2 (submodlib prints a progress bar)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """Runs ``fn``; returns (result, wall s, CPU s of this process, peak RSS growth in MiB)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap memory back, so it counts again
    can_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        can_reset = False
    start_rss = _rss_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (_rss_kib("VmHWM") - start_rss) / 1024 if can_reset else float("nan")
    return out, wall, cpu, peak


def reference_dropped(emb: np.ndarray, labels: np.ndarray, fraction: float, threshold: int = 1) -> np.ndarray:
    """The EPIC reference's selection (submodlib lazy greedy + argmax assignment), per class."""
    from submodlib import FacilityLocationFunction

    dropped = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        x = emb[rows]
        budget = class_budget(fraction, len(rows))
        obj = FacilityLocationFunction(n=len(rows), mode="dense", data=x, metric="euclidean")
        with _quiet():
            greedy = obj.maximize(
                budget=budget,
                optimizer="LazyGreedy",
                stopIfZeroGain=False,
                stopIfNegativeGain=False,
                verbose=False,
            )
        order = np.array([int(i) for i, _ in greedy])
        assign = np.argmax(obj.sijs[:, order], axis=1)
        sizes = np.bincount(assign, minlength=len(order))
        dropped.append(rows[sizes[assign] <= threshold])
    return np.sort(np.concatenate(dropped))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A & B| / |A | B| of two index sets (1.0 when both are empty)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


# --------------------------------------------------------------------------- cases


def run_case(
    name: str,
    emb: torch.Tensor,
    labels: torch.Tensor,
    fractions: list[float],
    *,
    reference: bool,
    repeats: int,
    device: str,
    isolated: torch.Tensor | None = None,
    greedy: str = "lazy",
) -> list[dict[str, Any]]:
    """Reference vs ours on one embedding matrix for each fraction; prints one line per fraction."""
    rows = []
    emb_np = emb.numpy().astype(np.float32)
    lab_np = labels.numpy()
    emb_dev = emb.to(device)
    lab_dev = labels.to(device)
    for fraction in fractions:
        row: dict[str, Any] = {
            "case": name,
            "rows": len(labels),
            "dim": emb.shape[1],
            "fraction": fraction,
            "greedy": greedy,
        }
        ref = None
        if reference:
            ref, row["ref_wall_s"], row["ref_cpu_s"], row["ref_peak_mib"] = measure(
                lambda f=fraction: reference_dropped(emb_np, lab_np, f)
            )
        runs = []
        for _ in range(repeats):

            def ours(f: float = fraction) -> Any:
                res = find_isolated(emb_dev, lab_dev, f, greedy=greedy)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                return res

            runs.append(measure(ours))
        # the run with the median wall time (the upper median for an even count) stands for ours
        runs_by_wall = sorted(runs, key=lambda run: run[1])
        res, row["ours_wall_s"], row["ours_cpu_s"], _ = runs_by_wall[len(runs) // 2]
        row["ours_peak_mib"] = max(run[3] for run in runs)
        row["ours_walls_s"] = [round(run[1], 3) for run in runs]
        row["num_dropped"] = int(res.dropped.numel())
        line = (
            f"{name:9s} N={len(labels):>7,d} D={emb.shape[1]:>3d} fraction={fraction:.1f} {greedy}  "
            f"ours {row['ours_wall_s']:7.2f}s wall {row['ours_cpu_s']:7.2f}s cpu "
            f"peak +{row['ours_peak_mib']:7.1f} MiB  dropped {row['num_dropped']:>5d}"
        )
        if repeats > 1:
            line += f"  (median of {repeats}: {', '.join(f'{w:.2f}' for w in row['ours_walls_s'])} s)"
        if isolated is not None:
            found = int(isolated[res.dropped].sum())
            row["isolated_found"] = f"{found}/{int(isolated.sum())}"
            line += f" (planted isolated found {row['isolated_found']})"
        if ref is not None:
            row["speedup_wall"] = row["ref_wall_s"] / row["ours_wall_s"]
            row["speedup_cpu"] = row["ref_cpu_s"] / row["ours_cpu_s"]
            row["jaccard"] = jaccard(ref, res.dropped.numpy())
            row["ref_num_dropped"] = len(ref)
            line += (
                f"\n{'':9s} reference {row['ref_wall_s']:7.2f}s wall {row['ref_cpu_s']:7.2f}s cpu "
                f"peak +{row['ref_peak_mib']:7.1f} MiB  dropped {len(ref):>5d}"
                f"\n{'':9s} RATIO reference/ours: wall {row['speedup_wall']:6.1f}x  cpu {row['speedup_cpu']:6.1f}x"
                f"  Jaccard(dropped) {row['jaccard']:.4f}"
            )
        print(line, flush=True)
        rows.append(row)
    return rows


def scores_case(
    emb: torch.Tensor, labels: torch.Tensor, fractions: list[float], repeats: int, device: str
) -> list[dict[str, Any]]:
    """What the isolation scores that every EPIC round records add to its selection: ``find_isolated``
    with and without ``isolation_scores``, alternating, median wall time of each; same dropped rows."""
    rows = []
    emb, labels = emb.to(device), labels.to(device)
    for fraction in fractions:
        walls: dict[bool, list[float]] = {False: [], True: []}
        dropped = {}
        for r in range(repeats):
            for scores in (False, True) if r % 2 == 0 else (True, False):
                res, wall, _, _ = measure(
                    lambda s=scores, f=fraction: find_isolated(emb, labels, f, isolation_scores=s)
                )
                walls[scores].append(wall)
                dropped[scores] = res.dropped.cpu()
        assert torch.equal(dropped[False], dropped[True]), "the scores changed the dropped rows"
        plain, scored = statistics.median(walls[False]), statistics.median(walls[True])
        row = {
            "case": "scores", "rows": int(labels.numel()), "fraction": fraction, "num_dropped": int(dropped[True].numel()),
            "plain_wall_s": plain, "scores_wall_s": scored, "ratio": scored / plain,
        }  # fmt: skip
        print(
            f"scores    N={row['rows']:>7,d} fraction={fraction:.1f} dropped {row['num_dropped']:>5d}  "
            f"without scores {plain:6.2f}s  with {scored:6.2f}s  RATIO {row['ratio']:.2f}x (median of {repeats})",
            flush=True,
        )
        rows.append(row)
    return rows


def million_case(rows: int, check_rows: int, device: str) -> list[dict[str, Any]]:
    """One class of ``rows`` rows (D = 10, fraction 0.1) with stochastic greedy, then its check.

    The check: on a random subsample of ``check_rows`` rows of the same class, stochastic and
    exact (lazy) greedy are both run; printed are the Jaccard overlap of their dropped sets and
    how many of the subsample's planted isolated rows each drops.
    """
    emb, _, iso = make_gradient_embeddings(rows, 10, 10, seed=2)
    labels = torch.zeros(rows, dtype=torch.long)
    print(
        f"million: one class of {rows:,d} rows, {class_budget(0.1, rows):,d} medoids, stochastic", flush=True
    )
    out = run_case(
        "million",
        emb,
        labels,
        [0.1],
        reference=False,
        repeats=1,
        device=device,
        isolated=iso,
        greedy="stochastic",
    )
    out[0]["process_peak_mib"] = _rss_kib("VmHWM") / 1024
    print(f"{'':9s} process peak resident size {out[0]['process_peak_mib']:.0f} MiB", flush=True)
    sub = torch.randperm(rows, generator=torch.Generator().manual_seed(0))[:check_rows].sort().values
    e, lab, planted = emb[sub].to(device), labels[sub].to(device), iso[sub]
    exact = find_isolated(e, lab, 0.1, greedy="lazy")
    stoch = find_isolated(e, lab, 0.1, greedy="stochastic")
    check = {
        "case": "million-check",
        "rows": check_rows,
        "jaccard_vs_exact": jaccard(exact.dropped.numpy(), stoch.dropped.numpy()),
        "exact_dropped": int(exact.dropped.numel()),
        "stochastic_dropped": int(stoch.dropped.numel()),
        "planted": int(planted.sum()),
        "exact_planted_found": int(planted[exact.dropped].sum()),
        "stochastic_planted_found": int(planted[stoch.dropped].sum()),
        "exact_s": exact.seconds,
        "stochastic_s": stoch.seconds,
    }
    print(
        f"{'':9s} check on a subsample of {check_rows:,d} rows: Jaccard(stochastic, exact) "
        f"{check['jaccard_vs_exact']:.4f}, dropped {check['stochastic_dropped']} vs {check['exact_dropped']}, "
        f"planted isolated found {check['stochastic_planted_found']} vs {check['exact_planted_found']} "
        f"of {check['planted']} (exact {exact.seconds:.1f} s, stochastic {stoch.seconds:.1f} s)",
        flush=True,
    )
    return [*out, check]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="digits,cifar10,cifar512,large", help="comma-separated case names")
    parser.add_argument("--fractions", default="0.1,0.2,0.3")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of ours per case and fraction; the median run is reported, with every run's wall time",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip submodlib")
    parser.add_argument("--device", default="cpu", help="where our selection runs (cpu or cuda)")
    parser.add_argument("--large-rows", type=int, default=200_000)
    parser.add_argument(
        "--large-greedy",
        default="stochastic",
        choices=("stochastic", "lazy"),
        help="optimiser for the large case (exact greedy: under 2 minutes at 200,000 rows on two CPU cores)",
    )
    parser.add_argument(
        "--million-rows", type=int, default=1_000_000, help="rows of the one class of the 'million' case"
    )
    parser.add_argument(
        "--check-rows",
        type=int,
        default=20_000,
        help="'million' case: rows of the random subsample on which stochastic greedy is checked against exact greedy",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    cases = args.cases.split(",")
    reference = not args.no_reference
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    results: list[dict[str, Any]] = []
    for case in cases:
        if case == "digits":
            emb, labels = digits_embeddings()
            results += run_case(
                "digits",
                emb,
                labels,
                fractions,
                reference=reference,
                repeats=args.repeats,
                device=args.device,
            )
        elif case in ("cifar10", "cifar512"):
            dim = 10 if case == "cifar10" else 512
            emb, labels, iso = make_gradient_embeddings(50_000, 10, dim, seed=0)
            results += run_case(
                case,
                emb,
                labels,
                fractions,
                reference=reference,
                repeats=args.repeats,
                device=args.device,
                isolated=iso,
            )
        elif case in ("large", "large-exact"):
            greedy = "lazy" if case == "large-exact" else args.large_greedy
            emb, _, iso = make_gradient_embeddings(args.large_rows, 10, 10, seed=1)
            labels = torch.zeros(args.large_rows, dtype=torch.long)  # one class
            budget = class_budget(0.1, args.large_rows)
            print(
                f"{case}: one class of {args.large_rows:,d} rows, {budget:,d} medoids, {greedy}", flush=True
            )
            results += run_case(
                case,
                emb,
                labels,
                [0.1],
                reference=False,
                repeats=1,
                device=args.device,
                isolated=iso,
                greedy=greedy,
            )
        elif case == "million":
            results += million_case(args.million_rows, args.check_rows, args.device)
        elif case == "scores":
            emb, labels, _ = make_gradient_embeddings(50_000, 10, 10, seed=0)
            results += scores_case(emb, labels, fractions, args.repeats, args.device)
        else:
            parser.error(f"unknown case {case!r}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                results, fh, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
