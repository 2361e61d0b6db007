"""The benchmark harness: trials x attacks x defenses, one trained model per cell, results as they go.

A *cell* is one (trial, attack, defense): the attack crafts a poisoned training set for the trial (seeded
by the trial number, cached on disk and shared by all defenses of that trial), a tiny model is trained on
it under the defense, and the cell's record (attack success rate, clean accuracy, poisons and clean rows
dropped, wall time) is appended to ``results.jsonl`` at once. A rerun reads that file and skips the cells
already there, so an interrupted run loses at most the cell in progress.

Defenses (``DEFENSES``):

* ``none`` - undefended training (an ``EpicTrainer`` whose selection never runs, so the training loop is
  identical to the defended runs);
* ``epic-0.1`` / ``epic-0.2`` / ``epic-0.3`` - EPIC with that fraction;
* ``random`` / ``high-loss`` / ``low-confidence`` - the baselines of :mod:`hf_epic.baselines`, dropping
  at the rounds and per-class counts recorded by the reference EPIC cell of the same trial and attack
  (``HarnessConfig.baseline_reference``, EPIC-0.2 by default), which is run first when missing;
* ``clean-control`` - not a defense: undefended training on the CLEAN training set, scored on the same
  targets / triggered images. Its "ASR" is how often the target (or a triggered image) lands in the
  poison class without any poison - low-margin targets can, so read the attacks' ASR against it;
* ``clean-epic-0.2`` - not a defense either: EPIC-0.2 (same schedule) on the CLEAN training set. Its
  "ASR" is how often EPIC's own drops put the target in the poison class, which the ``epic-0.2`` cells
  include (EPIC drops clean rows near a low-margin target too).

:func:`summarize` aggregates the records per (attack, defense) and :func:`write_report` writes
``results.md``, ``results.json`` and ``results.png``. The command line is ``recipes/benchmark.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import os
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .machine import describe_machine, machine_fingerprint
from .significance import mcnemar_exact, wilson_interval

ATTACKS = ("gradient_matching", "bullseye_polytope", "feature_collision", "sleeper_agent", "badnets")
EPIC_DEFENSES = ("epic-0.1", "epic-0.2", "epic-0.3")
BASELINE_DEFENSES = ("random", "high-loss", "low-confidence")
CONTROL = "clean-control"
CLEAN_EPIC = "clean-epic-0.2"
"""EPIC-0.2 on the clean set: how often EPIC's own drops put the target in the poison class."""
CLEAN_SETS = (CONTROL, CLEAN_EPIC)
MATCHING_CONTROL = {"none": CONTROL, "epic-0.2": CLEAN_EPIC}
"""The clean-set run each defense is compared with: the same training without the poisons."""
DEFENSES = ("none", *EPIC_DEFENSES, *BASELINE_DEFENSES, CONTROL, CLEAN_EPIC)
RESULTS_FILE = "results.jsonl"
DIGITS_ATTACK_KWARGS: dict[str, dict[str, Any]] = {
    # Gradient matching against the 99 %-accurate 40-epoch victim on the plain digits: at 16/255-32/255
    # the poisons moved the target's margin by far less than its seed-to-seed spread (1 % budget: 0 of
    # 10 pilot trials; 5 % / 32/255: 41.7 % over 12 trials, clean control 8.3 %). At 64/255 (4x the
    # paper's 16/255; visible on 16x16 digits) 1 % suffices: 75.0 % over 12 trials, clean control
    # 8.3 %, with targets from the 2 % lowest-margin test digits and 2 restarts (docs/BENCHMARK_RESULTS.md).
    # Both numbers share one advantage: the surrogate is seeded with the trial seed, as the victim is,
    # so it starts from the victim's initial weights. An attacker with its own seed
    # (``attack_seed_offset``) reached 50.0 % over 24 trials on three renderings (session 15), and
    # 87.5 % with ``"ensemble": 3`` added (session 16; clean control 0/24), and 87.5 % over 48 trials
    # (sessions 16-18).
    "gradient_matching": {
        "budget": 0.01,
        "epsilon": 64 / 255,
        "target_pool_fraction": 0.02,
        "restarts": 2,
    },
    # Bullseye Polytope (transfer) at its own 1 % / 16/255 got 41.7 % over 12 trials with targets from
    # the 10 % lowest-margin test digits: the polytope reached the target's feature (relative distance
    # < 0.01) in every trial, but the retrained head did not always fit the 14 poisons, which sit among
    # the target class in feature space. With targets from the 2 % lowest-margin digits (32/255 and
    # in-crafting shifts changed nothing in pilots): 91.7 % over 12 trials, clean control 25.0 %
    # (docs/BENCHMARK_RESULTS.md).
    "bullseye_polytope": {"target_pool_fraction": 0.02},
    # Sleeper Agent with seeded random class pairs got 1.4 % over 12 trials: on these digits patched
    # source images keep a mean poison-class margin of -2.5 to -16.7 (pair by pair, on a clean model)
    # and the poisons moved it by +3 to +4 (pair 0 -> 7, margin -14). The
    # preset attacks the pair whose patched source images are nearest the poison class on a clean
    # model (7 -> 2: a bright patch at the bottom right of a 7 resembles the foot of a 2): 71.5 %
    # over 12 trials, but the trigger alone already sends 39.6 % there (clean control); see
    # docs/BENCHMARK_RESULTS.md.
    "sleeper_agent": {"budget": 0.05, "epsilon": 32 / 255, "source_class": 7, "poison_class": 2},
}
"""Per-attack arguments of the offline default (``dataset="digits"``, ``attack_kwargs=None``)."""
HARD_DIGITS_ATTACK_KWARGS: dict[str, dict[str, Any]] = {
    # The hard digits (``digits_variant="hard"``) at 32x32 in colour: 4,314 training rows, 83-90 % clean
    # accuracy after 40 epochs (87.3 % mean), nearer CIFAR-10 than the plain digits' 99 %. There gradient
    # matching works at a smaller epsilon and with less ambiguous targets than on the plain digits: 1 %
    # (43 rows) at 24/255 with targets from the 10 % lowest-margin test digits succeeded in 7 of 12
    # trials (58.3 %) against 1 of 12 without poisons, and EPIC-0.2 on the clean set flipped none of
    # those targets (0 of 12). EPIC-0.2 (every 2 epochs from 10) left 6 of 12 (50.0 %), at -4.1 points
    # of clean accuracy, dropping 18.6 % of the poisons and 29.1 % of the clean rows
    # (docs/BENCHMARK_RESULTS.md, "Gradient matching on the hard digits").
    # The other attacks keep their own defaults here (not tuned on the hard digits).
    "gradient_matching": {
        "budget": 0.01,
        "epsilon": 24 / 255,
        "target_pool_fraction": 0.1,
        "restarts": 2,
    },
}
"""Per-attack arguments when ``dataset="digits"``, ``digits_variant="hard"`` and ``attack_kwargs=None``."""
CONFIG_FILE = "harness_config.json"

