"""Score EPIC's alternative drop rules against the reference rule on trials they were not chosen on, and
write the results page.

The protocol, fixed before the scoring runs:

1. Each rule's setting is chosen from the isolation evidence of the reference EPIC-0.2 runs of trials
   0-11 only (``benchmarks/replay_drop_rules.py`` on the Fashion-MNIST cells); the chosen settings are
   the benchmark defenses ``epic-0.2-persistent`` and ``epic-0.2-ranked``.
2. They are scored on trials 12-35, which no choice looked at, in three settings of the Fashion-MNIST
   grid (:data:`SCORING`, the grid's own flags): Bullseye Polytope in transfer at 8/255, gradient
   matching from scratch at 16/255, and BadNets, each time with the attacker's own seed.
3. Each rule is compared with reference EPIC-0.2 on the same trials (same poisons, same training seed):
   attack success (targeted attacks: targets saved / lost, exact McNemar; BadNets: trials with a lower /
   higher triggered success rate, exact sign test), clean accuracy, poisons and clean rows dropped.
4. The default drop rule changes only if a rule, in at least two attacks, drops at most half of
   EPIC-0.2's clean rows with attack success not significantly higher (p > 0.1) and clean accuracy at
   least as high; the page evaluates that rule from the records.

Commands (from the repository root):

    # the scoring runs (resuming); two processes on disjoint trials use both cores; the last writes the page
    python benchmarks/drop_rules_page.py --trials 12-23 &
    python benchmarks/drop_rules_page.py --trials 24-35

    # the page from the records already there
    python benchmarks/drop_rules_page.py --report_only
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist_page import (  # noqa: E402
    ALL_DEFENSES,
    CELLS,
    _asr,
    _name,
    _pct,
    benchmark_command,
    epic_effect,
    parse_command,
    run_parsed,
)

from hf_epic.experiments import BenchmarkArguments, BenchmarkConfig  # noqa: E402
from hf_epic.experiments.args import parse_trials  # noqa: E402
from hf_epic.experiments.benchmark import RESULTS_FILE, ResultStore  # noqa: E402
from hf_epic.experiments.defenses import get_defense  # noqa: E402
from hf_epic.experiments.report import paired_targets, summarize  # noqa: E402
from hf_epic.significance import mcnemar_exact  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

REFERENCE = "epic-0.2"
RULES = ("epic-0.2-persistent", "epic-0.2-ranked")


@dataclass(frozen=True)
class Scoring:
    """One scoring setting: a grid cell's flags with the scoring defenses (and changes to its flags)."""

    cell: str
    attack: str
    defenses: tuple[str, ...]
    replace: tuple[tuple[str, str], ...] = ()
    setting: str | None = None  # the cell's description, when the changes make it differ

    def describe(self) -> str:
        text = self.setting or CELLS[self.cell].setting
        return text[0].upper() + text[1:]

    def flags(self) -> str:
        flags = CELLS[self.cell].flags.replace(
            f"--defenses {ALL_DEFENSES}", f"--defenses {' '.join(self.defenses)}"
        )
        for old, new in self.replace:
            assert old in flags, (self.cell, old)
            flags = flags.replace(old, new)
        return flags


SCORING: dict[str, Scoring] = {
    "transfer_bp_eps8": Scoring(
        "transfer_eps8", "bullseye_polytope", ("none", REFERENCE, *RULES),
        replace=(("--attacks bullseye_polytope feature_collision", "--attacks bullseye_polytope"),),
    ),
    "scratch_gm_eps16": Scoring("scratch_gm_eps16", "gradient_matching", (REFERENCE, *RULES)),
    "badnets": Scoring(
        "badnets", "badnets", (REFERENCE, *RULES),
        replace=(("--attacks badnets", "--attack_seed_offset 1000000 --attacks badnets"),),
        setting=CELLS["badnets"].setting.replace("the attack's seed is the trial's", "the attacker's own seed"),
    ),
}  # fmt: skip
"""The scoring settings, in the order they run (the cheapest first)."""


