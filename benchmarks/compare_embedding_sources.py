"""EPIC's two embedding sources side by side on the poisoning benchmark: the eval pass against the
training pass (``epic_embedding_source``), on the same trials, attacks and poisons.

Each mode runs ``none`` and ``epic-0.2`` through :func:`hf_epic.experiments.run_benchmark` into its own
folder (``<output_dir>/eval_pass``, ``<output_dir>/training_pass``; the poisons and the undefended runs
are the same in both). The report pairs the two EPIC runs of every trial: the Jaccard index of their
dropped sets, the poisons and clean rows each dropped, attack success and clean accuracy.

    # both modes in one process, then the report
    .venv/bin/python benchmarks/compare_embedding_sources.py --trials 12 --output_dir bench_out/sources
    # or one process per mode (two cores), then the report alone
    .venv/bin/python benchmarks/compare_embedding_sources.py --modes eval_pass --output_dir bench_out/sources &
    .venv/bin/python benchmarks/compare_embedding_sources.py --modes training_pass --output_dir bench_out/sources
    .venv/bin/python benchmarks/compare_embedding_sources.py --report_only --output_dir bench_out/sources

Any ``BenchmarkConfig`` flag (``--dataset_name``, ``--max_train_rows``, ...) sets both modes' cells.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_epic.epic_config import EMBEDDING_SOURCE_CHOICES
from hf_epic.experiments import BenchmarkConfig, run_benchmark
from hf_epic.experiments.args import parse_trials
from hf_epic.experiments.benchmark import RESULTS_FILE, ResultStore
from hf_epic.significance import mcnemar_exact

DEFENSES = ("none", "epic-0.2")  # the report pairs the EPIC-0.2 runs; "none" gives the undefended context


@dataclass
class CompareArguments:
    """The grid and where the two folders go."""

    output_dir: str = field(default="bench_out/embedding_sources", metadata={"help": "Parent folder."})
    trials: str = field(default="12", metadata={"help": "Count N, range a-b, or list a,b,c."})
    attacks: list[str] = field(
        default_factory=lambda: ["badnets", "gradient_matching"], metadata={"help": "Attacks to run."}
    )
    defenses: list[str] = field(
        default_factory=lambda: list(DEFENSES),
        metadata={
            "help": "Defenses each mode runs: the report needs epic-0.2; none adds the undefended runs "
            "(leave it out when the same grid's none runs are recorded elsewhere).",
            "choices": list(DEFENSES),
        },
    )
    modes: list[str] = field(
        default_factory=lambda: list(EMBEDDING_SOURCE_CHOICES),
        metadata={"help": "Modes to run now.", "choices": list(EMBEDDING_SOURCE_CHOICES)},
    )
    report_only: bool = field(
        default=False, metadata={"help": "Run nothing; write the report from the folders."}
    )
    num_threads: int = field(default=1, metadata={"help": "torch threads."})


def _dropped(folder: Path, attack: str, trial: int) -> set[int] | None:
    """The rows the trial's EPIC-0.2 run dropped, from its ``epic_state.json``."""
    path = folder / "runs" / attack / f"trial_{trial:03d}" / "epic-0.2" / "epic_state.json"
    return set(json.loads(path.read_text())["dropped"]) if path.is_file() else None


