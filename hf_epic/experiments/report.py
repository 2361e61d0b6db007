"""The benchmark's report: records aggregated per (attack, defense), paired against the undefended run and
the matching clean run, and written as ``results.md``, ``results.json`` and ``results.png``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..attacks.registry import attack_names
from ..machine import describe_machine
from ..significance import mcnemar_exact, wilson_interval
from .defenses import defense_names, matching_control

__all__ = ["machines", "paired_targets", "summarize", "write_report"]


def _mean(values: Sequence[float]) -> float:
    """Mean of a non-empty sequence (NaN when empty)."""
    return float(np.mean(values)) if len(values) else float("nan")


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value, NaN when empty)."""
    if not len(values):
        return float("nan")
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate cell records per (attack, defense), in the attack and defense registries' order.

    Attack success rate pools every scored target/triggered image over the trials (for the targeted
    attacks with one target per trial this is the fraction of successful trials); the other columns are
    means over trials.

    Args:
        records: cell records as written to ``results.jsonl``.

    Returns:
        One dict per (attack, defense) with ``trials``, ``attack_success_rate``, ``asr_successes``,
        ``asr_evaluated``, ``clean_accuracy`` (mean) and ``clean_accuracy_std``, ``num_poisons``,
        ``poisons_dropped``, ``poison_recall``, ``clean_dropped``, ``clean_dropped_fraction`` (means) and
        ``wall_seconds`` (training and scoring, mean per trial) and ``craft_seconds`` (crafting the
        trial's poisons, shared by its defenses) and ``target_margin`` (targeted attacks: the mean of
        the targets' poison-class logit minus their largest other logit, see :func:`~hf_epic.experiments.scoring.target_margins`,
        over the records that have them; NaN for backdoors). Targeted attacks whose defense has a
        matching clean run (:func:`~hf_epic.experiments.defenses.matching_control`: ``none`` -> ``clean-control``, ``epic-0.2`` ->
        ``clean-epic-0.2``) also get ``control`` (its name), ``control_paired`` (targets scored in both)
        and ``successes_beyond_control`` (targets in the poison class whose clean run did not put them
        there: the poisons' own successes); ``control`` is None otherwise. Targeted attacks also get
        ``asr_ci_low`` / ``asr_ci_high`` (the 95 % Wilson interval of the ASR,
        :func:`hf_epic.significance.wilson_interval`; NaN for backdoors, whose triggered images are not
        independent trials) and, for every defense but ``none`` with ``none`` records of the same
        trials, ``vs_none_paired`` (targets scored under both), ``vs_none_saved`` (targets ``none``
        put in the poison class and the defense did not), ``vs_none_lost`` (the reverse) and
        ``vs_none_p`` (the two-sided exact McNemar p-value of the difference,
        :func:`hf_epic.significance.mcnemar_exact`); ``vs_none_paired`` is 0 and the rest None otherwise.
        Every row has ``drops_by_round``: per round epoch, the mean share of the poisons and of the
        clean rows dropped in that round (``[]`` for runs without rounds, or with records from before
        ``poisons_dropped_per_round`` was written), and ``drops_by_round_trials``, the records counted.
    """
    attacks, defenses, controls = attack_names(), defense_names(), matching_control()
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["attack"], record["defense"]), []).append(record)

    def order(key: tuple[str, str]) -> tuple:
        attack, defense = key
        return (
            attacks.index(attack) if attack in attacks else len(attacks),
            attack,
            defenses.index(defense) if defense in defenses else len(defenses),
            defense,
        )

    rows = []
    for key in sorted(groups, key=order):
        group = sorted(groups[key], key=lambda r: r["trial"])
        successes = sum(r["num_success"] for r in group)
        evaluated = sum(r["num_evaluated"] for r in group)
        targeted = all(_target_successes(r) is not None for r in group)
        low, high = wilson_interval(successes, evaluated) if targeted else (float("nan"), float("nan"))
        accuracies = [r["clean_accuracy"] for r in group]
        drops_by_round, drops_counted = _drops_by_round(group)
        rows.append(
            {
                "attack": key[0],
                "defense": key[1],
                "trials": len(group),
                "attack_success_rate": successes / evaluated if evaluated else float("nan"),
                "asr_successes": successes,
                "asr_evaluated": evaluated,
                "asr_ci_low": low,
                "asr_ci_high": high,
                "clean_accuracy": _mean(accuracies),
                "clean_accuracy_std": _std(accuracies),
                "num_poisons": _mean([r["num_poisons"] for r in group]),
                "poisons_dropped": _mean([r["poisons_dropped"] for r in group]),
                "poison_recall": _mean([r["recall"] for r in group]),
                "clean_dropped": _mean([r["clean_dropped"] for r in group]),
                "clean_dropped_fraction": _mean([r["clean_dropped_fraction"] for r in group]),
                "wall_seconds": _mean([r["wall_seconds"] for r in group]),
                "craft_seconds": _mean([r.get("craft_seconds", float("nan")) for r in group]),
                "target_margin": _mean([m for r in group for m in (r.get("target_margins") or [])]),
                **_beyond_control(group, groups.get((key[0], controls.get(key[1], "")), [])),
                **_against_none(group, groups.get((key[0], "none"), []) if key[1] != "none" else []),
                "drops_by_round": drops_by_round,
                "drops_by_round_trials": drops_counted,
            }
        )
    return rows


def _drops_by_round(group: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, float]], int]:
    """Per round epoch: the mean share of a trial's poisons and of its clean rows dropped in that round.

    Only records that carry ``poisons_dropped_per_round`` count; a record
    without a round at some epoch counts as dropping nothing then. The poison share is NaN when no
    counted trial has poisons (the clean-set runs).

    Returns:
        ``(rounds, trials)``: one ``{"epoch", "poisons", "clean"}`` dict per round epoch, and the number
        of records counted.
    """
    usable = [
        r
        for r in group
        if r.get("poisons_dropped_per_round") is not None
        and None not in r["poisons_dropped_per_round"]
        and len(r["poisons_dropped_per_round"])
        == len(r.get("round_epochs") or [])
        == len(r.get("rounds_per_class") or [])
    ]
    # per record: round epoch -> (poisons dropped, rows dropped) in that round
    per_record = [
        {
            int(epoch): (int(poisons), sum(int(n) for n in per_class.values()))
            for epoch, poisons, per_class in zip(
                r["round_epochs"], r["poisons_dropped_per_round"], r["rounds_per_class"]
            )
        }
        for r in usable
    ]
    out = []
    for epoch in sorted({e for drops in per_record for e in drops}):
        poison_shares, clean_shares = [], []
        for r, drops in zip(usable, per_record):
            poisons, dropped = drops.get(epoch, (0, 0))
            num_clean = int(r["num_rows"]) - int(r["num_poisons"])
            if r["num_poisons"]:
                poison_shares.append(poisons / r["num_poisons"])
            if num_clean:
                clean_shares.append((dropped - poisons) / num_clean)
        out.append({"epoch": epoch, "poisons": _mean(poison_shares), "clean": _mean(clean_shares)})
    return out, len(usable)


def _target_successes(record: Mapping[str, Any]) -> list[bool] | None:
    """Per target of a targeted-attack record: whether it landed in the poison class (None: not targeted)."""
    predictions = record.get("target_predictions")
    if record.get("attack_kind") != "targeted" or predictions is None or record.get("poison_class") is None:
        return None
    return [int(p) == int(record["poison_class"]) for p in predictions]


def paired_targets(
    group: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]
) -> list[tuple[bool, bool]]:
    """Per target scored in both runs of a trial: (landed in the poison class here, there)."""
    by_trial = {r["trial"]: _target_successes(r) for r in other}
    pairs: list[tuple[bool, bool]] = []
    for record in group:
        ours, theirs = _target_successes(record), by_trial.get(record["trial"])
        if ours is not None and theirs is not None and len(ours) == len(theirs):
            pairs += zip(ours, theirs)
    return pairs


def _beyond_control(
    group: Sequence[Mapping[str, Any]], control: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Pair a defense's targets with its clean run's, trial by trial, and count the poisons' own successes."""
    pairs = paired_targets(group, control)
    if not pairs:
        return {"control": None, "control_paired": 0, "successes_beyond_control": 0}
    beyond = sum(hit and not clean_hit for hit, clean_hit in pairs)
    return {
        "control": control[0]["defense"],
        "control_paired": len(pairs),
        "successes_beyond_control": beyond,
    }


def _against_none(group: Sequence[Mapping[str, Any]], none: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pair a defense's targets with the undefended run's, trial by trial: saved, lost, McNemar p."""
    pairs = paired_targets(group, none)
    if not pairs:
        return {"vs_none_paired": 0, "vs_none_saved": None, "vs_none_lost": None, "vs_none_p": None}
    saved = sum(undefended and not hit for hit, undefended in pairs)
    lost = sum(hit and not undefended for hit, undefended in pairs)
    return {
        "vs_none_paired": len(pairs),
        "vs_none_saved": saved,
        "vs_none_lost": lost,
        "vs_none_p": mcnemar_exact(saved, lost),
    }


def _asr_cell(row: Mapping[str, Any]) -> str:
    """``66.7 (8/12)``, or ``66.7 (8/12; 39.1-86.2)`` with the 95 % Wilson interval for targeted attacks."""
    cell = f"{100 * row['attack_success_rate']:.1f} ({row['asr_successes']}/{row['asr_evaluated']}"
    low, high = row.get("asr_ci_low", float("nan")), row.get("asr_ci_high", float("nan"))
    if not (math.isnan(low) or math.isnan(high)):
        cell += f"; {100 * low:.1f}-{100 * high:.1f}"
    return cell + ")"


def _p_value(p: float) -> str:
    """``0.344``, or ``4.9e-04`` below 0.001 (where three decimals would print 0.000)."""
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def machines(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The kinds of machine the records were measured on, most cells first.

    Args:
        records: cell records; those written before cells recorded their machine count as ``None``.

    Returns:
        ``[{"machine": fingerprint or None, "cells": count}, ...]``.
    """
    counts: dict[str, int] = {}
    for record in records:
        key = json.dumps(record.get("machine"), sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    return [{"machine": json.loads(key), "cells": n} for key, n in ordered]


def _machine_lines(kinds: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines naming the machines the cells ran on, with a warning when there are several."""
    if not kinds:
        return []

    def name(kind: Mapping[str, Any]) -> str:
        return describe_machine(kind["machine"]) if kind["machine"] else "not recorded (older cells)"

    if len(kinds) == 1:
        return [f"Machine: {name(kinds[0])}.", ""]
    lines = [
        f"Machines: the cells come from {len(kinds)} kinds of machine. A seeded cell is deterministic on "
        "one kind only: on another, floating-point sums round differently and a single trial can change "
        "outcome (the cached poisons, hence the targets, stay the same). Compare rates over many trials.",
        "",
    ]
    lines += [f"- {kind['cells']} cell{'' if kind['cells'] == 1 else 's'}: {name(kind)}" for kind in kinds]
    return lines + [""]


def _markdown_table(
    rows: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any] | None,
    kinds: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Render the summary rows (and the kinds of machine, from ``machines``) as a markdown document."""
    lines = ["# Poisoning benchmark", ""]
    if config:
        settings = ", ".join(f"{k}={v}" for k, v in config.items() if k != "attack_kwargs")
        lines += [f"Settings: {settings}.", ""]
        if config.get("attack_kwargs"):
            lines += [f"Attack arguments: `{json.dumps(config['attack_kwargs'], sort_keys=True)}`.", ""]
    lines += _machine_lines(kinds)
    lines += [
        "| attack | defense | trials | ASR % (successes/scored) | clean acc % | poisons dropped "
        "| poison recall % | clean rows dropped (% of clean) | wall s / trial | craft s / trial |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['defense']} | {r['trials']} "
            f"| {_asr_cell(r)} "
            f"| {100 * r['clean_accuracy']:.1f} ± {100 * r['clean_accuracy_std']:.1f} "
            f"| {r['poisons_dropped']:.1f} / {r['num_poisons']:.1f} "
            f"| {100 * r['poison_recall']:.1f} "
            f"| {r['clean_dropped']:.1f} ({100 * r['clean_dropped_fraction']:.1f}) "
            f"| {r['wall_seconds']:.1f} | {r['craft_seconds']:.1f} |"
        )
    lines += [
        "",
        "ASR pools the scored targets (targeted attacks: one per trial) or triggered test images not of "
        "the poison class (backdoors) over all trials; for targeted attacks the range after the counts is "
        "its 95 % Wilson interval. Other columns are means over trials; "
        "clean accuracy ± the standard deviation over trials. Wall time covers training (EPIC or "
        "baseline rounds included) and scoring; crafting the poisons is done once per trial and attack "
        "and shared by every defense.",
        "",
    ]
    paired = [r for r in rows if r.get("control")]
    if paired:
        lines += [
            "Targeted attacks against the same training without the poisons (the matching clean run): "
            "a success counts here only when the clean run of that trial did not already put the target "
            "in the poison class. The target margin is its poison-class logit minus its largest other "
            "logit (> 0: success), averaged over the trials.",
            "",
            "| attack | defense | clean run | successes beyond the clean run | mean target margin "
            "| clean run's mean target margin |",
            "|---|---|---|---|---|---|",
        ]
        margin = {(r["attack"], r["defense"]): r["target_margin"] for r in rows}
        for r in paired:
            lines.append(
                f"| {r['attack']} | {r['defense']} | {r['control']} "
                f"| {100 * r['successes_beyond_control'] / r['control_paired']:.1f} "
                f"({r['successes_beyond_control']}/{r['control_paired']}) "
                f"| {r['target_margin']:+.2f} | {margin[(r['attack'], r['control'])]:+.2f} |"
            )
        lines.append("")
    lines += _drops_by_round_tables(rows)
    against = [r for r in rows if r.get("vs_none_paired")]
    if against:
        lines += [
            "Targeted attacks, each other run against no defense on the same trials (the same targets): "
            "targets the undefended model put in the poison class and the defense did not (saved), the "
            "reverse (lost), and the two-sided exact McNemar p-value of the difference.",
            "",
            "| attack | defense | targets paired | saved | lost | McNemar p |",
            "|---|---|---|---|---|---|",
        ]
        for r in against:
            lines.append(
                f"| {r['attack']} | {r['defense']} | {r['vs_none_paired']} | {r['vs_none_saved']} "
                f"| {r['vs_none_lost']} | {_p_value(r['vs_none_p'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def _drops_by_round_tables(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: per attack, each round's share of the poisons and of the clean rows dropped."""
    lines: list[str] = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        with_rounds = [r for r in rows if r["attack"] == attack and r.get("drops_by_round")]
        if not with_rounds:
            continue
        epochs = sorted({d["epoch"] for r in with_rounds for d in r["drops_by_round"]})
        lines += [
            f"{attack}: when the rows were dropped. Each cell is the share of the trial's poisons / of its "
            "clean rows dropped in the round after that epoch, in %, averaged over the n trials that recorded it (a defense "
            "that finds the poisons drops a larger share of them than of the clean rows).",
            "",
            # trials counted: records written before the per-round poison counts are left out
            "| round after epoch | "
            + " | ".join(f"{r['defense']} (n = {r['drops_by_round_trials']})" for r in with_rounds)
            + " |",
            "|---|" + "---|" * len(with_rounds),
        ]
        for epoch in epochs:
            cells = []
            for r in with_rounds:
                d = next((d for d in r["drops_by_round"] if d["epoch"] == epoch), None)
                if d is None:
                    cells.append("")
                    continue
                poisons = "-" if math.isnan(d["poisons"]) else f"{100 * d['poisons']:.1f}"
                cells.append(f"{poisons} / {100 * d['clean']:.1f}")
            lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Draw ASR (targeted: with its 95 % interval), clean accuracy and poison recall per attack; save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    lookup = {(r["attack"], r["defense"]): r for r in rows}
    width = 0.8 / max(len(defenses), 1)
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 2.2 * len(attacks) * 3), 4), squeeze=False)
    for ax, metric, title in (
        (axes[0][0], "attack_success_rate", "attack success rate (%)"),
        (axes[0][1], "clean_accuracy", "clean accuracy (%)"),
        (axes[0][2], "poison_recall", "poisons dropped (% of poisons)"),
    ):
        for j, defense in enumerate(defenses):
            xs, ys, below, above = [], [], [], []
            for i, attack in enumerate(attacks):
                row = lookup.get((attack, defense))
                if row is not None and not math.isnan(row[metric]):
                    xs.append(i + (j - (len(defenses) - 1) / 2) * width)
                    ys.append(100 * row[metric])
                    low, high = row.get("asr_ci_low", math.nan), row.get("asr_ci_high", math.nan)
                    has_ci = metric == "attack_success_rate" and not (math.isnan(low) or math.isnan(high))
                    below.append(100 * (row[metric] - low) if has_ci else 0.0)
                    above.append(100 * (high - row[metric]) if has_ci else 0.0)
            # targeted ASR: the 95 % Wilson interval as an error bar
            errors = [below, above] if any(below) or any(above) else None
            ax.bar(xs, ys, width=width, label=defense, yerr=errors, capsize=2 if errors else 0)
        ax.set_xticks(range(len(attacks)))
        ax.set_xticklabels(attacks, rotation=20, ha="right")
        ax.set_ylim(0, 100)
        ax.set_title(title)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(defenses), 1), fontsize="small")
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    records: Iterable[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` (summary rows, settings, machines, every record) and ``results.png``.

    Args:
        records: cell records.
        output_dir: folder to write into.
        config: the settings to print with the table.

    Returns:
        ``{"markdown": ..., "json": ..., "plot": ...}`` paths.
    """
    records = list(records)
    rows = summarize(records)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json", "plot": out / "results.png"}
    kinds = machines(records)
    paths["markdown"].write_text(_markdown_table(rows, config, kinds))
    payload = {"config": dict(config or {}), "summary": rows, "machines": kinds, "records": records}
    paths["json"].write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    _plot(rows, paths["plot"])
    return paths
