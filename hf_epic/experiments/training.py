"""Training runs of the recipes: the ``EpicTrainer`` on a (poisoned) split under a defense, its evaluation,
the closing summary table, and saving / pushing the model with its card.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..epic_config import EpicConfig
from ..epic_trainer import EpicTrainer
from ..model_card import RUN_SUMMARY_FILE as RESULTS_FILE
from .defenses import get_defense
from .models import model_transform
from .poisons import POISON_SPEC_FILE
from .runtime import Timer, banner, is_main_process, shutdown_distributed
from .scoring import accuracy_metrics, score_attack

COMMON_TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_strategy": "epoch",
    "report_to": "none",
    "remove_unused_columns": False,
    "disable_tqdm": True,
}
"""``TrainingArguments`` the recipes share (AdamW with cosine decay; each recipe sets its schedule)."""


def training_defaults(output_dir: str, **values: Any) -> dict[str, Any]:
    """A recipe's ``EpicConfig`` defaults: :data:`COMMON_TRAINING_DEFAULTS`, its output folder and ``values``."""
    return {**COMMON_TRAINING_DEFAULTS, "output_dir": output_dir, **values}


__all__ = [
    "COMMON_TRAINING_DEFAULTS",
    "evaluate_runs",
    "finish",
    "training_defaults",
    "apply_defense",
    "evaluate_run",
    "make_trainer",
    "print_table",
    "save_and_push",
    "train",
    "undefended_args",
]


def apply_defense(
    training_args: EpicConfig, defense: str, schedule: Any = None, seed: int = 0
) -> tuple[EpicConfig, Any]:
    """The training arguments and EPIC callback of a registered defense.

    Args:
        training_args: The run's arguments (not modified).
        defense: A registered defense (:func:`~hf_epic.experiments.defenses.defense_names`).
        schedule: The reference EPIC run's per-round per-class drop counts (baselines).
        seed: Seed of the defense's own randomness.

    Returns:
        ``(args, callback)``: the arguments with the defense's ``epic_enabled`` / ``epic_fraction``,
        and its callback (None: EPIC's own selection).
    """
    info = get_defense(defense)
    if info.needs_schedule and schedule is None:
        raise ValueError(f"The {defense!r} defense needs the reference EPIC run's drop schedule.")
    args = dataclasses.replace(
        training_args, epic_enabled=info.epic_enabled, epic_fraction=info.epic_fraction, **info.epic_settings
    )
    callback = info.callback(args, schedule, seed) if info.callback is not None else None
    return args, callback


def make_trainer(
    model: Any,
    training_args: EpicConfig,
    args: Any,
    train: Any,
    test: Any,
    augment: bool = True,
    defense: str | None = None,
    schedule: Any = None,
) -> EpicTrainer:
    """An ``EpicTrainer`` on the (poisoned) training split, evaluated on the clean test split.

    Args:
        model: The classifier.
        training_args: ``EpicConfig`` of the run.
        args: The script's data arguments (image size, channels).
        train: Training split (``image``, ``label``, maybe ``is_poison``).
        test: Test split.
        augment: Random shifts on training batches (the embedding pass never augments).
        defense: A registered defense to train under (None: EPIC as ``training_args`` sets it).
        schedule: Its drop schedule, for the baselines.
    """
    callback = None
    if defense is not None:
        training_args, callback = apply_defense(training_args, defense, schedule, training_args.seed)
    size, channels = args.image_size, args.num_channels
    return EpicTrainer(
        model=model,
        args=training_args,
        train_dataset=train.with_transform(model_transform(size, channels, augment=augment)),
        epic_embedding_dataset=train.with_transform(model_transform(size, channels, augment=False)),
        eval_dataset=test.with_transform(model_transform(size, channels, augment=False)),
        compute_metrics=accuracy_metrics,
        epic_callback=callback,
    )


def evaluate_run(name: str, trainer: Any, args: Any, test: Any, spec: Any) -> dict[str, Any]:
    """Score a trained run and return its line of the closing table. Clean accuracy (and attack success
    when attacked) are also saved as ``eval_results.json``, so the model card shows them after every push.

    Args:
        name: Run name.
        trainer: The trained trainer.
        args: Script arguments (image size, channels; ``attack_seed`` places a random trigger).
        test: Clean test split.
        spec: The attack's ``PoisonSpec`` or None.
    """
    metrics = trainer.evaluate()
    if spec is not None:
        scores = score_attack(
            trainer.model, spec, test, args.image_size, args.num_channels, args.attack_seed, quiet=False
        )
        metrics.update(eval_attack_success_rate=scores["asr"], eval_attack_evaluated=scores["num_evaluated"])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    state = trainer.epic_state
    rounds = state.rounds if state is not None else []
    last = rounds[-1] if rounds else {}
    last = last if isinstance(last, dict) else asdict(last)
    return {
        "run": name,
        "clean_accuracy": metrics.get("eval_clean_accuracy"),
        "attack_success_rate": metrics.get("eval_attack_success_rate"),
        "rows_dropped": state.num_dropped if state is not None else 0,
        "num_rows": state.num_rows if state is not None else len(trainer.train_dataset),
        "poisons_dropped": last.get("poisons_dropped_total", 0 if spec is not None else None),
        "num_poisons": len(spec.poison_indices) if spec is not None else None,
        "rounds": len(rounds),
    }