@dataclass
class ScoringArguments:
    """Which settings and trials to run, and where the records and the page are."""

    trials: str = field(
        default="12-35", metadata={"help": "Scoring trials: range a-b, list a,b,c or count N."}
    )
    settings: list[str] = field(
        default_factory=lambda: list(SCORING), metadata={"help": "Settings to run.", "choices": list(SCORING)}
    )
    output_dir: str = field(
        default="docs/results/drop_rules", metadata={"help": "Folder of the settings' folders."}
    )
    page: str = field(default="docs/results/drop_rules.md", metadata={"help": "The page to write."})
    expected_trials: str = field(default="12-35", metadata={"help": "The trials a finished setting has."})
    report_only: bool = field(
        default=False, metadata={"help": "Run nothing; write the page from the records."}
    )
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads."})


def scoring_command(name: str, trials: str = "12-35", output_dir: str = "docs/results/drop_rules") -> str:
    """The ``recipes/benchmark.py`` command of a scoring setting."""
    return benchmark_command(SCORING[name].flags(), trials, f"{output_dir}/{name}")


def parse_setting(name: str, trials: str, output_dir: str) -> tuple[BenchmarkArguments, BenchmarkConfig]:
    """The setting's command parsed by the benchmark's own parser."""
    return parse_command(scoring_command(name, trials, output_dir))


def run_settings(args: ScoringArguments) -> None:
    """Run the missing scoring trials of the selected settings."""
    torch.set_num_threads(args.num_threads)
    for name in args.settings:
        grid, config = parse_setting(name, args.trials, args.output_dir)
        print(f"== {name}: {scoring_command(name, args.trials, args.output_dir)}", flush=True)
        run_parsed(grid, config)


def against_reference(records: Sequence[Mapping[str, Any]], defense: str) -> dict[str, Any]:
    """``defense`` against EPIC-0.2 on the trials both ran: saved (attack success lower than under EPIC-0.2)
    and lost (higher), per target for targeted attacks, per trial's triggered success rate for a backdoor,
    with the exact two-sided McNemar / sign-test p-value; clean accuracy and clean rows dropped, paired."""
    ours = {r["trial"]: r for r in records if r["defense"] == defense}
    theirs = {r["trial"]: r for r in records if r["defense"] == REFERENCE}
    trials = sorted(set(ours) & set(theirs))
    pairs = paired_targets([ours[t] for t in trials], [theirs[t] for t in trials])
    if pairs:  # targeted: per target, (landed in the poison class here, under EPIC-0.2)
        saved = sum(ref and not hit for hit, ref in pairs)
        lost = sum(hit and not ref for hit, ref in pairs)
    else:  # backdoor: per trial, the triggered success rates
        rates = [
            (ours[t]["num_success"] / max(1, ours[t]["num_evaluated"]),
             theirs[t]["num_success"] / max(1, theirs[t]["num_evaluated"]))
            for t in trials
        ]  # fmt: skip
        saved = sum(rate < ref for rate, ref in rates)
        lost = sum(rate > ref for rate, ref in rates)
    n = len(trials)
    clean = sum(ours[t]["clean_dropped"] for t in trials) / max(1, n)
    clean_ref = sum(theirs[t]["clean_dropped"] for t in trials) / max(1, n)
    accuracy = sum(ours[t]["clean_accuracy"] for t in trials) / max(1, n)
    accuracy_ref = sum(theirs[t]["clean_accuracy"] for t in trials) / max(1, n)
    p = mcnemar_exact(saved, lost)
    return {
        "trials": n, "saved": saved, "lost": lost, "p": p,
        "clean_dropped_ratio": clean / clean_ref if clean_ref else math.nan,
        "accuracy_change": accuracy - accuracy_ref,
        "meets": bool(n) and clean <= 0.5 * clean_ref and not (lost > saved and p <= 0.1)
        and accuracy >= accuracy_ref,
    }  # fmt: skip