__all__ = [
    "ATTACKS",
    "DEFENSES",
    "DIGITS_ATTACK_KWARGS",
    "HARD_DIGITS_ATTACK_KWARGS",
    "HarnessConfig",
    "MATCHING_CONTROL",
    "ResultStore",
    "cell_key",
    "load_benchmark_dataset",
    "normalise_columns",
    "run_benchmark",
    "run_cell",
    "summarize",
    "write_report",
]


@dataclasses.dataclass
class HarnessConfig:
    """Everything that decides a cell's result (trial, attack and defense aside).

    Args:
        dataset: ``"digits"`` (offline, :func:`hf_epic.data.load_digits_dataset`), a ``save_to_disk``
            folder of a ``DatasetDict``, or a Hub dataset name for ``datasets.load_dataset`` (e.g.
            ``"cifar10"``; needs the internet).
        digits_variant: ``"hard"`` or ``"plain"``, for ``dataset="digits"``.
        digits_renders: renderings of each training source digit, for ``dataset="digits"`` (None: the
            variant's default, 3 for ``"hard"`` and 1 for ``"plain"``; see
            :func:`hf_epic.data.load_digits_dataset`). The test split keeps the variant's default.
        image_size: side of the square model input, in pixels.
        num_channels: 1 (grayscale) or 3 (RGB).
        model: ``"cnn"`` (tiny timm ResNet), ``"vit"`` (tiny HF ViT) or ``"timm-vit"``.
        train_size: keep only the first ``train_size`` training rows (None: all).
        test_size: keep only the first ``test_size`` test rows (None: all).
        epochs: training epochs per cell.
        batch_size: per-device batch size. The last incomplete batch of every epoch is dropped (the
            rows differ from epoch to epoch): once EPIC shrinks the set, a last batch of a single row
            would make BatchNorm models fail.
        optimizer: ``"sgd"`` (momentum 0.9, Nesterov; the poisoning literature's victim training, as the
            attacks' surrogate) or ``"adamw"``; both with a cosine learning-rate decay.
        learning_rate: peak learning rate.
        weight_decay: weight decay.
        epic_interval: epochs between EPIC selection rounds (T).
        epic_start: first epoch at which EPIC selects.
        epic_stop: no EPIC round once this many epochs are done (exclusive: start 2, interval 2, stop 10
            runs rounds after epochs 2, 4, 6 and 8; None: rounds until the end), as in the reference's
            transfer setting.
        epic_embedding: EPIC's gradient embedding, ``"logits_grad"`` (the reference's) or
            ``"last_layer_grad"`` (see :class:`~hf_epic.EpicConfig`).
        epic_metric: EPIC's similarity, ``"euclidean"`` (the reference's) or ``"cosine"``.
        epic_cluster_threshold: EPIC drops rows in clusters of at most this many members.
        baseline_reference: the EPIC defense whose drop schedule the baselines copy.
        attack_kwargs: per-attack keyword arguments for the ``craft_*`` functions, e.g.
            ``{"gradient_matching": {"epsilon": 16 / 255}}``. None (the default): ``DIGITS_ATTACK_KWARGS``
            when ``dataset="digits"`` (the offline setting where the attacks work),
            ``HARD_DIGITS_ATTACK_KWARGS`` with ``digits_variant="hard"``, otherwise ``{}`` (each attack's
            own defaults: 1 % budget, epsilon 16/255, 5 % for BadNets).
        seed: base seed; a cell's training seed is ``seed * 1000 + trial``.
        attack_seed_offset: added to the trial's seed for the attack alone (its surrogate's initialisation
            and training, the target and poison draws). 0 (the default, and every result recorded before
            2026-12-02): the attack shares the victim's seed, so the default surrogate starts from the
            victim's initial weights. Any other value (e.g. 1000000) gives the attacker a surrogate
            independent of the victim's initialisation, as in the field's benchmark, where the attacker
            does not know the victim's seed.
        num_workers: DataLoader workers.
        progress: show progress bars (crafting and training).
        pretrain_epochs: clean training epochs of the feature extractor that the transfer / fine-tuning
            attacks (Bullseye Polytope, Feature Collision) craft against and the victim starts from.
        finetune_learning_rate: learning rate of the victim in the ``setting="finetune"`` case.
    """

    dataset: str = "digits"
    digits_variant: str = "plain"
    digits_renders: int | None = None
    image_size: int = 16
    num_channels: int = 1
    model: str = "cnn"
    train_size: int | None = None
    test_size: int | None = None
    epochs: int = 40
    batch_size: int = 64
    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    weight_decay: float = 0.05
    epic_interval: int = 2
    epic_start: int = 2
    epic_stop: int | None = None
    epic_embedding: str = "logits_grad"
    epic_metric: str = "euclidean"
    epic_cluster_threshold: int = 1
    baseline_reference: str = "epic-0.2"
    attack_kwargs: dict[str, dict[str, Any]] | None = None
    seed: int = 0
    attack_seed_offset: int = 0
    num_workers: int = 0
    progress: bool = False
    pretrain_epochs: int = 12
    finetune_learning_rate: float = 1e-4

    def __post_init__(self) -> None:
        """Validate the settings before any time is spent (and resolve ``attack_kwargs=None``)."""
        if self.attack_kwargs is None:
            preset: dict[str, dict[str, Any]] = {}
            if self.dataset == "digits":
                preset = HARD_DIGITS_ATTACK_KWARGS if self.digits_variant == "hard" else DIGITS_ATTACK_KWARGS
            self.attack_kwargs = {name: dict(kwargs) for name, kwargs in preset.items()}
        if not isinstance(self.attack_kwargs, dict) or not all(
            isinstance(v, dict) for v in self.attack_kwargs.values()
        ):
            raise ValueError(
                f"attack_kwargs={self.attack_kwargs!r}: pass a dict of attack name -> dict of keyword arguments."
            )
        from hf_epic.data import check_renders  # the loader's own check, so a bad value fails here

        check_renders("digits_renders", self.digits_renders)
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r}: use 'sgd' or 'adamw'.")
        if self.model not in ("cnn", "vit", "timm-vit"):
            raise ValueError(f"model={self.model!r}: use 'cnn', 'vit' or 'timm-vit'.")
        if self.baseline_reference not in EPIC_DEFENSES:
            raise ValueError(
                f"baseline_reference={self.baseline_reference!r}: the baselines copy an EPIC run's drop "
                f"schedule; use one of {', '.join(EPIC_DEFENSES)}."
            )
        if isinstance(self.attack_seed_offset, bool) or not isinstance(self.attack_seed_offset, int):
            raise ValueError(
                f"attack_seed_offset={self.attack_seed_offset!r}: pass an int (0 shares the victim's seed)."
            )
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: pass a positive integer.")
        if self.epic_interval < 1 or self.epic_start < 1:
            raise ValueError("epic_interval and epic_start must be >= 1 (epochs are counted from 1).")
        if self.epic_stop is not None and self.epic_stop <= self.epic_start:
            raise ValueError(
                f"epic_stop={self.epic_stop} is not after epic_start={self.epic_start}: EPIC would never run; "
                "pass epic_stop > epic_start, or None."
            )
        from hf_epic.epic_config import default_epic_settings, validate_epic_settings

        # the EPIC options the harness passes on unchanged get EpicConfig's own checks and messages
        passed_on = ("epic_embedding", "epic_metric", "epic_cluster_threshold")
        validate_epic_settings({**default_epic_settings(), **{k: getattr(self, k) for k in passed_on}})
        unknown = sorted(set(self.attack_kwargs) - set(ATTACKS))
        if unknown:
            raise ValueError(f"attack_kwargs names unknown attacks {unknown}; known: {', '.join(ATTACKS)}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def cell_key(trial: int, attack: str, defense: str) -> str:
    """Return the identifier of one cell in ``results.jsonl``.

    Args:
        trial: trial number.
        attack: attack name.
        defense: defense name.
    """
    return f"trial={trial}|attack={attack}|defense={defense}"


class ResultStore:
    """Append-only JSONL file of cell records; a torn last line (from an interrupt) is ignored.

    Args:
        path: the ``results.jsonl`` file (created on the first append).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupt: that cell reruns
                if isinstance(record, dict) and "key" in record:
                    self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict[str, Any] | None:
        """Return the record stored under ``key``, or None.

        Args:
            key: a :func:`cell_key`.
        """
        return self.records.get(key)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and flush it to disk before returning.

        Args:
            record: a JSON-serialisable dict with a ``key`` entry.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A torn line left by an interrupt must not swallow this record: start on a fresh line.
        prefix = ""
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    prefix = "\n"
        with open(self.path, "a") as handle:
            handle.write(prefix + json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[record["key"]] = record


# ----------------------------------------------------------------------------------------------------
# data


def normalise_columns(ds: Any) -> Any:
    """Rename a dataset's first image and ClassLabel columns to ``image`` and ``label`` and keep only those.

    Args:
        ds: a ``datasets.Dataset`` (not modified).

    Returns:
        A new dataset with exactly the columns ``image`` and ``label``.
    """
    import datasets

    features = ds.features
    if "image" not in features:
        images = [k for k, v in features.items() if isinstance(v, datasets.Image)]
        if not images:
            raise ValueError(
                f"No image column in {sorted(features)}: hf-epic needs a datasets.Image column "
                "(named 'image', or any name of that feature type); cast yours with "
                "ds.cast_column(name, datasets.Image())."
            )
        ds = ds.rename_column(images[0], "image")
    if "label" not in features:
        labels = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
        if not labels:
            raise ValueError(
                f"No label column in {sorted(features)}: hf-epic needs a ClassLabel column "
                "(named 'label', or any name of that feature type); cast yours with "
                "ds.cast_column(name, datasets.ClassLabel(num_classes=...))."
            )
        ds = ds.rename_column(labels[0], "label")
    return ds.select_columns(["image", "label"])


def load_benchmark_dataset(config: HarnessConfig) -> Any:
    """Load the train/test splits the cells use, with ``image`` and ``label`` columns.

    ``config.dataset`` is ``"digits"``, a folder holding a ``DatasetDict`` saved with ``save_to_disk``,
    or a name for ``datasets.load_dataset`` (e.g. ``"cifar10"``). The first image column and the first
    ClassLabel column are renamed to ``image`` and ``label``; other columns are left out.

    Args:
        config: the harness settings (``dataset``, ``digits_variant``, ``image_size``, sizes, seed).

    Returns:
        A ``datasets.DatasetDict`` with ``train`` and ``test``.
    """
    import datasets

    if config.dataset == "digits":
        from hf_epic.data import load_digits_dataset

        dd = load_digits_dataset(
            config.digits_variant,
            seed=config.seed,
            image_size=config.image_size,
            renders_per_image=config.digits_renders,
        )
    else:
        local = Path(config.dataset)
        if (local / "dataset_dict.json").is_file():  # a DatasetDict saved with save_to_disk
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(config.dataset)
        test_split = "test" if "test" in loaded else ("validation" if "validation" in loaded else None)
        if "train" not in loaded or test_split is None:
            raise ValueError(
                f"Dataset {config.dataset!r} has splits {sorted(loaded)}; the harness needs 'train' and "
                "'test' (or 'validation')."
            )
        dd = datasets.DatasetDict(
            train=normalise_columns(loaded["train"]), test=normalise_columns(loaded[test_split])
        )
    train, test = dd["train"], dd["test"]
    if config.train_size is not None:
        train = train.select(range(min(config.train_size, len(train))))
    if config.test_size is not None:
        test = test.select(range(min(config.test_size, len(test))))
    return datasets.DatasetDict(train=train, test=test)


# ----------------------------------------------------------------------------------------------------
# aggregation and report


def _mean(values: Sequence[float]) -> float:
    """Mean of a non-empty sequence (NaN when empty)."""
    return float(np.mean(values)) if len(values) else float("nan")


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value, NaN when empty)."""
    if not len(values):
        return float("nan")
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate cell records per (attack, defense), in ``ATTACKS`` x ``DEFENSES`` order.

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
        the targets' poison-class logit minus their largest other logit, see :func:`target_margins`,
        over the records that have them; NaN for backdoors). Targeted attacks whose defense has a
        matching clean run (:data:`MATCHING_CONTROL`: ``none`` -> ``clean-control``, ``epic-0.2`` ->
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
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["attack"], record["defense"]), []).append(record)

    def order(key: tuple[str, str]) -> tuple:
        attack, defense = key
        return (
            ATTACKS.index(attack) if attack in ATTACKS else len(ATTACKS),
            attack,
            DEFENSES.index(defense) if defense in DEFENSES else len(DEFENSES),
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
                **_beyond_control(group, groups.get((key[0], MATCHING_CONTROL.get(key[1], "")), [])),
                **_against_none(group, groups.get((key[0], "none"), []) if key[1] != "none" else []),
                "drops_by_round": drops_by_round,
                "drops_by_round_trials": drops_counted,
            }
        )
    return rows


