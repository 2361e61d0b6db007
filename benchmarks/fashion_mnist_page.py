"""The Fashion-MNIST results: run the grid's cells with the benchmark, then write the results page from
their records.

Each cell is one ``recipes/benchmark.py`` command (a folder under ``--output_dir`` with its
``results.jsonl``); :data:`CELLS` lists them. The page (``docs/results/fashion_mnist.md``) and the
results table of ``README.md`` (between its ``results:fashion_mnist`` markers) are drawn from those
records and from the demo's three runs (``<output_dir>/demo/seed_<n>.json``, the ``recipe_results.json``
of ``recipes/finetune_vit.py --seed n --attack_seed n``). A cell with fewer than ``--trials`` trials
of a defense is listed on the page as unfinished. Commands (from the repository root):

    # every cell, resuming; two processes on disjoint trials use both cores; the last writes the page
    python benchmarks/fashion_mnist_page.py --trials 0-5 &
    python benchmarks/fashion_mnist_page.py --trials 6-11

    # some cells only, or only the page from the records already there
    python benchmarks/fashion_mnist_page.py --cells transfer_eps16 transfer_eps8 --trials 0-5
    python benchmarks/fashion_mnist_page.py --report_only
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

from hf_epic.baselines import BASELINES
from hf_epic.experiments import BenchmarkArguments, BenchmarkConfig, run_benchmark
from hf_epic.experiments.args import parse_trials
from hf_epic.experiments.benchmark import RESULTS_FILE, ResultStore
from hf_epic.experiments.report import summarize
from hf_epic.significance import mcnemar_exact

ROOT = Path(__file__).resolve().parent.parent
ALL_DEFENSES = "none epic-0.1 epic-0.2 epic-0.3 random high-loss low-confidence clean-control"
DATA = "--dataset_name fashion_mnist --image_size 28 --model_kind vit-p7 --max_eval_rows 2000"
EPS = {"16": 16 / 255, "8": 8 / 255}
NAMES = {
    "bullseye_polytope": "Bullseye Polytope",
    "feature_collision": "Feature Collision",
    "gradient_matching": "gradient matching",
    "badnets": "BadNets",
    "sleeper_agent": "Sleeper Agent",
}


def _name(attack: str) -> str:
    return NAMES.get(attack, attack.replace("_", " "))


def _kwargs(attacks: Sequence[str], **values: Any) -> str:
    """``--attack_kwargs`` giving every attack in ``attacks`` the same settings."""
    return "--attack_kwargs " + shlex.quote(json.dumps({a: dict(values) for a in attacks}))


def _transfer(eps: str) -> str:
    attacks = ("bullseye_polytope", "feature_collision")
    return (
        f"{DATA} --max_train_rows 10000 --num_train_epochs 20 --backbone_epochs 12 --epic_start_epoch 1 "
        f"--epic_interval 1 --epic_stop_epoch 10 --attack_seed_offset 1000000 --attacks {' '.join(attacks)} "
        f"--defenses {ALL_DEFENSES} {_kwargs(attacks, epsilon=EPS[eps])}"
    )


def _finetune(eps: str) -> str:
    return (
        f"{DATA} --max_train_rows 5000 --num_train_epochs 10 --backbone_epochs 20 --finetune_learning_rate 1e-4 "
        "--epic_start_epoch 2 --epic_interval 1 --epic_stop_epoch 6 --attack_seed_offset 1000000 "
        f"--attacks bullseye_polytope --defenses {ALL_DEFENSES} "
        f"{_kwargs(['bullseye_polytope'], setting='finetune', epsilon=EPS[eps])}"
    )


def _scratch(attack: str, eps: str, **settings: Any) -> str:
    return (
        f"{DATA} --max_train_rows 5000 --num_train_epochs 15 --epic_start_epoch 2 --epic_interval 2 "
        f"--attack_seed_offset 1000000 --attacks {attack} --defenses {ALL_DEFENSES} "
        f"{_kwargs([attack], epsilon=EPS[eps], **settings)}"
    )


@dataclass(frozen=True)
class Cell:
    """One folder of the grid: a benchmark command (less ``--trials``, ``--output_dir``, ``--num_threads``)."""

    title: str
    short: str  # the README table's setting column
    flags: str
    setting: str
    backbone_from: str | None = None  # a cell whose cached backbones this one shares (same training)


_TRANSFER = (
    "frozen `vit-p7` backbone trained 12 epochs on the 10,000 clean training rows; a new linear head trained "
    "20 epochs on its features (computed once, no augmentation); EPIC after epochs 1-9"
)
_FINETUNE = (
    "`vit-p7` trained 20 epochs on 5,000 clean rows, then all of it fine-tuned 10 epochs at 1e-4 on the "
    "poisoned rows (shifts of up to 2 pixels); EPIC after epochs 2-5"
)
_SCRATCH = (
    "`vit-p7` from scratch, 15 epochs on 5,000 rows (shifts of up to 2 pixels); the attacker trains its own "
    "surrogate; EPIC every 2 epochs from 2"
)
CELLS: dict[str, Cell] = {
    "transfer_eps16": Cell(
        "Transfer, 1 %, ε 16/255", "transfer, 1 %, 16/255", _transfer("16"), _TRANSFER
    ),
    "transfer_eps8": Cell(
        "Transfer, 1 %, ε 8/255", "transfer, 1 %, 8/255", _transfer("8"), _TRANSFER + "; the backbones of "
        "the 16/255 cell", backbone_from="transfer_eps16",
    ),
    "finetune_eps16": Cell(
        "Fine-tuning, 1 %, ε 16/255", "fine-tuning, 1 %, 16/255", _finetune("16"), _FINETUNE
    ),
    "finetune_eps8": Cell(
        "Fine-tuning, 1 %, ε 8/255", "fine-tuning, 1 %, 8/255", _finetune("8"), _FINETUNE + "; the "
        "backbones of the 16/255 cell", backbone_from="finetune_eps16",
    ),
    "scratch_gm_eps16": Cell(
        "From scratch, gradient matching 1 %, ε 16/255", "from scratch, 1 %, 16/255",
        _scratch("gradient_matching", "16", restarts=2), _SCRATCH + "; gradient matching with 2 restarts",
    ),
    "scratch_gm_eps8": Cell(
        "From scratch, gradient matching 1 %, ε 8/255", "from scratch, 1 %, 8/255",
        _scratch("gradient_matching", "8", restarts=2), _SCRATCH + "; gradient matching with 2 restarts",
    ),
    "sleeper_agent": Cell(
        "From scratch, Sleeper Agent 1 %, ε 16/255", "from scratch, 1 %, 16/255",
        _scratch("sleeper_agent", "16"), _SCRATCH + "; a random source and poison class per trial",
    ),
    "badnets": Cell(
        "From scratch, BadNets 5 %, 3-pixel patch", "from scratch, 5 %, 3 px patch",
        f"{DATA} --max_train_rows 10000 --num_train_epochs 20 --epic_start_epoch 2 --epic_interval 2 "
        f"--attacks badnets --defenses {ALL_DEFENSES}",
        "`vit-p7` from scratch, 20 epochs on 10,000 rows; 500 rows get the patch and the poison label "
        "(the attack's seed is the trial's); EPIC every 2 epochs from 2",
    ),
}  # fmt: skip
"""The grid: every setting of the field's protocol at this data set's scale, each with every defense."""


@dataclass
class PageArguments:
    """Which cells and trials to run, and where the records and the page are."""

    trials: str = field(default="12", metadata={"help": "Count N (trials 0..N-1), range a-b, or list a,b,c."})
    cells: list[str] = field(
        default_factory=lambda: list(CELLS), metadata={"help": "Cells to run.", "choices": list(CELLS)}
    )
    output_dir: str = field(
        default="docs/results/fashion_mnist", metadata={"help": "Folder of the cells' folders."}
    )
    page: str = field(default="docs/results/fashion_mnist.md", metadata={"help": "The page to write."})
    readme: str = field(default="README.md", metadata={"help": "README whose results table is rewritten."})
    expected_trials: int = field(default=12, metadata={"help": "Trials a finished cell has per defense."})
    report_only: bool = field(
        default=False, metadata={"help": "Run nothing; write the page from the records."}
    )
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads."})


def benchmark_command(flags: str, trials: str, folder: str) -> str:
    """The ``recipes/benchmark.py`` command running ``flags`` on ``trials`` into ``folder`` (one thread)."""
    return f"python recipes/benchmark.py {flags} --trials {trials} --num_threads 1 --output_dir {folder}"


def parse_command(command: str) -> tuple[BenchmarkArguments, BenchmarkConfig]:
    """A :func:`benchmark_command` parsed by the benchmark's own parser (so a folder resumes from the same
    settings)."""
    grid, config = HfArgumentParser((BenchmarkArguments, BenchmarkConfig)).parse_args_into_dataclasses(
        args=shlex.split(command)[2:]
    )
    return grid, config


def run_parsed(grid: BenchmarkArguments, config: BenchmarkConfig) -> None:
    """Run a parsed command's missing trials (the benchmark resumes its folder)."""
    run_benchmark(
        config, trials=grid.trial_numbers, attacks=grid.attacks, defenses=grid.defenses,
        output_dir=grid.output_dir,
    )  # fmt: skip