def report(out: Path, trials: list[int], attacks: list[str]) -> str:
    """The paired comparison as Markdown (also written to ``<out>/comparison.md`` and ``.json``).

    The paired p-value is the exact two-sided McNemar test over the targets a targeted attack reached
    under one mode only, and for a backdoor the exact sign test over the trials whose attack success
    differs between the modes.
    """
    folders = {mode: out / mode for mode in EMBEDDING_SOURCE_CHOICES}
    records = {mode: ResultStore(folder / RESULTS_FILE).records for mode, folder in folders.items()}
    rows, summary, missing = [], {}, []
    for attack in attacks:
        per = {m: {"asr": [], "acc": [], "poisons": [], "clean": [], "num_poisons": []} for m in folders}
        jaccards, first_only, second_only = [], 0, 0
        for trial in trials:
            key = f"trial={trial}|attack={attack}|defense=epic-0.2"
            cells = {m: records[m].get(key) for m in folders}
            drops = {m: _dropped(folders[m], attack, trial) for m in folders}
            if any(c is None for c in cells.values()):
                continue
            if any(d is None for d in drops.values()):  # recorded, but its run folder is not here
                missing += [str(folders[m] / "runs" / attack) for m, d in drops.items() if d is None]
                continue
            a, b = drops["eval_pass"], drops["training_pass"]
            jaccards.append(len(a & b) / len(a | b) if a | b else 1.0)
            for m, c in cells.items():
                per[m]["asr"].append(c["asr"])
                per[m]["acc"].append(c["clean_accuracy"])
                per[m]["poisons"].append(c["poisons_dropped"])
                per[m]["clean"].append(c["clean_dropped"])
                per[m]["num_poisons"].append(c["num_poisons"])
            if cells["eval_pass"].get("attack_kind") == "targeted":  # per target: landed or not
                success = {m: cells[m]["asr"] > 0.5 for m in folders}
                first_only += success["eval_pass"] and not success["training_pass"]
                second_only += success["training_pass"] and not success["eval_pass"]
            else:  # a backdoor, per trial: which mode let more triggered images through (sign test)
                first_only += cells["eval_pass"]["asr"] > cells["training_pass"]["asr"]
                second_only += cells["training_pass"]["asr"] > cells["eval_pass"]["asr"]
        n = len(jaccards)
        if not n:
            continue
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        entry = {"trials": n, "jaccard_mean": mean(jaccards), "jaccard_min": min(jaccards)}
        for m in folders:
            entry[m] = {
                "asr": mean(per[m]["asr"]),
                "clean_accuracy": mean(per[m]["acc"]),
                "poisons_dropped": sum(per[m]["poisons"]),
                "num_poisons": sum(per[m]["num_poisons"]),
                "clean_dropped": mean(per[m]["clean"]),
            }
        entry["mcnemar_p"] = mcnemar_exact(first_only, second_only)
        summary[attack] = entry
        for m in folders:
            e = entry[m]
            rows.append(
                f"| {attack} | {m} | {n} | {100 * e['asr']:.1f} | {100 * e['clean_accuracy']:.1f} | "
                f"{e['poisons_dropped']} / {e['num_poisons']} | {e['clean_dropped']:.1f} | "
                f"{entry['jaccard_mean']:.3f} (min {entry['jaccard_min']:.3f}) | {entry['mcnemar_p']:.3f} |"
            )
    if not summary:  # never overwrite a report with an empty one
        raise FileNotFoundError(
            f"No trial of {attacks} has both modes' EPIC-0.2 records and dropped rows under {out}"
            + (
                f": the run folders {sorted(set(missing))} are missing (they are not committed); rerun "
                "without --report_only to make them."
                if missing
                else ": run this script without --report_only first."
            )
        )
    text = "\n".join(
        [
            "| attack | embedding source | trials | ASR % | clean acc % | poisons dropped (all trials) | "
            "clean rows dropped / trial | Jaccard of the dropped sets (mean, min) | paired p |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    (out / "comparison.md").write_text(text + "\n")
    (out / "comparison.json").write_text(json.dumps(summary, indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the asked modes, then print the paired report."""
    grid, config = HfArgumentParser((CompareArguments, BenchmarkConfig)).parse_args_into_dataclasses(
        args=argv
    )
    torch.set_num_threads(grid.num_threads)
    trials, out = parse_trials(grid.trials), Path(grid.output_dir)
    for mode in [] if grid.report_only else grid.modes:
        config.epic_embedding_source = mode
        run_benchmark(
            config, trials=trials, attacks=grid.attacks, defenses=grid.defenses, output_dir=out / mode
        )
    print(report(out, trials, grid.attacks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