def _drops_by_round(group: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, float]], int]:
    """Per round epoch: the mean share of a trial's poisons and of its clean rows dropped in that round.

    Only records that carry ``poisons_dropped_per_round`` (written since 2026-12-02) count; a record
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


def _paired_targets(
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
    pairs = _paired_targets(group, control)
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
    pairs = _paired_targets(group, none)
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


# ----------------------------------------------------------------------------------------------------
# crafting, training and scoring one cell


def _train_seed(config: HarnessConfig, trial: int) -> int:
    """Seed of a trial's model training (and of its attack when ``attack_seed_offset`` is 0)."""
    return int(config.seed) * 1000 + int(trial)


def _attack_seed(config: HarnessConfig, trial: int) -> int:
    """Seed of a trial's attack: the training seed plus ``config.attack_seed_offset``."""
    return _train_seed(config, trial) + int(config.attack_seed_offset)


def _attack_function(attack: str) -> Callable[..., Any]:
    """Return ``hf_epic.attacks.<attack>.craft_<attack>``."""
    if attack not in ATTACKS:
        raise ValueError(f"Unknown attack {attack!r}; choose from {', '.join(ATTACKS)}.")
    module = importlib.import_module(f"hf_epic.attacks.{attack}")
    return getattr(module, f"craft_{attack}")