def cell_command(name: str, trials: str = "12", output_dir: str = "docs/results/fashion_mnist") -> str:
    """The ``recipes/benchmark.py`` command of a cell."""
    return benchmark_command(CELLS[name].flags, trials, f"{output_dir}/{name}")


def parse_cell(name: str, trials: str, output_dir: str) -> tuple[BenchmarkArguments, BenchmarkConfig]:
    """The cell's command parsed by the benchmark's own parser."""
    return parse_command(cell_command(name, trials, output_dir))


def run_cells(args: PageArguments) -> None:
    """Run the missing trials of the selected cells, in :data:`CELLS` order."""
    torch.set_num_threads(args.num_threads)
    for name in args.cells:
        grid, config = parse_cell(name, args.trials, args.output_dir)
        shared = CELLS[name].backbone_from
        if shared is not None:  # same backbone training: reuse the other cell's cached backbones
            link = Path(grid.output_dir) / "pretrained"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists() and not link.is_symlink():
                link.symlink_to(Path("..") / shared / "pretrained", target_is_directory=True)
        print(f"== {name}: {cell_command(name, args.trials, args.output_dir)}", flush=True)
        run_parsed(grid, config)


def _pct(value: float, digits: int = 1) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.{digits}f} %"


def _asr(row: Mapping[str, Any]) -> str:
    if math.isnan(row["asr_ci_low"]):  # backdoor: triggered images pooled over trials
        return f"{_pct(row['attack_success_rate'])} ({row['asr_successes']:,} of {row['asr_evaluated']:,})"
    return (
        f"{row['asr_successes']} of {row['asr_evaluated']}, {_pct(row['attack_success_rate'])} "
        f"({100 * row['asr_ci_low']:.1f}-{100 * row['asr_ci_high']:.1f})"
    )