def train(trainer: Any) -> Any:
    """Train, and say what EPIC dropped."""
    banner("training")
    trainer.train()
    state = trainer.epic_state
    if state is not None and is_main_process():
        print(f"EPIC: {len(state.rounds)} rounds, {state.num_dropped} of {state.num_rows} rows dropped")
    return trainer


def print_table(rows: list[dict[str, Any]], seconds: float) -> str:
    """Print (and return) the closing Markdown table.

    Args:
        rows: Output of :func:`evaluate_run`, one per run.
        seconds: Wall time of the whole recipe.
    """

    def cell(value: Any, fmt: str = "{:.3f}") -> str:
        return "-" if value is None else fmt.format(value)

    lines = [
        "| run | clean accuracy | attack success | rows dropped | poisons dropped |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        poisons = "-" if r["num_poisons"] is None else f"{r['poisons_dropped'] or 0} of {r['num_poisons']}"
        lines.append(
            f"| {r['run']} | {cell(r['clean_accuracy'])} | {cell(r['attack_success_rate'])} | "
            f"{r['rows_dropped']} of {r['num_rows']} ({r['rounds']} rounds) | {poisons} |"
        )
    text = "\n".join(lines)
    print(text)
    print(f"(wall time {seconds:.0f} s)", flush=True)
    return text


def save_and_push(
    trainer: EpicTrainer,
    training_args: EpicConfig,
    args: Any,
    spec: Any,
    rows: list[dict[str, Any]],
    dataset_label: str,
    base_model: str | None = None,
) -> None:
    """Save the model, the attack's spec and the results; write the card; push when asked.

    The card (``README.md``) gets the EPIC section, plots and metadata from
    ``EpicTrainer.create_model_card``; ``push_to_hub`` regenerates it the same way.

    Args:
        trainer: The defended run's trainer.
        training_args: Its ``EpicConfig`` (``push_to_hub``, ``hub_model_id``, ``output_dir``).
        args: Script arguments (``model_name_or_path`` names the base model on the card).
        spec: The attack's ``PoisonSpec`` or None.
        rows: The summary table's rows.
        dataset_label: Data set name for the card.
        base_model: What the model was fine-tuned from, in words, when it is not a Hub model (the
            card's first sentence names it).
    """
    out = Path(training_args.output_dir)
    trainer.save_model()
    if is_main_process():
        if spec is not None:
            spec.save(out / POISON_SPEC_FILE)
        payload = {
            "script_args": asdict(args),
            "rows": rows,
            "base_model": base_model,
            "argv": sys.argv[1:],
            "world_size": training_args.world_size,
        }
        (out / RESULTS_FILE).write_text(json.dumps(payload, indent=2, default=str))
    card_kwargs: dict[str, Any] = {"dataset": dataset_label, "tasks": "image-classification"}
    if args.model_name_or_path:
        card_kwargs["finetuned_from"] = args.model_name_or_path
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="EPIC-defended model", **card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)
    if is_main_process():
        print(f"model, card and plots in {out}", flush=True)


def undefended_args(training_args: EpicConfig) -> EpicConfig:
    """The same arguments with EPIC off and a separate output folder (``_undefended``, not pushed).

    Args:
        training_args: The defended run's arguments.
    """
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    values.update(
        epic_enabled=False, output_dir=str(Path(training_args.output_dir) / "_undefended"), push_to_hub=False
    )
    return EpicConfig(**values)


def evaluate_runs(
    trainer: Any,
    args: Any,
    poisoned: Any,
    test: Any,
    spec: Any,
    undefended_model: Any,
    augment: bool = True,
) -> list[dict[str, Any]]:
    """Score the defended run and, with ``--compare_undefended``, train and score the same run without EPIC.

    Args:
        trainer: The trained, defended trainer (its ``args`` are the run's ``EpicConfig``).
        args: Script arguments.
        poisoned: The (poisoned) training split.
        test: Clean test split.
        spec: The attack's ``PoisonSpec`` or None.
        undefended_model: ``() -> model``: a fresh model for the undefended run.
        augment: Random shifts on the undefended run's training batches (as the defended run's).

    Returns:
        The closing table's rows.
    """
    training_args = trainer.args
    banner("evaluation")
    rows = [evaluate_run(f"EPIC-{training_args.epic_fraction}", trainer, args, test, spec)]
    if args.compare_undefended:
        plain = make_trainer(
            undefended_model(), undefended_args(training_args), args, poisoned, test, augment
        )
        rows.append(evaluate_run("no defense", train(plain), args, test, spec))
    return rows


def finish(
    trainer: Any,
    args: Any,
    spec: Any,
    rows: list[dict[str, Any]],
    timer: Timer,
    base_model: str | None = None,
) -> None:
    """Save and push the defended run (:func:`save_and_push`), print the closing table, shut down cleanly.

    Args:
        trainer: The defended run's trainer (its ``args`` are the run's ``EpicConfig``).
        args: Script arguments.
        spec: The attack's ``PoisonSpec`` or None.
        rows: The closing table's rows.
        timer: Started when the recipe started.
        base_model: What the model was fine-tuned from, in words (offline backbones; see
            :func:`~hf_epic.experiments.backbone.backbone_description`).
    """
    from .data import dataset_label

    banner("save and push")
    save_and_push(trainer, trainer.args, args, spec, rows, dataset_label(args), base_model)
    if is_main_process():
        print_table(rows, timer())
    shutdown_distributed()