def victim_setting(attack: str, config: HarnessConfig) -> str:
    """How the victim trains for this attack: ``"scratch"``, ``"transfer"`` (frozen features, new head)
    or ``"finetune"`` (whole pretrained model), from the attack's ``setting`` argument when it has one.

    Args:
        attack: attack name.
        config: harness settings (``attack_kwargs[attack]["setting"]`` overrides the attack's default).
    """
    parameter = inspect.signature(_attack_function(attack)).parameters.get("setting")
    if parameter is None:
        return "scratch"
    setting = config.attack_kwargs.get(attack, {}).get("setting", parameter.default)
    allowed = (
        ("scratch", "transfer", "finetune") if parameter.default == "scratch" else ("transfer", "finetune")
    )
    if setting not in allowed:
        raise ValueError(
            f"attack_kwargs[{attack!r}]['setting']={setting!r}: use one of {', '.join(map(repr, allowed))}."
        )
    return setting


def pretrained_model(trial: int, splits: Any, config: HarnessConfig, cache_dir: str | os.PathLike) -> Any:
    """The trial's feature extractor: the victim architecture trained on the clean set (cached as safetensors).

    Transfer and fine-tuning attacks craft against it (white-box) and the victim starts from it.

    Args:
        trial: trial number (seeds initialisation and training).
        splits: ``DatasetDict`` with the clean ``train`` split.
        config: harness settings (``model``, ``pretrain_epochs``).
        cache_dir: folder of the cached weights (``<cache_dir>/trial_<t>/model.safetensors``).

    Returns:
        A freshly loaded copy of the pretrained model, in eval mode.
    """
    from safetensors.torch import load_file, save_file

    from hf_epic.attacks.surrogate import train_surrogate

    path = Path(cache_dir) / f"trial_{trial:03d}" / "model.safetensors"
    num_labels = splits["train"].features["label"].num_classes
    torch.manual_seed(_train_seed(config, trial))
    model = _build_model(config, num_labels)
    if path.exists():
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval()
    train_surrogate(
        splits["train"],
        model=model,
        epochs=config.pretrain_epochs,
        seed=_train_seed(config, trial),
        device="cuda" if torch.cuda.is_available() else "cpu",
        progress=config.progress,
    )
    model = model.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    return model.eval()