def _vs_none(row: Mapping[str, Any]) -> str:
    if row["defense"] == "none" or not row["vs_none_paired"]:
        return "–"
    p = row["vs_none_p"]
    return (
        f"{row['vs_none_saved']} / {row['vs_none_lost']}, p = {p:.2f}"
        if p >= 0.01
        else (f"{row['vs_none_saved']} / {row['vs_none_lost']}, p = {p:.1e}")
    )


def cell_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One cell's Markdown table: a row per (attack, defense)."""
    lines = [
        "| attack | defense | trials | attack success (95 % interval) | saved / lost vs none, McNemar p "
        "| clean acc. | poisons dropped | clean rows dropped | s / cell |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        control = row["defense"].startswith("clean-")
        poisons = (
            "–"
            if control or row["defense"] == "none"
            else (
                f"{row['poisons_dropped']:.1f} of {row['num_poisons']:.0f} ({_pct(row['poison_recall'], 0)})"
            )
        )
        clean = "–" if control or row["defense"] == "none" else _pct(row["clean_dropped_fraction"])
        lines.append(
            f"| {_name(row['attack'])} | {row['defense']} | {row['trials']} | {_asr(row)} | "
            f"{_vs_none(row)} | {_pct(row['clean_accuracy'])} | {poisons} | {clean} | "
            f"{row['wall_seconds']:.0f} |"
        )
    return lines


def epic_effect(none: Mapping[str, Any], epic: Mapping[str, Any]) -> str:
    """What an EPIC summary row did against the undefended one: targets saved and lost (paired), or the
    attack success rates (backdoors)."""
    if epic["vs_none_paired"]:
        return (
            f"saved {epic['vs_none_saved']} and lost {epic['vs_none_lost']} of the "
            f"{epic['vs_none_paired']} targets (p = {epic['vs_none_p']:.2f})"
        )
    return (
        f"took attack success from {_pct(none['attack_success_rate'])} to {_pct(epic['attack_success_rate'])}"
    )


def _targets(count: int) -> str:
    return f"{count} target" + ("" if count == 1 else "s")


def attack_strength(none: Mapping[str, Any], control: Mapping[str, Any]) -> str:
    """Whether the attack itself works in a cell: the undefended run against the clean control (the same
    training without poisons). A defense can only be shown to work where this difference is."""
    name = _name(none["attack"])
    if not control["vs_none_paired"]:  # backdoor: triggered images pooled over trials
        text = (
            f"Undefended, {_pct(none['attack_success_rate'])} of the triggered images went to the poison class "
            f"under {name}, against {_pct(control['attack_success_rate'])} with no poisons (clean control)."
        )
        if none["attack_success_rate"] <= control["attack_success_rate"]:
            text += " The poisons did not raise it: no defense's effect can show here."
        return text
    turned = control["vs_none_saved"]
    text = (
        f"Undefended, {name} succeeded on {none['asr_successes']} of {none['asr_evaluated']} targets, against "
        f"{control['asr_successes']} of {control['asr_evaluated']} misclassified the same way with no poisons "
        f"(clean control): the poisons turned {_targets(turned)}, and {control['vs_none_lost']} went the "
        f"other way (McNemar p = {control['vs_none_p']:.2f})."
    )
    best = mcnemar_exact(turned, 0)  # the p of a defense that saved every turned target and lost none
    if turned == 0:
        text += " No defense's effect can show here."
    elif best >= 0.05:
        which = "it" if turned == 1 else f"all {turned}"
        text += f" Too few for a defense's effect to show: saving {which} with none lost would give p = {best:.2f}."
    return text


def epic_summary(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per attack, a sentence on the attack against the clean control, then one on EPIC-0.2 against no
    defense, drawn from the summary rows."""
    by = {(r["attack"], r["defense"]): r for r in rows}
    lines = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        none, epic = by.get((attack, "none")), by.get((attack, "epic-0.2"))
        control = by.get((attack, "clean-control"))
        if none is not None and control is not None:
            lines.append(attack_strength(none, control))
        if none is None or epic is None:
            continue
        name = _name(attack)
        name = name[0].upper() + name[1:]
        effect = f"EPIC-0.2 {epic_effect(none, epic)}"
        ratio = (
            epic["poison_recall"] / epic["clean_dropped_fraction"]
            if epic["clean_dropped_fraction"]
            else math.nan
        )
        lines.append(
            f"{name}: {effect}, at {100 * (none['clean_accuracy'] - epic['clean_accuracy']):.1f} points of clean "
            f"accuracy; it dropped {_pct(epic['poison_recall'], 0)} of the poisons and "
            f"{_pct(epic['clean_dropped_fraction'], 0)} of the clean rows"
            + ("" if math.isnan(ratio) else f" ({ratio:.1f} times the clean rows' share)")
            + _against_baselines(by, attack, epic)
            + "."
        )
    return lines


def baselines_on_epic_trials(
    by: Mapping[tuple[str, str], Mapping[str, Any]], attack: str, epic: Mapping[str, Any]
) -> list[Mapping[str, Any]]:
    """The summary rows of the dropping baselines (at EPIC-0.2's counts) that ran all of EPIC-0.2's trials."""
    return [
        row for name in BASELINES
        if (row := by.get((attack, name))) is not None and row["trials"] == epic["trials"]
    ]  # fmt: skip


def _against_baselines(
    by: Mapping[tuple[str, str], Mapping[str, Any]], attack: str, epic: Mapping[str, Any]
) -> str:
    """The dropping baselines at EPIC-0.2's counts, for comparison: those that ran EPIC-0.2's trials."""
    ran = baselines_on_epic_trials(by, attack, epic)
    if not ran:
        return ""
    return (
        f"; {' / '.join(row['defense'] for row in ran)} dropping at the same counts dropped "
        f"{' / '.join(_pct(row['poison_recall'], 0) for row in ran)} of the poisons, with attack success "
        f"{' / '.join(_pct(row['attack_success_rate']) for row in ran)} (EPIC-0.2: {_pct(epic['attack_success_rate'])})"
    )


def demo_section(folder: Path) -> list[str]:
    """The demo's three seeds, from their ``recipe_results.json`` copies."""
    runs = sorted(folder.glob("seed_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    lines = [
        "| seed | undefended: attack success, clean acc. | EPIC-0.2: attack success, clean acc. "
        "| rows dropped | poisons dropped |",
        "|---|---|---|---|---|",
    ]
    totals = {"plain": 0, "epic": 0, "rows": 0, "num_rows": 0, "poisons": 0, "num_poisons": 0, "cost": 0.0}
    for path in runs:
        rows = {r["run"]: r for r in json.loads(path.read_text())["rows"]}
        epic = next(r for name, r in rows.items() if name.startswith("EPIC"))
        plain = rows["no defense"]
        lines.append(
            f"| {path.stem.split('_')[1]} | {plain['attack_success_rate']:.0f} of 1, {_pct(plain['clean_accuracy'])}"
            f" | {epic['attack_success_rate']:.0f} of 1, {_pct(epic['clean_accuracy'])} | "
            f"{epic['rows_dropped']:,} of {epic['num_rows']:,} | {epic['poisons_dropped']} of {epic['num_poisons']} |"
        )
        totals["plain"] += round(plain["attack_success_rate"])
        totals["epic"] += round(epic["attack_success_rate"])
        totals["rows"] += epic["rows_dropped"]
        totals["num_rows"] += epic["num_rows"]
        totals["poisons"] += epic["poisons_dropped"]
        totals["num_poisons"] += epic["num_poisons"]
        totals["cost"] += plain["clean_accuracy"] - epic["clean_accuracy"]
    if runs:
        n = len(runs)
        lines.append(
            f"| all | {totals['plain']} of {n} | {totals['epic']} of {n} ({-100 * totals['cost'] / n:+.1f} points "
            f"of clean accuracy) | {_pct(totals['rows'] / totals['num_rows'], 0)} | {totals['poisons']} of {totals['num_poisons']} |"
        )
    return lines


def readme_table(summaries: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The README's condensed table: undefended against EPIC-0.2 for every attack of every cell, and the
    dropping baseline with the lowest attack success at EPIC-0.2's counts (among those on its trials)."""
    lines = [
        "| setting | attack | trials | no poisons | undefended | EPIC-0.2 | best baseline at EPIC's counts "
        "| clean acc. | poisons / clean rows EPIC dropped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in summaries.items():
        by = {(r["attack"], r["defense"]): r for r in rows}
        for attack in dict.fromkeys(r["attack"] for r in rows):
            none, epic = by.get((attack, "none")), by.get((attack, "epic-0.2"))
            control = by.get((attack, "clean-control"))
            if none is None or epic is None:
                continue
            rate = (
                (lambda r: _pct(r["attack_success_rate"]))
                if math.isnan(none["asr_ci_low"])
                else (lambda r: f"{r['asr_successes']} of {r['asr_evaluated']}")
            )
            best = min(
                baselines_on_epic_trials(by, attack, epic),
                key=lambda r: r["attack_success_rate"],
                default=None,
            )
            lines.append(
                f"| {CELLS[name].short}"
                f" | {_name(attack)} | {epic['trials']} | {'–' if control is None else rate(control)} | {rate(none)} | "
                f"{rate(epic)} | {'–' if best is None else best['defense'] + ', ' + rate(best)} | "
                f"{_pct(none['clean_accuracy'])} → {_pct(epic['clean_accuracy'])} | "
                f"{_pct(epic['poison_recall'], 0)} / {_pct(epic['clean_dropped_fraction'], 0)} |"
            )
    return lines


PAGE_HEAD = """# Results: Fashion-MNIST

Zalando's Fashion-MNIST: 70,000 real 28x28 grayscale photos of clothing in 10 classes (60,000
training, 10,000 test), read offline from Debian's `dataset-fashion-mnist` (`make install` installs
it as root), a `--data_dir` copy of the IDX files, or the Hub (`zalando-datasets/fashion_mnist`).
Every model is the tiny ViT `vit-p7` (7-pixel patches, width 64, 4 layers), trained on one CPU
thread; clean accuracy is on the first 2,000 test images. This page and the README's results table
are written from the records by one command (it runs the missing cells first; two processes on
disjoint trials use both cores):

```bash
python benchmarks/fashion_mnist_page.py --trials 0-5 & python benchmarks/fashion_mnist_page.py --trials 6-11
```

`--report_only` rewrites the page from the records alone.
"""

HOW_TO_READ = """## How to read it

- **Attack success.** Targeted attacks (one target per trial): the trials whose target lands in the
  poison class, with the 95 % Wilson interval; at 12 trials one trial moves the rate by 8 points.
  BadNets: the triggered test images of other classes sent to the poison class, pooled over trials.
- **Saved / lost, p.** Every defense runs on the same trials as `none` (same poisons, same training
  seed): targets it saved and lost against the undefended run, and the exact McNemar p-value.
- **Baselines** drop the lowest-confidence / highest-loss / random rows at EPIC-0.2's per-class counts
  in the same rounds. **clean-control** trains without the poisons: how often the target lands in the
  poison class anyway. Each cell's first sentence pairs it with `none`: the targets the poisons turned are
  about all a defense can save there, and with 5 or fewer, saving all of them is not significant.
- **Poisons dropped / clean rows dropped**: means over trials; the share of the clean rows.
- The attacker has its own seed (the trial's plus 1,000,000) unless the cell says otherwise: targets,
  poison rows and the attack's own models are drawn independently of the victim's training.
- Records: each cell's folder holds `results.jsonl` (one JSON line per trial, attack and defense, with
  the target's margins, drops per round and the machine), `harness_config.json` (its settings) and
  `results.md` / `.json` / `.png` drawn from them.
"""


def write_page(args: PageArguments) -> str:
    """Write the page and the README's results table from the records; return the page."""
    out = Path(args.output_dir)
    summaries: dict[str, list[dict[str, Any]]] = {}
    lines = PAGE_HEAD.splitlines() + [""]
    lines += [
        "## The main job (`make demo`)",
        "",
        "`recipes/finetune_vit.py` on its defaults: a `vit-p7` backbone trained 20 epochs on 10,000 clean "
        "rows, Bullseye Polytope crafted on it (2 % of the other 5,000 rows, 16/255, one target), then the "
        "whole ViT fine-tuned 10 epochs at 1e-4 with EPIC-0.2 (rounds after epochs 2-5) and without a "
        "defense. Records: [`fashion_mnist/demo/`](fashion_mnist/demo/) (each run's `recipe_results.json`, "
        "from `accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/finetune_vit.py "
        "--seed N --attack_seed N`, one CPU thread: another thread count rounds differently and gives other runs).",
        "",
        *demo_section(out / "demo"),
        "",
        "Bullseye Polytope's poisons all aim at one target's features, so in their class's gradient space "
        "they form one dense cluster (the PCA plot of `model_cards/finetune_vit_fashion_mnist/` shows it); "
        "EPIC removes only rows left alone in a cluster of their own.",
        "",
    ]
    unfinished = []
    for name, cell in CELLS.items():
        records = list(ResultStore(out / name / RESULTS_FILE).records.values())
        if not records:
            unfinished.append(f"`{name}` ({cell.title}): not run")
            continue
        grid, _ = parse_cell(name, str(args.expected_trials), args.output_dir)
        rows = summarize(records)
        summaries[name] = rows
        counts = {(r["attack"], r["defense"]): r["trials"] for r in rows}
        short = []
        for attack in grid.attacks:
            low = [f"{d} ({counts.get((attack, d), 0)})" for d in grid.defenses]
            low = [x for x, d in zip(low, grid.defenses) if counts.get((attack, d), 0) < args.expected_trials]
            if low:
                short.append(f"{_name(attack)}: {', '.join(low)}")
        if short:
            unfinished.append(f"`{name}`, trials so far: {'; '.join(short)}")
        lines += [
            f"## {cell.title}",
            "",
            f"{cell.setting[0].upper()}{cell.setting[1:]}. Records: [`fashion_mnist/{name}/`](fashion_mnist/{name}/).",
            "",
            "```bash",
            cell_command(name, str(args.expected_trials), args.output_dir),
            "```",
            "",
            *cell_table(rows),
            "",
            *[line for sentence in epic_summary(rows) for line in (sentence, "")],
        ]
    lines += HOW_TO_READ.splitlines() + [""]
    if unfinished:
        lines += [
            f"## Not measured yet (below {args.expected_trials} trials)",
            "",
            *[f"- {u}" for u in unfinished],
            "",
        ]
    page = "\n".join(lines).rstrip() + "\n"
    Path(args.page).write_text(page)
    readme = Path(args.readme)
    if readme.is_file():
        text = readme.read_text()
        begin, end = "<!-- results:fashion_mnist -->", "<!-- /results:fashion_mnist -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            table = "\n".join(readme_table(summaries))
            readme.write_text(f"{head}{begin}\n{table}\n{end}{tail}")
    return page


def main(argv: list[str] | None = None) -> int:
    """Run the missing cells (unless ``--report_only``), then write the page."""
    (args,) = HfArgumentParser(PageArguments).parse_args_into_dataclasses(args=argv)
    parse_trials(args.trials)  # a bad --trials fails before any work
    if not args.report_only:
        run_cells(args)
    write_page(args)
    print(f"wrote {args.page} and the results table of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
