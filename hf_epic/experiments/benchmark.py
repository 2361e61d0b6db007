"""The benchmark: trials x attacks x defenses, one trained model per cell, results as they go.

A *cell* is one (trial, attack, defense): the attack crafts a poisoned training set for the trial (seeded
by the trial number, cached on disk and shared by all defenses of that trial), a tiny model is trained on
it under the defense, and the cell's record (attack success rate, clean accuracy, poisons and clean rows
dropped, wall time) is appended to ``results.jsonl`` at once. A rerun reads that file and skips the cells
already there, so an interrupted run loses at most the cell in progress.

Defenses come from :mod:`hf_epic.experiments.defenses`: ``none``; ``epic-0.1`` / ``epic-0.2`` /
``epic-0.3``; the baselines of :mod:`hf_epic.baselines` (``random``, ``high-loss``, ``low-confidence``),
dropping at the rounds and per-class counts recorded by the reference EPIC cell of the same trial and
attack (``BenchmarkConfig.baseline_reference``), which is run first when missing; and two controls on
the CLEAN training set scored on the same targets / triggered images: ``clean-control`` (undefended:
how often the target lands in the poison class without any poison) and ``clean-epic-0.2`` (how often
EPIC's own drops put it there).

:func:`~hf_epic.experiments.report.write_report` writes ``results.md``, ``results.json`` and
``results.png``. The command line is ``recipes/benchmark.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..attacks.registry import attack_names, get_attack
from ..machine import machine_fingerprint
from .args import BenchmarkConfig
from .backbone import trial_backbone
from .data import load_splits
from .defenses import defense_names, get_defense
from .models import FeatureProbe, model_transform
from .poisons import cached_poisons, craft_poisons, draw_classes, victim_setting
from .report import write_report
from .scoring import predict_classes, score_attack
from .training import apply_defense

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = "harness_config.json"

__all__ = [
    "CONFIG_FILE",
    "RESULTS_FILE",
    "ResultStore",
    "attack_seed",
    "cell_key",
    "craft_or_load",
    "run_benchmark",
    "run_cell",
    "train_seed",
]


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


def train_seed(config: BenchmarkConfig, trial: int) -> int:
    """Seed of a trial's model training (and of its attack when ``attack_seed_offset`` is 0)."""
    return int(config.seed) * 1000 + int(trial)


def attack_seed(config: BenchmarkConfig, trial: int) -> int:
    """Seed of a trial's attack: the training seed plus ``config.attack_seed_offset``."""
    return train_seed(config, trial) + int(config.attack_seed_offset)


def craft_or_load(
    attack: str,
    trial: int,
    splits: Any,
    config: BenchmarkConfig,
    cache_dir: str | os.PathLike,
    model: Any = None,
) -> tuple[Any, Any, float]:
    """Craft the trial's poisoned training set, or load it from the cache written by an earlier call.

    Args:
        attack: A registered attack.
        trial: Trial number (seeds the attack).
        splits: ``DatasetDict`` with the clean ``train`` and ``test`` splits.
        config: The settings (``attack_kwargs[attack]`` are the attack's settings).
        cache_dir: Folder of the cached sets (``<cache_dir>/<attack>/trial_<t>``).
        model: The backbone to attack (transfer / fine-tuning attacks).

    Returns:
        ``(poisoned_ds, spec, craft_seconds)``.
    """
    info = get_attack(attack)
    fields = {f.name for f in dataclasses.fields(info.settings)}
    values: dict[str, Any] = dict(config.attack_kwargs.get(attack, {}))
    values.setdefault("seed", attack_seed(config, trial))
    if "progress" in fields:
        values.setdefault("progress", config.progress)
    values.update(draw_classes(info.settings, values, splits["train"].features["label"].num_classes))
    settings = info.make_settings(values)
    folder = Path(cache_dir) / attack / f"trial_{trial:03d}"
    poisoned, spec, seconds, _ = cached_poisons(
        folder,
        {"attack": attack, "trial": trial},
        lambda: craft_poisons(
            info, splits["train"], settings, target_ds=splits["test"], model=model, copy_model=False
        ),
        quiet=not config.progress,
    )
    return poisoned, spec, seconds