def _freeze_features(model: Any) -> None:
    """Transfer setting: freeze all but a re-initialised final layer and keep normalisation layers in eval."""
    from hf_epic.attacks.surrogate import classifier_layer

    head = classifier_layer(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head.reset_parameters()
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)):
            module.eval()
            # the Trainer calls model.train() every step; frozen features must keep their statistics
            module.train = types.MethodType(lambda self, mode=True: self, module)


def _draw_classes(
    parameters: Mapping[str, inspect.Parameter], kwargs: Mapping[str, Any], num_classes: int
) -> dict:
    """Draw the classes an attack requires but was not given (the backdoors' poison and source class).

    The draw is seeded by the trial's seed, and the source class never equals the poison class.

    Args:
        parameters: the attack function's signature parameters.
        kwargs: the arguments already chosen (their classes are kept).
        num_classes: number of classes of the dataset.
    """

    def required(name: str) -> bool:
        parameter = parameters.get(name)
        return parameter is not None and parameter.default is inspect.Parameter.empty and name not in kwargs

    rng = np.random.default_rng(int(kwargs["seed"]))
    drawn: dict[str, int] = {}
    poison_class = kwargs.get("poison_class")
    if required("poison_class"):
        poison_class = drawn["poison_class"] = int(rng.integers(num_classes))
    if required("source_class"):
        choices = [c for c in range(num_classes) if c != poison_class]
        drawn["source_class"] = int(choices[int(rng.integers(len(choices)))])
    return drawn


def craft_or_load(
    attack: str,
    trial: int,
    splits: Any,
    config: HarnessConfig,
    cache_dir: str | os.PathLike,
    model: Any = None,
) -> tuple[Any, Any, float]:
    """Craft the trial's poisoned training set, or load it from the cache written by an earlier call.

    Args:
        attack: attack name.
        trial: trial number (seeds the attack).
        splits: ``DatasetDict`` with the clean ``train`` and ``test`` splits.
        config: harness settings (``attack_kwargs[attack]`` is passed to the attack).
        cache_dir: folder of the cached sets (``<cache_dir>/<attack>/trial_<t>``).
        model: the pretrained model to attack (transfer / fine-tuning attacks), passed as ``model=``.

    Returns:
        ``(poisoned_ds, spec, craft_seconds)``.
    """
    import datasets

    from hf_epic.attacks.spec import PoisonSpec

    folder = Path(cache_dir) / attack / f"trial_{trial:03d}"
    meta_path = folder / "craft.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return (
            datasets.load_from_disk(str(folder / "dataset")),
            PoisonSpec.load(folder / "poison_spec.json"),
            float(meta["craft_seconds"]),
        )
    craft = _attack_function(attack)
    parameters = inspect.signature(craft).parameters
    kwargs: dict[str, Any] = dict(config.attack_kwargs.get(attack, {}))
    kwargs.setdefault("seed", _attack_seed(config, trial))
    if "target_ds" in parameters:
        kwargs.setdefault("target_ds", splits["test"])
    if "progress" in parameters:
        kwargs.setdefault("progress", config.progress)
    if model is not None:
        kwargs.setdefault("model", model)
    kwargs.update(_draw_classes(parameters, kwargs, splits["train"].features["label"].num_classes))
    start = time.perf_counter()
    with _quiet_datasets(not config.progress):
        poisoned, spec = craft(splits["train"], **kwargs)
        seconds = time.perf_counter() - start
        folder.mkdir(parents=True, exist_ok=True)
        poisoned.save_to_disk(str(folder / "dataset"))
    spec.save(folder / "poison_spec.json")
    # written last: its presence marks a complete cache entry
    meta_path.write_text(json.dumps({"craft_seconds": seconds, "attack": attack, "trial": trial}))
    return datasets.load_from_disk(str(folder / "dataset")), spec, seconds


