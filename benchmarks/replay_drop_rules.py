"""Replay drop rules on the isolation evidence of recorded EPIC runs: which poisons and clean rows each
rule and setting would drop, from the same rounds' isolated rows and scores.

Every EPIC run keeps each round's isolated rows and their isolation scores in ``epic_state.json``
(dropped rows are still embedded and clustered, so the evidence covers every row in every round). This
script reads the reference EPIC runs of benchmark folders (``runs/<attack>/trial_<t>/<defense>/``), the
poisons of each trial (``poisons/<attack>/trial_<t>/``), and runs the registered drop rules of
:mod:`hf_epic.drop_rules` round by round over that evidence. It is how a rule's setting is chosen from
the data of some trials before it is scored on others: the replay is exact for the first round and an
approximation afterwards, because the recorded model was trained without the rows the reference rule
had dropped (a row dropped early tends to stay isolated).

    python benchmarks/replay_drop_rules.py docs/results/fashion_mnist/transfer_eps8 \\
        docs/results/fashion_mnist/scratch_gm_eps16 --trials 0-11
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from hf_epic.drop_rules import RoundEvidence, apply_drop_rule, get_drop_rule
from hf_epic.experiments.args import parse_trials

CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("first_isolation", {}),
    ("persistent", {"persistence": 2}),
    ("persistent", {"persistence": 3}),
    ("persistent", {"persistence": 4}),
    ("ranked", {"rank_share": 0.005}),
    ("ranked", {"rank_share": 0.01}),
    ("ranked", {"rank_share": 0.02}),
    ("ranked", {"rank_share": 0.05}),
)
"""Rules and settings replayed (the reference rule first)."""


def _label(rule: str, options: dict[str, Any]) -> str:
    return rule + "".join(f", {k.replace('_', ' ')} {v}" for k, v in options.items())


def replay(state: dict[str, Any], labels: torch.Tensor, rule: str, options: dict[str, Any]) -> set[int]:
    """The rows ``rule`` drops over a run's recorded rounds (cumulative, as EPIC drops)."""
    drop_rule = get_drop_rule(rule, **options)
    history: list[RoundEvidence] = []
    dropped = torch.empty(0, dtype=torch.long)
    for index, record in enumerate(state["rounds"]):
        evidence = RoundEvidence.from_record(record, index)
        if evidence is None:
            continue
        newly = apply_drop_rule(drop_rule, evidence, history, labels, dropped)
        dropped = torch.cat([dropped, newly]).sort().values
        history.append(evidence)
    return set(dropped.tolist())


def runs(folder: Path, defense: str, trials: list[int]) -> list[tuple[str, int, Path, Path]]:
    """(attack, trial, state file, poisons folder) of the folder's recorded runs with evidence."""
    found = []
    for state in sorted(folder.glob(f"runs/*/trial_*/{defense}/epic_state.json")):
        attack, trial = state.parents[2].name, int(state.parents[1].name.split("_")[1])
        poisons = folder / "poisons" / attack / f"trial_{trial:03d}"
        if trial in trials and poisons.is_dir():
            found.append((attack, trial, state, poisons))
    return found


def main(argv: list[str] | None = None) -> int:
    """Print one Markdown table per (folder, attack): poisons and clean rows each rule would drop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="benchmark output folders")
    parser.add_argument("--trials", default="0-11", help="trials to read (count N, range a-b, list a,b,c)")
    parser.add_argument("--defense", default="epic-0.2", help="the recorded EPIC runs to replay")
    parser.add_argument("--output_json", type=Path, help="also write the tables' numbers to this JSON file")
    args = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    trials = parse_trials(args.trials)
    tables: list[dict[str, Any]] = []
    for folder in args.folders:
        totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        counted: dict[str, int] = defaultdict(int)
        for attack, _trial, state_path, poisons in runs(folder, args.defense, trials):
            state = json.loads(state_path.read_text())
            if not any(r.get("isolated_rows") is not None for r in state["rounds"]):
                continue  # written before the evidence was kept
            spec = json.loads((poisons / "poison_spec.json").read_text())
            labels = torch.tensor(datasets.load_from_disk(str(poisons / "dataset"))["label"])
            poison = set(spec["poison_indices"])
            clean_rows = int(labels.numel()) - len(poison)
            if replay(state, labels, "first_isolation", {}) != set(state["dropped"]):
                raise ValueError(
                    f"{state_path}: the replayed reference rule does not give the recorded drops."
                )
            counted[attack] += 1
            for rule, options in CANDIDATES:
                dropped = replay(state, labels, rule, options)
                stats = totals[attack][_label(rule, options)]
                stats.append(
                    (len(dropped & poison) / max(1, len(poison)), len(dropped - poison) / clean_rows)
                )
        for attack, by_rule in totals.items():
            table = {
                "folder": folder.as_posix(), "attack": attack, "defense": args.defense, "trials": args.trials,
                "runs": counted[attack], "rules": [],
            }  # fmt: skip
            for (rule, options), stats in zip(CANDIDATES, by_rule.values()):
                table["rules"].append(
                    {
                        "rule": rule, "options": options,
                        "poisons_dropped": sum(p for p, _ in stats) / len(stats),
                        "clean_dropped": sum(c for _, c in stats) / len(stats),
                    }
                )  # fmt: skip
            tables.append(table)
            print("\n" + "\n".join(replay_table(table)))
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(tables, indent=1) + "\n")
    return 0


def replay_table(table: dict[str, Any]) -> list[str]:
    """A replay's Markdown table (its title line, a blank line, the table)."""
    lines = [
        f"{table['folder']} · {table['attack']} · {table['runs']} trials ({table['defense']} runs replayed)",
        "",
        "| rule | poisons dropped | clean rows dropped | enrichment (poison share / clean share) |",
        "|---|---|---|---|",
    ]
    for row in table["rules"]:
        poisons_share, clean_share = row["poisons_dropped"], row["clean_dropped"]
        ratio = "–" if clean_share == 0 else f"{poisons_share / clean_share:.2f}"
        lines.append(
            f"| {_label(row['rule'], row['options'])} | {100 * poisons_share:.1f} % | {100 * clean_share:.2f} % | {ratio} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