def run_cell(
    trial: int,
    attack: str,
    defense: str,
    poisoned: Any,
    spec: Any,
    test_ds: Any,
    config: BenchmarkConfig,
    work_dir: str | os.PathLike,
    schedule: Sequence[Mapping[int, int]] | None = None,
    initial_model: Any = None,
    setting: str = "scratch",
) -> dict[str, Any]:
    """Train one model on a poisoned set under one defense and score it.

    Args:
        trial: Trial number (seeds training).
        attack: Attack name (recorded).
        defense: A registered defense.
        poisoned: The poisoned training set (with ``is_poison``; not modified); for the clean-set
            controls the clean set with an all-False ``is_poison``.
        spec: Its ``PoisonSpec``.
        test_ds: The clean test split.
        config: The settings.
        work_dir: The trainer's ``output_dir`` (``epic_state.json`` lands there).
        schedule: For the baselines, the reference EPIC run's per-round per-class drop counts.
        initial_model: The pretrained model the victim starts from (``setting`` transfer / finetune).
        setting: ``"scratch"`` (new random model), ``"transfer"`` (a :class:`FeatureProbe`: a new linear
            head on the frozen features of ``initial_model``, computed once, rows not augmented) or
            ``"finetune"`` (train all of ``initial_model``).

    Returns:
        The cell's record (JSON-serialisable).
    """
    from hf_epic.epic_config import EpicConfig
    from hf_epic.epic_trainer import EpicTrainer
    from hf_epic.metrics import load_metric
    from hf_epic.models import build_model

    get_defense(defense)  # an unknown name fails before any work
    cell_start = time.perf_counter()
    seed = train_seed(config, trial)
    args = EpicConfig(
        output_dir=str(work_dir),
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
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
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # EPIC shrinks the set mid-training; a last batch of one row would break BatchNorm
        dataloader_drop_last=True,
        seed=seed,
        epic_interval=config.epic_interval,
        epic_start_epoch=config.epic_start_epoch,
        epic_stop_epoch=config.epic_stop_epoch,
        epic_embedding=config.epic_embedding,
        epic_embedding_source=config.epic_embedding_source,
        epic_metric=config.epic_metric,
        epic_cluster_threshold=config.epic_cluster_threshold,
    )
    args, callback = apply_defense(args, defense, schedule, seed)
    num_labels = poisoned.features["label"].num_classes
    if setting == "scratch":
        torch.manual_seed(seed)
        model = build_model(config.model_kind, num_labels, config.image_size, config.num_channels)
    else:
        if initial_model is None:
            raise ValueError(f"setting={setting!r} needs the pretrained initial_model to start from.")
        model = initial_model
    size, channels = config.image_size, config.num_channels
    if setting == "transfer":
        # a linear probe: the frozen features of every row are computed once, and rows are not augmented
        torch.manual_seed(seed)
        model = FeatureProbe(initial_model)
        train_set = embedding_set = model.features_dataset(poisoned, size, channels)
    else:
        train_set = poisoned.with_transform(model_transform(size, channels, augment=True, seed=seed))
        embedding_set = poisoned.with_transform(model_transform(size, channels, augment=False))
    trainer = EpicTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        epic_embedding_dataset=embedding_set,
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
    detection = load_metric("poison_detection").compute(
        predictions=[int(i in dropped) for i in range(len(poisoned))],
        references=[int(p) for p in poisoned["is_poison"]],
    )
    predictions = predict_classes(trainer.model, test_ds, size, channels)
    accuracy = load_metric("clean_accuracy").compute(predictions=predictions, references=test_ds["label"])
    attack_scores = score_attack(
        trainer.model, spec, test_ds, size, channels, train_seed(config, 0), quiet=not config.progress
    )
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


def _check_names(kind: str, names: Sequence[str], known: Sequence[str]) -> list[str]:
    """Validate a user's selection of attacks or defenses (order kept, duplicates removed)."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown {kind} {unknown}; choose from {', '.join(known)}.")
    if not names:
        raise ValueError(f"No {kind} selected; choose from {', '.join(known)}.")
    return list(dict.fromkeys(names))


def _check_config_file(output_dir: Path, config: BenchmarkConfig) -> None:
    """Refuse to mix results of different settings in one output folder."""
    path = output_dir / CONFIG_FILE
    current = json.loads(json.dumps(config.to_dict()))
    if path.exists():
        stored = json.loads(path.read_text())
        # a setting added after the folder was written had its default value there
        defaults = {f.name: f.default for f in dataclasses.fields(BenchmarkConfig) if f.name not in stored}
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
    config: BenchmarkConfig,
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
        config: The settings (stored in ``harness_config.json``; a rerun must use the same).
        trials: Trial numbers, e.g. ``range(12)``.
        attacks: Registered attacks.
        defenses: Registered defenses.
        output_dir: Folder for results, caches and reports.
        log: Called with one line per finished or skipped cell.

    Returns:
        Every record in ``results.jsonl`` (this run's and earlier ones).
    """
    attacks = _check_names("attacks", attacks, attack_names())
    all_defenses = defense_names()
    defenses = _check_names("defenses", defenses, all_defenses)
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
            wanted = [d for d in all_defenses if d in defenses]
            if any(get_defense(d).needs_schedule for d in wanted):
                # EPIC defenses are listed before the baselines, so the reference runs before its copies
                wanted = [d for d in all_defenses if d in wanted or d == reference]
            missing = [d for d in wanted if cell_key(trial, attack, d) not in store]
            for defense in wanted:
                if defense not in missing:
                    log(f"skip   trial={trial} attack={attack} defense={defense} (already in {RESULTS_FILE})")
            if not missing:
                continue
            if splits is None:
                splits = load_splits(config, config.seed)
            setting = victim_setting(attack, config.attack_kwargs)
            seed = train_seed(config, trial)
            backbone_dir = out / "pretrained"
            pretrained = None
            if setting != "scratch":
                pretrained = trial_backbone(splits["train"], config, seed, backbone_dir, trial)
            poisoned, spec, craft_seconds = craft_or_load(
                attack, trial, splits, config, out / "poisons", model=pretrained
            )
            for defense in missing:
                info = get_defense(defense)
                train_set = poisoned
                if info.clean_set:  # the same training, without the poisons
                    clean = splits["train"]
                    train_set = clean.add_column("is_poison", [False] * len(clean))
                schedule = None
                if info.needs_schedule:
                    ref = store.get(cell_key(trial, attack, reference))
                    schedule = [{int(c): n for c, n in r.items()} for r in ref["rounds_per_class"]]
                work_dir = out / "runs" / attack / f"trial_{trial:03d}" / defense
                initial = None
                if setting != "scratch":  # a fresh copy per defense
                    initial = trial_backbone(splits["train"], config, seed, backbone_dir, trial)
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