def _build_model(config: HarnessConfig, num_labels: int) -> Any:
    """Build the victim model named by ``config.model`` (random weights)."""
    from hf_epic import models

    if config.model == "cnn":
        return models.build_tiny_cnn(num_labels, config.image_size, config.num_channels)
    if config.model == "vit":
        return models.build_tiny_vit(num_labels, config.image_size, config.num_channels)
    return models.build_tiny_timm(num_labels, config.image_size, config.num_channels)


def _transform(config: HarnessConfig, augment: bool, seed: int | None = None) -> Callable[[dict], dict]:
    """The model input transform; drops ``is_poison`` so the collator never passes it to the model."""
    from hf_epic.models import image_transform

    base = image_transform(config.image_size, config.num_channels, augment=augment, seed=seed)

    def transform(batch: dict[str, list]) -> dict[str, list]:
        out = base(batch)
        out.pop("is_poison", None)
        return out

    return transform


@torch.no_grad()
def predict_logits(model: Any, ds: Any, config: HarnessConfig, batch_size: int = 256) -> torch.Tensor:
    """Logits ``(rows, classes)`` of every row of an image dataset (no augmentation), on the CPU.

    Args:
        model: a trained classifier returning ``logits``.
        ds: dataset with an ``image`` column (not modified).
        config: harness settings (image size and channels).
        batch_size: rows per forward pass.
    """
    view = ds.select_columns(["image"]).with_transform(_transform(config, augment=False))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    for start in range(0, len(view), batch_size):  # gradients are off: @torch.no_grad()
        rows = view[start : start + batch_size]
        pixels = torch.stack(rows["pixel_values"]).to(device)
        chunks.append(model(pixel_values=pixels).logits.float().cpu())
    model.train(was_training)
    return torch.cat(chunks)


def predict_classes(model: Any, ds: Any, config: HarnessConfig, batch_size: int = 256) -> list[int]:
    """Predicted class of every row of an image dataset (no augmentation).

    Args:
        model: a trained classifier returning ``logits``.
        ds: dataset with an ``image`` column (not modified).
        config: harness settings (image size and channels).
        batch_size: rows per forward pass.

    Returns:
        One predicted class per row, in row order.
    """
    if len(ds) == 0:
        return []
    return predict_logits(model, ds, config, batch_size).argmax(-1).tolist()


def target_margins(logits: torch.Tensor, poison_class: int) -> list[float]:
    """Per row: the poison class's logit minus the largest other logit (> 0: the row is in the poison
    class). A continuous view of a targeted attack's success: the poison's effect on one trial is the
    difference between this margin with the poisons and without them (``clean-control``).
    """
    others = logits.clone()
    others[:, poison_class] = -math.inf
    return (logits[:, poison_class] - others.max(1).values).tolist()


@contextlib.contextmanager
def _quiet_datasets(quiet: bool) -> Iterator[None]:
    """Hide ``datasets`` progress bars inside the block when ``quiet`` (restoring the setting after)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if quiet and was_enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and was_enabled:
            datasets.enable_progress_bars()


def _score_attack(model: Any, spec: Any, test_ds: Any, config: HarnessConfig) -> dict[str, Any]:
    """Attack success on the trial's targets (targeted) or on the triggered test images (backdoor)."""
    from hf_epic.metrics import load_metric

    if spec.trigger is not None:
        from hf_epic.attacks.trigger import apply_trigger

        source = spec.trigger.get("source_class")
        keep = [
            i
            for i, label in enumerate(test_ds["label"])
            if label != spec.poison_class and (source is None or label == source)
        ]
        with _quiet_datasets(not config.progress):
            triggered = apply_trigger(test_ds.select(keep), spec.trigger, seed=_train_seed(config, 0))
        predictions = predict_classes(model, triggered, config)
        metric = load_metric("attack_success_rate", config_name="backdoor")
        out = metric.compute(
            predictions=predictions, references=triggered["label"], poison_class=spec.poison_class
        )
        kind = "backdoor"
    else:
        targets = test_ds.select(spec.target_indices)
        logits = predict_logits(model, targets, config)
        predictions = logits.argmax(-1).tolist()
        margins = target_margins(logits, int(spec.poison_class))
        metric = load_metric("attack_success_rate", config_name="targeted")
        out = metric.compute(predictions=predictions, references=[spec.poison_class] * len(predictions))
        kind = "targeted"
    return {
        "attack_kind": kind,
        "asr": out["attack_success_rate"],
        "num_success": out["num_success"],
        "num_evaluated": out["num_evaluated"],
        "target_predictions": predictions if kind == "targeted" else None,
        "target_margins": margins if kind == "targeted" else None,
    }