def setting_table(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One scoring setting's Markdown table: a row per defense, the rules compared with EPIC-0.2."""
    lines = [
        "| defense | drop rule | trials | attack success (95 % interval) | saved / lost vs EPIC-0.2, p "
        "| clean acc. | poisons dropped | clean rows dropped (vs EPIC-0.2) | s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        defense = row["defense"]
        settings = dict(get_defense(defense).epic_settings) if defense != "none" else {}
        rule = (
            "–" if defense == "none"
            else ", ".join([settings.pop("epic_drop_rule", "first_isolation")]
                           + [f"{k.removeprefix('epic_drop_').replace('_', ' ')} {v}" for k, v in settings.items()])
        )  # fmt: skip
        versus, ratio = "–", ""
        if defense in RULES:
            cmp = against_reference(records, defense)
            versus = f"{cmp['saved']} / {cmp['lost']}, p = {cmp['p']:.2g}"
            ratio = f" ({cmp['clean_dropped_ratio']:.2f}x)"
        poisons = "–" if defense == "none" else (
            f"{row['poisons_dropped']:.1f} of {row['num_poisons']:.0f} ({_pct(row['poison_recall'], 0)})"
        )  # fmt: skip
        clean = "–" if defense == "none" else _pct(row["clean_dropped_fraction"]) + ratio
        lines.append(
            f"| {defense} | {rule} | {row['trials']} | {_asr(row)} | {versus} | {_pct(row['clean_accuracy'])} "
            f"| {poisons} | {clean} | {row['wall_seconds']:.0f} |"
        )
    return lines


def grid_context(setting: Scoring, grid_dir: Path = ROOT / "docs/results/fashion_mnist") -> list[str]:
    """One sentence from the grid cell's own records (trials 0-11): what EPIC-0.2 does there against no
    defense, so each setting shows whether there is a defense for a rule to keep."""
    records = [
        r
        for r in ResultStore(grid_dir / setting.cell / RESULTS_FILE).records.values()
        if r["attack"] == setting.attack
    ]
    by = {r["defense"]: r for r in summarize(records)} if records else {}
    none, epic = by.get("none"), by.get(REFERENCE)
    if none is None or epic is None:
        return []
    return [
        f"In the grid's own cell ([fashion_mnist.md](fashion_mnist.md), trials 0-{epic['trials'] - 1}) EPIC-0.2 "
        f"{epic_effect(none, epic)} against no defense."
    ]


def choice_section(path: Path) -> list[str]:
    """The replayed tables the settings were chosen from (``replay_drop_rules.py --output_json``)."""
    import replay_drop_rules

    if not path.is_file():
        return [f"(`{path}` is missing: run the replay command above.)"]
    tables = json.loads(path.read_text())
    lines: list[str] = []
    for table in tables:
        lines += replay_drop_rules.replay_table(table) + [""]
    chosen = [
        f"`{rule}`, "
        + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in options.items())
        + f" ({score:.2f})"
        for rule, (options, score) in chosen_settings(tables).items()
    ]
    lines += [
        "Each rule's setting is the one with the highest mean enrichment (poison share over clean share "
        f"dropped) over the scored attacks' tables: {'; '.join(chosen)}.",
        "",
    ]
    return lines


def chosen_settings(tables: Sequence[Mapping[str, Any]]) -> dict[str, tuple[dict[str, Any], float]]:
    """Per alternative rule: the replayed setting with the highest mean enrichment over the tables of the
    scored attacks, and that mean."""
    attacks = {s.attack for s in SCORING.values()}
    scores: dict[tuple[str, str], list[float]] = {}
    options: dict[tuple[str, str], dict[str, Any]] = {}
    for table in tables:
        if table["attack"] not in attacks:
            continue
        for row in table["rules"]:
            if row["rule"] == "first_isolation" or not row["clean_dropped"]:
                continue
            key = (row["rule"], json.dumps(row["options"], sort_keys=True))
            scores.setdefault(key, []).append(row["poisons_dropped"] / row["clean_dropped"])
            options[key] = row["options"]
    best: dict[str, tuple[dict[str, Any], float]] = {}
    for (rule, _), values in scores.items():
        mean = sum(values) / len(values)
        if rule not in best or mean > best[rule][1]:
            best[rule] = (options[(rule, _)], mean)
    return best


def decision(verdicts: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """Per rule: the settings where it meets the bar, those where it loses significantly, and whether the
    default changes (it meets the bar in two attacks and loses significantly in none)."""
    lines = []
    for rule in RULES:
        by_setting = {
            name: by_rule[rule] for name, by_rule in verdicts.items() if by_rule.get(rule, {}).get("trials")
        }
        met = [name for name, v in by_setting.items() if v["meets"]]
        worse = [name for name, v in by_setting.items() if v["lost"] > v["saved"] and v["p"] <= 0.1]
        qualifies = len({SCORING[n].attack for n in met}) >= 2
        line = f"- `{rule}` meets the bar in {len(met)} of {len(by_setting)} scored settings"
        line += f" ({', '.join(met)})" if met else ""
        if worse:
            line += "; its attack success is significantly higher than EPIC-0.2's in " + ", ".join(
                f"{n} ({by_setting[n]['saved']} saved / {by_setting[n]['lost']} lost, p = {by_setting[n]['p']:.2g})"
                for n in worse
            )
        if qualifies and not worse:
            line += ": it qualifies to become the default."
        elif qualifies:
            line += ": it clears the bar, but it gives up the defense where EPIC-0.2 has one, so the default stays."
        else:
            line += ": the default stays `first_isolation`."
        lines.append(line)
    return lines


def write_page(args: ScoringArguments) -> str:
    """Write the results page from the records and the replay choice; return it."""
    out = Path(args.output_dir)
    expected = len(parse_trials(args.expected_trials))
    lines = PAGE_HEAD.splitlines() + [""] + choice_section(out / "choice.json")
    lines += ["## Scoring (trials 12-35)", ""]
    verdicts: dict[str, dict[str, dict[str, Any]]] = {}
    unfinished = []
    for name, setting in SCORING.items():
        records = list(ResultStore(out / name / RESULTS_FILE).records.values())
        cell = CELLS[setting.cell]
        lines += [
            f"### {cell.title}: {_name(setting.attack)}",
            "",
            f"{setting.describe()}. Records: [`drop_rules/{name}/`](drop_rules/{name}/).",
            "",
            "```bash",
            scoring_command(name, args.expected_trials, args.output_dir),
            "```",
            "",
        ]
        if not records:
            lines += ["Not run yet.", ""]
            unfinished.append(name)
            continue
        rows = summarize(records)
        lines += setting_table(rows, records) + [""] + grid_context(setting) + [""]
        verdicts[name] = {rule: against_reference(records, rule) for rule in RULES}
        if any(r["trials"] < expected for r in rows):
            unfinished.append(name)
    lines += ["## The default", "", DECISION_TEXT, "", *decision(verdicts), ""]
    if unfinished:
        lines += [f"Unfinished (below {expected} trials per defense): {', '.join(unfinished)}.", ""]
    page = "\n".join(lines).rstrip() + "\n"
    Path(args.page).write_text(page)
    return page


PAGE_HEAD = """# Results: EPIC's drop rules, scored on trials they were not chosen on

EPIC's reference rule (`first_isolation`) drops a row the first time it is a singleton medoid. The
alternatives in `hf_epic/drop_rules.py` drop fewer rows: `persistent` only rows isolated in
consecutive rounds, `ranked` only the most isolated rows of a class per round. This page compares
them with reference EPIC-0.2 on Fashion-MNIST (`vit-p7`, one CPU thread, the settings of
[fashion_mnist.md](fashion_mnist.md)): each rule's one setting was fixed from the reference runs of
trials 0-11 before any scoring run, and it is scored on trials 12-35. The page
is written from the records by one command (it runs the missing trials first; two processes on
disjoint trials use both cores):

```bash
python benchmarks/drop_rules_page.py --trials 12-23 & python benchmarks/drop_rules_page.py --trials 24-35
```

## The choice (trials 0-11)

Every EPIC run keeps each round's isolated rows and their isolation scores, so any rule can be replayed
on the reference runs' evidence (exact in the first round, approximate later, since the recorded model
trained without the reference's drops). The replay of the EPIC-0.2 runs of trials 0-11, from
`python benchmarks/replay_drop_rules.py docs/results/fashion_mnist/transfer_eps8
docs/results/fashion_mnist/scratch_gm_eps16 --trials 0-11 --output_json docs/results/drop_rules/choice.json`:
"""

DECISION_TEXT = """A rule meets the bar in a setting when, on the scoring trials, it drops at most half of EPIC-0.2's
clean rows, its attack success is not significantly higher (saved / lost above: McNemar over targets,
or a sign test over trials' triggered success for BadNets; higher only counts at p <= 0.1), and its
mean clean accuracy is at least EPIC-0.2's. The default drop rule changes only for a rule that meets it
in at least two attacks. The bar is necessary, not sufficient: a rule whose attack success is also
significantly higher than EPIC-0.2's in some scored setting (p <= 0.1) would trade the defense where it
works for savings where it does not, and does not become the default either."""


def main(argv: list[str] | None = None) -> int:
    """Run the missing scoring trials (unless ``--report_only``), then write the page."""
    (args,) = HfArgumentParser(ScoringArguments).parse_args_into_dataclasses(args=argv)
    parse_trials(args.trials)  # a bad --trials fails before any work
    if not args.report_only:
        run_settings(args)
    write_page(args)
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