def run_cell(
    trial: int,
    attack: str,
    defense: str,
    poisoned: Any,
    spec: Any,
    test_ds: Any,
    config: HarnessConfig,
    work_dir: str | os.PathLike,
    schedule: Sequence[Mapping[int, int]] | None = None,
    initial_model: Any = None,
    setting: str = "scratch",
) -> dict[str, Any]:
    """Train one model on a poisoned set under one defense and score it.

    Args:
        trial: trial number (seeds training).
        attack: attack name (recorded).
        defense: one of ``DEFENSES``.
        poisoned: the poisoned training set (with ``is_poison``; not modified); for ``clean-control``
            and ``clean-epic-0.2`` the clean set with an all-False ``is_poison``.
        spec: its ``PoisonSpec``.
        test_ds: the clean test split.
        config: harness settings.
        work_dir: the trainer's ``output_dir`` (``epic_state.json`` lands there).
        schedule: for the baseline defenses, the reference EPIC run's per-round per-class drop counts.
        initial_model: the pretrained model the victim starts from (``setting`` transfer / finetune).
        setting: ``"scratch"`` (new random model), ``"transfer"`` (train a new head on the frozen
            features of ``initial_model``) or ``"finetune"`` (train all of ``initial_model``).

    Returns:
        The cell's record (JSON-serialisable).
    """
    from hf_epic.baselines import baseline_callback
    from hf_epic.epic_config import EpicConfig
    from hf_epic.epic_trainer import EpicTrainer
    from hf_epic.metrics import load_metric

    if defense not in DEFENSES:
        raise ValueError(f"Unknown defense {defense!r}; choose from {', '.join(DEFENSES)}.")
    if defense in BASELINE_DEFENSES and schedule is None:
        raise ValueError(f"The {defense!r} baseline needs the reference EPIC run's drop schedule.")
    cell_start = time.perf_counter()
    seed = _train_seed(config, trial)
    fraction = float(defense.split("-")[-1]) if defense in (*EPIC_DEFENSES, CLEAN_EPIC) else 0.2
    args = EpicConfig(
        output_dir=str(work_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=config.finetune_learning_rate if setting == "finetune" else config.learning_rate,
        weight_decay=config.weight_decay,
        optim="sgd" if config.optimizer == "sgd" else "adamw_torch",
        optim_args="momentum=0.9,nesterov=True" if config.optimizer == "sgd" else None,
        lr_scheduler_type="cosine",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=not config.progress,
        remove_unused_columns=False,
        dataloader_num_workers=config.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # EPIC shrinks the set mid-training; a last batch of one row would break BatchNorm
        dataloader_drop_last=True,
        seed=seed,
        epic_enabled=defense not in ("none", CONTROL),
        epic_fraction=fraction,
        epic_interval=config.epic_interval,
        epic_start_epoch=config.epic_start,
        epic_stop_epoch=config.epic_stop,
        epic_embedding=config.epic_embedding,
        epic_metric=config.epic_metric,
        epic_cluster_threshold=config.epic_cluster_threshold,
    )
    num_labels = poisoned.features["label"].num_classes
    if setting == "scratch":
        torch.manual_seed(seed)
        model = _build_model(config, num_labels)
    else:
        if initial_model is None:
            raise ValueError(f"setting={setting!r} needs the pretrained initial_model to start from.")
        model = initial_model
        if setting == "transfer":
            _freeze_features(model)
    callback = None
    if defense in BASELINE_DEFENSES:
        callback = baseline_callback(defense, args, schedule=schedule, seed=seed)
    trainer = EpicTrainer(
        model=model,
        args=args,
        train_dataset=poisoned.with_transform(_transform(config, augment=True, seed=seed)),
        epic_embedding_dataset=poisoned.with_transform(_transform(config, augment=False)),
        epic_callback=callback,
    )
    if not config.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    state = trainer.epic_state
    dropped = set(state.dropped) if state is not None else set()
    is_poison = poisoned["is_poison"]
    detection = load_metric("poison_detection").compute(
        predictions=[int(i in dropped) for i in range(len(poisoned))], references=[int(p) for p in is_poison]
    )
    predictions = predict_classes(trainer.model, test_ds, config)
    accuracy = load_metric("clean_accuracy").compute(predictions=predictions, references=test_ds["label"])
    attack_scores = _score_attack(trainer.model, spec, test_ds, config)
    state_rounds = state.rounds if state is not None else []
    rounds = [{int(c): int(n) for c, n in r.get("newly_dropped_per_class", {}).items()} for r in state_rounds]
    return {
        "key": cell_key(trial, attack, defense),
        "trial": trial,
        "attack": attack,
        "defense": defense,
        "poison_class": int(spec.poison_class),
        "target_indices": [int(i) for i in spec.target_indices],
        "setting": setting,
        **attack_scores,
        "clean_accuracy": accuracy["clean_accuracy"],
        "num_rows": len(poisoned),
        "num_poisons": detection["num_poisons"],
        "num_dropped": detection["num_dropped"],
        "poisons_dropped": detection["poisons_dropped"],
        "clean_dropped": detection["clean_dropped"],
        "precision": detection["precision"],
        "recall": detection["recall"],
        "f1": detection["f1"],
        "clean_dropped_fraction": detection["clean_dropped_fraction"],
        "rounds_per_class": [{str(c): n for c, n in r.items()} for r in rounds],
        "round_epochs": [int(r["epoch"]) for r in state_rounds],
        # the callback counts each round's poisons from the is_poison column
        "poisons_dropped_per_round": [r.get("poisons_dropped") for r in state_rounds],
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - cell_start,
        "machine": machine_fingerprint(),
    }


# ----------------------------------------------------------------------------------------------------
# the whole grid


def _check_names(kind: str, names: Sequence[str], known: Sequence[str]) -> list[str]:
    """Validate a user's selection of attacks or defenses (order kept, duplicates removed)."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown {kind} {unknown}; choose from {', '.join(known)}.")
    if not names:
        raise ValueError(f"No {kind} selected; choose from {', '.join(known)}.")
    return list(dict.fromkeys(names))


def _check_config_file(output_dir: Path, config: HarnessConfig) -> None:
    """Refuse to mix results of different settings in one output folder."""
    path = output_dir / CONFIG_FILE
    current = json.loads(json.dumps(config.to_dict()))
    if path.exists():
        stored = json.loads(path.read_text())
        # a setting added after the folder was written had its default value there
        defaults = {f.name: f.default for f in dataclasses.fields(HarnessConfig) if f.name not in stored}
        stored = {**json.loads(json.dumps(defaults)), **stored}
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        if changed:
            details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ValueError(
                f"{output_dir} holds results of other settings ({details}); rerun with the same settings to "
                "resume, or pass a new --output_dir."
            )
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2, sort_keys=True))


def run_benchmark(
    config: HarnessConfig,
    *,
    trials: Sequence[int],
    attacks: Sequence[str],
    defenses: Sequence[str],
    output_dir: str | os.PathLike,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every missing (trial, attack, defense) cell, appending each record to ``results.jsonl``.

    Cells already in ``<output_dir>/results.jsonl`` are skipped, so an interrupted run resumes where it
    stopped. The baselines need the reference EPIC cell of the same trial and attack; it is run (and
    recorded) first when it is missing, even if not selected. Poisoned sets are cached under
    ``<output_dir>/poisons`` and reused by every defense. At the end the report files are (re)written
    from every record in the folder, so several processes may run disjoint ``trials`` into one folder
    (one per core): the last to finish writes the whole report.

    Args:
        config: the settings (stored in ``harness_config.json``; a rerun must use the same).
        trials: trial numbers, e.g. ``range(12)``.
        attacks: names from ``ATTACKS``.
        defenses: names from ``DEFENSES``.
        output_dir: folder for results, caches and reports.
        log: called with one line per finished or skipped cell.

    Returns:
        Every record in ``results.jsonl`` (this run's and earlier ones).
    """
    attacks = _check_names("attacks", attacks, ATTACKS)
    defenses = _check_names("defenses", defenses, DEFENSES)
    trials = [int(t) for t in trials]
    if not trials or min(trials) < 0:
        raise ValueError(f"trials={trials}: pass one or more non-negative trial numbers, e.g. range(12).")
    out = Path(output_dir)
    _check_config_file(out, config)
    store = ResultStore(out / RESULTS_FILE)
    reference = config.baseline_reference
    splits = None
    for trial in trials:
        for attack in attacks:
            wanted = [d for d in DEFENSES if d in defenses]
            if any(d in BASELINE_DEFENSES for d in wanted):
                # DEFENSES lists EPIC before the baselines, so the reference runs before its copies
                wanted = [d for d in DEFENSES if d in wanted or d == reference]
            missing = [d for d in wanted if cell_key(trial, attack, d) not in store]
            for defense in wanted:
                if defense not in missing:
                    log(f"skip   trial={trial} attack={attack} defense={defense} (already in {RESULTS_FILE})")
            if not missing:
                continue
            if splits is None:
                splits = load_benchmark_dataset(config)
            setting = victim_setting(attack, config)
            pretrained = None
            if setting != "scratch":
                pretrained = pretrained_model(trial, splits, config, out / "pretrained")
            poisoned, spec, craft_seconds = craft_or_load(
                attack, trial, splits, config, out / "poisons", model=pretrained
            )
            for defense in missing:
                train_set = poisoned
                if defense in CLEAN_SETS:  # the same training, without the poisons
                    clean = splits["train"]
                    train_set = clean.add_column("is_poison", [False] * len(clean))
                schedule = None
                if defense in BASELINE_DEFENSES:
                    ref = store.get(cell_key(trial, attack, reference))
                    schedule = [{int(c): n for c, n in r.items()} for r in ref["rounds_per_class"]]
                work_dir = out / "runs" / attack / f"trial_{trial:03d}" / defense
                initial = None
                if setting != "scratch":  # a fresh copy per defense
                    initial = pretrained_model(trial, splits, config, out / "pretrained")
                record = run_cell(
                    trial,
                    attack,
                    defense,
                    train_set,
                    spec,
                    splits["test"],
                    config,
                    work_dir,
                    schedule,
                    initial_model=initial,
                    setting=setting,
                )
                record["craft_seconds"] = craft_seconds
                store.append(record)
                log(
                    f"done   trial={trial} attack={attack} defense={defense}: asr={record['asr']:.3f} "
                    f"clean_acc={record['clean_accuracy']:.3f} poisons_dropped={record['poisons_dropped']}/"
                    f"{record['num_poisons']} clean_dropped={record['clean_dropped']} "
                    f"wall={record['wall_seconds']:.1f}s"
                )
    # read the file again: another process may have appended cells of other trials to the same folder
    records = list(ResultStore(out / RESULTS_FILE).records.values())
    write_report(records, out, config.to_dict())
    return records
