"""What the recipes share: their command-line arguments, data, models, attacks, evaluation and the
closing summary table. Each recipe file reads top to bottom in banner sections and calls these.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_epic import EpicConfig, EpicTrainer
from hf_epic.harness import normalise_columns
from hf_epic.models import build_tiny_cnn, build_tiny_timm, build_tiny_vit, image_transform

BACKBONE_DIR = "_backbone"  # under output_dir; names starting with "_" are not pushed to the Hub
BACKBONE_INFO = "recipe_backbone.json"
RESULTS_FILE = "recipe_results.json"
POISON_SPEC_FILE = "poison_spec.json"
TARGETED_ATTACKS = ("gradient_matching", "bullseye_polytope", "feature_collision")
BACKDOOR_ATTACKS = ("sleeper_agent", "badnets")
FEATURE_ATTACKS = ("bullseye_polytope", "feature_collision")  # need only the backbone's features


# TrainingArguments every recipe shares (each recipe adds its schedule and EPIC settings)
COMMON_TRAINING_DEFAULTS: dict[str, Any] = {
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


@dataclass
class ScriptArguments:
    """Recipe settings beside the training ones (those are ``EpicConfig``: every
    ``TrainingArguments`` flag plus ``--epic_*``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained model: a Hub id (google/vit-base-patch16-224-in21k), a timm name "
            "(timm/vit_tiny_patch16_224.augreg_in21k or vit_tiny_patch16_224) or a local folder. "
            "Default: a tiny model built from a config (fine-tuning/transfer first train it on a clean "
            "source split and cache it in <output_dir>/_backbone)."
        },
    )
    model_kind: str = field(
        default="vit",
        metadata={
            "help": "Tiny model built from a config when no --model_name_or_path: 'vit' (HF ViT), "
            "'timm-vit' or 'cnn' (timm ResNet). The fine-tuning recipe always uses a ViT."
        },
    )
    dataset_name: str = field(
        default="digits",
        metadata={"help": "'digits' (offline, scikit-learn digits rendered as images) or a Hub dataset id."},
    )
    digits_variant: str = field(
        default="hard", metadata={"help": "'hard' or 'plain' (for --dataset_name digits)."}
    )
    image_size: int = field(
        default=32, metadata={"help": "Side of the model's square input (224 for ViT-B/16)."}
    )
    num_channels: int | None = field(
        default=None, metadata={"help": "1 (grayscale) or 3 (RGB); default: as the data set's images."}
    )
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only this many training rows."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Use only this many test rows."})
    source_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Fine-tuning/transfer without --model_name_or_path: share of the training rows kept "
            "clean to train the backbone; the rest is the (poisoned) fine-tuning set."
        },
    )
    backbone_epochs: int = field(
        default=6, metadata={"help": "Epochs of the clean backbone (offline default)."}
    )
    backbone_learning_rate: float = field(
        default=3e-3, metadata={"help": "Learning rate of the clean backbone."}
    )
    attack: str = field(
        default="gradient_matching",
        metadata={
            "help": "Poisoning attack: gradient_matching, bullseye_polytope, feature_collision, "
            "sleeper_agent, badnets, or 'none'."
        },
    )
    poison_budget: float = field(
        default=0.01, metadata={"help": "Poisons as a fraction of the training rows."}
    )
    poison_epsilon: float = field(
        default=16 / 255, metadata={"help": "l_inf bound of the perturbations, in [0, 1]."}
    )
    poison_class: int | None = field(default=None, metadata={"help": "Class of the poisons (None: chosen)."})
    num_targets: int = field(default=1, metadata={"help": "Targets of a targeted attack."})
    attack_steps: int = field(default=80, metadata={"help": "Optimisation steps of the attack."})
    attack_restarts: int = field(default=1, metadata={"help": "Random restarts of the attack."})
    surrogate_epochs: int = field(
        default=6, metadata={"help": "Epochs of the attacker's surrogate when no backbone is given to it."}
    )
    attack_seed: int = field(default=0, metadata={"help": "Seed of the attack."})
    compare_undefended: bool = field(
        default=False, metadata={"help": "Also train without EPIC on the same poisoned set and compare."}
    )


def parse_args(
    script_defaults: dict[str, Any],
    training_defaults: dict[str, Any],
    script_class: type = ScriptArguments,
    argv: list[str] | None = None,
) -> tuple[Any, EpicConfig]:
    """Parse ``HfArgumentParser((ScriptArguments, EpicConfig))`` with recipe-specific defaults.

    Args:
        script_defaults: Defaults for ``ScriptArguments`` fields.
        training_defaults: Defaults for ``EpicConfig`` fields (output_dir, epochs, learning rate, ...).
        script_class: ``ScriptArguments`` or a recipe's subclass of it.
        argv: Arguments to parse (default: the command line).
    """
    parser = HfArgumentParser((script_class, EpicConfig))
    # On a machine without a visible GPU, run on the CPU explicitly: the Trainer then also joins a
    # multi-process CPU launch (recipes/accelerate_configs/cpu_2proc.yaml) instead of ignoring it.
    parser.set_defaults(use_cpu=not torch.cuda.is_available())
    parser.set_defaults(**script_defaults, **training_defaults)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_script_args(script_args)
    return script_args, training_args


def check_script_args(a: ScriptArguments) -> None:
    """Reject bad settings before any data is loaded or time spent.

    Args:
        a: The parsed script arguments.
    """
    if a.model_kind not in ("vit", "timm-vit", "cnn"):
        raise ValueError(f"--model_kind {a.model_kind!r}: use 'vit', 'timm-vit' or 'cnn'.")
    known = (*TARGETED_ATTACKS, *BACKDOOR_ATTACKS, "none")
    if a.attack not in known:
        raise ValueError(f"--attack {a.attack!r} is unknown; use one of {', '.join(known)}.")
    if not 0.0 < a.source_fraction < 1.0:
        raise ValueError(
            f"--source_fraction {a.source_fraction} must lie strictly between 0 and 1, e.g. 0.5."
        )
    if not 0.0 < a.poison_budget < 1.0:
        raise ValueError(f"--poison_budget {a.poison_budget} is a fraction of the rows; use e.g. 0.01.")
    if a.num_channels is not None and a.num_channels not in (1, 3):
        raise ValueError(f"--num_channels {a.num_channels}: use 1 (grayscale) or 3 (RGB).")
    if a.image_size < 8:
        raise ValueError(f"--image_size {a.image_size} is too small; use 32 for digits, 224 for ViT-B/16.")
    for name in ("max_train_rows", "max_eval_rows"):
        value = getattr(a, name)
        if value is not None and value < 20:
            raise ValueError(f"--{name} {value} leaves too few rows to train or score; use at least 20.")


def banner(title: str) -> None:
    """Print a section banner (main process only), so the log reads like the recipe."""
    if is_main_process():
        print(f"\n{'=' * 24} {title} {'=' * max(2, 60 - len(title))}", flush=True)


def is_main_process() -> bool:
    """True on the process that prints and writes (rank 0, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------------------ data


def load_data(a: ScriptArguments, seed: int) -> Any:
    """Train and test splits with ``image`` and ``label`` columns.

    Args:
        a: Script arguments (dataset, variant, image size, row limits).
        seed: Seed of the digits rendering and of row subsampling.
    """
    import datasets

    if a.dataset_name == "digits":
        from hf_epic.data import load_digits_dataset

        dd = load_digits_dataset(a.digits_variant, seed=seed, image_size=a.image_size)
    else:
        loaded = datasets.load_dataset(a.dataset_name)
        test_split = next((s for s in ("test", "validation") if s in loaded), None)
        if "train" not in loaded or test_split is None:
            raise ValueError(
                f"{a.dataset_name} has splits {sorted(loaded)}; the recipes need train and test."
            )
        dd = datasets.DatasetDict(
            train=normalise_columns(loaded["train"]), test=normalise_columns(loaded[test_split])
        )
    train, test = dd["train"], dd["test"]
    if a.max_train_rows is not None and a.max_train_rows < len(train):
        train = train.shuffle(seed=seed).select(range(a.max_train_rows)).flatten_indices()
    if a.max_eval_rows is not None and a.max_eval_rows < len(test):
        test = test.shuffle(seed=seed).select(range(a.max_eval_rows)).flatten_indices()
    if a.num_channels is None:  # the model and the attacks see the images as they are stored
        a.num_channels = 1 if train[0]["image"].mode == "L" else 3
    return datasets.DatasetDict(train=train, test=test)


def split_source(train: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split the training rows into a clean source part (for the backbone) and the rest, by class.

    Args:
        train: The training split.
        fraction: Share of rows in the source part.
        seed: Seed of the split.

    Returns:
        ``(source, rest)``.
    """
    parts = train.train_test_split(test_size=1.0 - fraction, stratify_by_column="label", seed=seed)
    return parts["train"].flatten_indices(), parts["test"].flatten_indices()


def model_transform(a: ScriptArguments, augment: bool) -> Any:
    """``set_transform`` function: ``image`` -> ``pixel_values``, keeps ``label``, drops the rest
    (``is_poison`` stays in the dataset's features, where EPIC reads it, but not in batches).

    Args:
        a: Script arguments (image size, channels).
        augment: Random 2-pixel shifts (training only).
    """
    base = image_transform(a.image_size, a.num_channels, augment=augment)

    def transform(batch: dict[str, list]) -> dict[str, list]:
        out = base(batch)
        return {"pixel_values": out["pixel_values"], "label": out["label"]}

    return transform


def label_names(ds: Any) -> dict[int, str]:
    """``id2label`` from a dataset's ClassLabel feature."""
    names = ds.features["label"].names
    return dict(enumerate(names))


# ------------------------------------------------------------------------------------------ models


def build_model(kind: str, a: ScriptArguments, id2label: dict[int, str]) -> Any:
    """A tiny classifier built from a config (random weights, offline).

    Args:
        kind: ``"vit"`` (HF ViT), ``"timm-vit"`` or ``"cnn"`` (timm ResNet).
        a: Script arguments (image size, channels).
        id2label: Class names.
    """
    n = len(id2label)
    if kind == "vit":
        model = build_tiny_vit(n, a.image_size, a.num_channels)
    elif kind == "timm-vit":
        model = build_tiny_timm(n, a.image_size, a.num_channels)
    elif kind == "cnn":
        model = build_tiny_cnn(n, a.image_size, a.num_channels)
    else:
        raise ValueError(f"model kind {kind!r}: use 'vit', 'timm-vit' or 'cnn'.")
    model.config.id2label = dict(id2label)
    model.config.label2id = {v: k for k, v in id2label.items()}
    return model


def load_pretrained(name_or_path: str, id2label: dict[int, str]) -> Any:
    """Load a pretrained image classifier with a fresh head for these classes.

    Hub ids and local folders go through ``AutoModelForImageClassification`` (timm checkpoints on
    the Hub load as ``TimmWrapperForImageClassification``); a bare timm name such as
    ``vit_tiny_patch16_224`` is looked up as ``timm/<name>``.

    Args:
        name_or_path: Hub id, timm name or local folder.
        id2label: Class names of the task (the head is re-initialised when the size differs).
    """
    from transformers import AutoModelForImageClassification

    source = name_or_path
    if not Path(source).exists() and "/" not in source:
        source = f"timm/{source}"
    return AutoModelForImageClassification.from_pretrained(
        source,
        num_labels=len(id2label),
        id2label=dict(id2label),
        label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True,
    )


def clean_backbone(
    kind: str, a: ScriptArguments, training_args: TrainingArguments, source: Any, id2label: dict[int, str]
) -> tuple[Any, str, bool]:
    """Train a backbone on the clean source split once, cache it, and load it from the cache.

    The cache is ``<output_dir>/_backbone`` (not pushed to the Hub); it is reused when its
    settings match. With several processes all of them train it together, the main one saves.

    Args:
        kind: Tiny model kind (see :func:`build_model`).
        a: Script arguments.
        training_args: The run's arguments (output_dir, batch size, seed, device).
        source: The clean source split.
        id2label: Class names.

    Returns:
        ``(model, folder, reused)``: the backbone loaded from its folder through
        ``AutoModelForImageClassification`` (the path a Hub model takes), the folder, and whether
        the cache was reused.
    """
    from accelerate import PartialState

    folder = Path(training_args.output_dir) / BACKBONE_DIR
    settings = {
        "kind": kind,
        "dataset": a.dataset_name,
        "variant": a.digits_variant,
        "image_size": a.image_size,
        "num_channels": a.num_channels,
        "rows": len(source),
        "epochs": a.backbone_epochs,
        "learning_rate": a.backbone_learning_rate,
        "seed": training_args.seed,
    }
    info = folder / BACKBONE_INFO
    reused = (
        info.is_file() and json.loads(info.read_text()) == settings and (folder / "config.json").is_file()
    )
    PartialState().wait_for_everyone()  # every rank has decided before anyone writes
    if not reused:
        model = build_model(kind, a, id2label)
        args = TrainingArguments(
            output_dir=str(folder),
            num_train_epochs=a.backbone_epochs,
            learning_rate=a.backbone_learning_rate,
            per_device_train_batch_size=training_args.per_device_train_batch_size,
            warmup_steps=0.1,
            weight_decay=0.05,
            lr_scheduler_type="cosine",
            seed=training_args.seed,
            use_cpu=training_args.use_cpu,
            report_to=[],
            save_strategy="no",
            logging_strategy="epoch",
            remove_unused_columns=False,
            disable_tqdm=True,
            dataloader_num_workers=training_args.dataloader_num_workers,
        )
        train_ds = source.with_transform(model_transform(a, augment=True))
        Trainer(model=model, args=args, train_dataset=train_ds).train()
        if is_main_process():
            model.save_pretrained(folder)
            info.write_text(json.dumps(settings, indent=2))
        PartialState().wait_for_everyone()
    return load_pretrained(str(folder), id2label), str(folder), reused


def backbone_and_task_split(
    kind: str, a: ScriptArguments, training_args: TrainingArguments, train: Any, id2label: dict[int, str]
) -> tuple[Any, str, Any, dict[str, Any]]:
    """The pretrained backbone and the rows to fine-tune on.

    With ``--model_name_or_path`` the backbone is that model and every training row is used.
    Without it (offline), a share ``--source_fraction`` of the training rows stays clean and trains
    a tiny backbone of ``kind`` (cached in ``<output_dir>/_backbone``); the other rows are the task.

    Args:
        kind: Tiny model kind for the offline backbone.
        a: Script arguments.
        training_args: The run's arguments.
        train: The training split.
        id2label: Class names.

    Returns:
        ``(backbone, source_name, task_rows, key)``: the backbone model, the name or folder to load
        fresh copies from, the rows to poison and fine-tune on, and settings for the poison cache.
    """
    if a.model_name_or_path:
        return load_pretrained(a.model_name_or_path, id2label), a.model_name_or_path, train, {}
    source, task = split_source(train, a.source_fraction, training_args.seed)
    backbone, folder, reused = clean_backbone(kind, a, training_args, source, id2label)
    note = "reused from the cache" if reused else "trained now"
    print(f"backbone: tiny {kind} on {len(source)} clean source rows ({note}), saved in {folder}")
    return backbone, folder, task, {"backbone": json.loads((Path(folder) / BACKBONE_INFO).read_text())}


def freeze_all_but_head(model: Any) -> int:
    """Freeze every parameter except the final classifier; return the trainable count.

    Args:
        model: An HF ViT (``classifier``) or a timm wrapper (``timm_model.get_classifier()``).
    """
    head = model.timm_model.get_classifier() if hasattr(model, "timm_model") else model.classifier
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reset_head(model: Any, seed: int) -> None:
    """Re-initialise the final classifier (a new linear head on a pretrained backbone).

    Args:
        model: An HF ViT or a timm wrapper.
        seed: Seed of the initialisation.
    """
    head = model.timm_model.get_classifier() if hasattr(model, "timm_model") else model.classifier
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
        head.bias.zero_()


# ------------------------------------------------------------------------------------------ attack


def attack_function(name: str) -> Any:
    """``craft_<name>`` from ``hf_epic.attacks`` (the package or one of its modules).

    Args:
        name: Attack name, e.g. ``gradient_matching``.
    """
    wanted = f"craft_{name}"
    package = importlib.import_module("hf_epic.attacks")
    if hasattr(package, wanted):
        return getattr(package, wanted)
    for module_name in (name, "feature_space"):
        try:
            module = importlib.import_module(f"hf_epic.attacks.{module_name}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, wanted):
            return getattr(module, wanted)
    raise ValueError(f"--attack {name}: this hf_epic has no hf_epic.attacks.{wanted}; pick another attack.")


def craft_poisons(a: ScriptArguments, train: Any, test: Any, surrogate: Any = None) -> tuple[Any, Any]:
    """Poison the training split with ``hf_epic.attacks.<attack>.craft_<attack>``.

    Only the keyword arguments the attack's function takes are passed.

    Args:
        a: Script arguments (attack, budget, epsilon, steps, ...).
        train: Clean training split.
        test: Test split (the targets come from it).
        surrogate: The attacker's model (a copy is used); None lets the attack train its own.

    Returns:
        ``(poisoned_train, spec)``; with ``--attack none``, ``(train, None)``.
    """
    if a.attack == "none":
        return train, None
    craft = attack_function(a.attack)
    wanted = {
        "target_ds": test,
        "poison_class": a.poison_class,
        "num_targets": a.num_targets,
        "budget": a.poison_budget,
        "epsilon": a.poison_epsilon,
        "steps": a.attack_steps,
        "restarts": a.attack_restarts,
        "surrogate_epochs": None if surrogate is not None else a.surrogate_epochs,
        "model": copy.deepcopy(surrogate).eval() if surrogate is not None else None,
        "progress": False,
        "seed": a.attack_seed,
    }
    model = wanted["model"]
    if model is not None and hasattr(model, "set_attn_implementation"):
        # Gradient attacks differentiate through the gradient (double backward), which the fused
        # CPU attention kernel does not support; the eager one does.
        model.set_attn_implementation("eager")
    params = inspect.signature(craft).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    return craft(train, **kwargs)


def poisoned_training_set(
    a: ScriptArguments,
    training_args: TrainingArguments,
    train: Any,
    test: Any,
    surrogate: Any = None,
    key: dict[str, Any] | None = None,
) -> tuple[Any, Any, bool]:
    """Craft the poisons on the main process, cache them in ``<output_dir>/_poisoned``, load on all.

    Args:
        a: Script arguments.
        training_args: The run's arguments (output_dir, main_process_first).
        train: Clean training split.
        test: Test split.
        surrogate: The attacker's model, or None.
        key: More settings that decide the poisons (e.g. the backbone's), for the cache check.

    Returns:
        ``(poisoned_train, spec, reused)``; ``(train, None, False)`` with ``--attack none``.
    """
    import datasets

    from hf_epic.attacks.spec import PoisonSpec

    if a.attack == "none":
        return train, None, False
    folder = Path(training_args.output_dir) / "_poisoned"
    settings = {
        **{k: v for k, v in asdict(a).items() if k not in ("compare_undefended", "backbone_learning_rate")},
        "train_rows": len(train),
        "seed": training_args.seed,
        **(key or {}),
    }
    info = folder / "settings.json"
    with training_args.main_process_first(desc="crafting poisons"):
        reused = info.is_file() and json.loads(info.read_text()) == settings
        if not reused and is_main_process():
            poisoned, spec = craft_poisons(a, train, test, surrogate)
            poisoned.save_to_disk(str(folder / "dataset"))
            spec.save(folder / POISON_SPEC_FILE)
            info.write_text(json.dumps(settings, indent=2))
        poisoned = datasets.load_from_disk(str(folder / "dataset"))
        spec = PoisonSpec.load(folder / POISON_SPEC_FILE)
    return poisoned, spec, reused


# ------------------------------------------------------------------------------------------ training


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: clean accuracy through the shipped evaluate module."""
    from hf_epic.metrics import load_metric

    logits, labels = eval_pred
    predictions = np.asarray(logits).argmax(-1)
    result = load_metric("clean_accuracy").compute(predictions=predictions, references=np.asarray(labels))
    return {"clean_accuracy": result["clean_accuracy"]}


def make_trainer(
    model: Any, training_args: EpicConfig, a: ScriptArguments, train: Any, test: Any, augment: bool = True
) -> EpicTrainer:
    """An ``EpicTrainer`` on the (poisoned) training split, evaluated on the clean test split.

    Args:
        model: The classifier.
        training_args: ``EpicConfig`` of the run.
        a: Script arguments.
        train: Training split (``image``, ``label``, maybe ``is_poison``).
        test: Test split.
        augment: Random shifts on training batches (the embedding pass never augments).
    """
    return EpicTrainer(
        model=model,
        args=training_args,
        train_dataset=train.with_transform(model_transform(a, augment=augment)),
        epic_embedding_dataset=train.with_transform(model_transform(a, augment=False)),
        eval_dataset=test.with_transform(model_transform(a, augment=False)),
        compute_metrics=accuracy_metrics,
    )


# ------------------------------------------------------------------------------------------ evaluation


def _predict_images(trainer: Trainer, ds: Any, a: ScriptArguments) -> np.ndarray:
    """Predicted classes of a dataset of images."""
    out = trainer.predict(ds.with_transform(model_transform(a, augment=False)), metric_key_prefix="predict")
    return np.asarray(out.predictions).argmax(-1)


def attack_success(trainer: Trainer, a: ScriptArguments, test: Any, spec: Any) -> dict[str, float]:
    """Attack success rate on the test split, through the shipped ``attack_success_rate`` metric.

    Targeted attacks: the share of target images classified as the poison class. Backdoors: the
    share of triggered test images (true class not the poison class) classified as the poison class.

    Args:
        trainer: The trained trainer.
        a: Script arguments.
        test: Clean test split.
        spec: The attack's ``PoisonSpec``.
    """
    from hf_epic.metrics import load_metric

    if spec.target_indices:
        preds = _predict_images(trainer, test.select(spec.target_indices), a)
        result = load_metric("attack_success_rate").compute(
            predictions=preds.tolist(), references=[spec.poison_class] * len(preds)
        )
    else:
        from hf_epic.attacks.trigger import apply_trigger

        source_class = (spec.trigger or {}).get("source_class")
        if source_class is not None:  # a source-specific trigger is scored on that class only
            test = test.filter(lambda label: label == source_class, input_columns="label")
        triggered = apply_trigger(test, spec.trigger, image_column="image", seed=a.attack_seed)
        preds = _predict_images(trainer, triggered, a)
        result = load_metric("attack_success_rate", config_name="backdoor").compute(
            predictions=preds.tolist(), references=list(test["label"]), poison_class=spec.poison_class
        )
    return {"attack_success_rate": result["attack_success_rate"], "attack_evaluated": result["num_evaluated"]}


def evaluate_run(trainer: Trainer, a: ScriptArguments, test: Any, spec: Any) -> dict[str, float]:
    """Clean accuracy (and attack success when attacked) of a trained run, also saved as
    ``eval_results.json`` so the model card shows them after every push.

    Args:
        trainer: The trained trainer.
        a: Script arguments.
        test: Clean test split.
        spec: The attack's ``PoisonSpec`` or None.
    """
    metrics = trainer.evaluate()
    if spec is not None:
        metrics.update({f"eval_{k}": v for k, v in attack_success(trainer, a, test, spec).items()})
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def summary_row(name: str, trainer: EpicTrainer, metrics: dict[str, float], spec: Any) -> dict[str, Any]:
    """One line of the closing table.

    Args:
        name: Run name.
        trainer: The trained trainer.
        metrics: Output of :func:`evaluate_run`.
        spec: The attack's ``PoisonSpec`` or None.
    """
    state = trainer.epic_state
    rounds = state.rounds if state is not None else []
    last = rounds[-1] if rounds else {}
    last = last if isinstance(last, dict) else asdict(last)
    num_rows = state.num_rows if state is not None else len(trainer.train_dataset)
    return {
        "run": name,
        "clean_accuracy": metrics.get("eval_clean_accuracy"),
        "attack_success_rate": metrics.get("eval_attack_success_rate"),
        "rows_dropped": state.num_dropped if state is not None else 0,
        "num_rows": num_rows,
        "poisons_dropped": last.get("poisons_dropped_total", 0 if spec is not None else None),
        "num_poisons": len(spec.poison_indices) if spec is not None else None,
        "rounds": len(rounds),
    }


def print_table(rows: list[dict[str, Any]], seconds: float) -> str:
    """Print (and return) the closing Markdown table.

    Args:
        rows: Output of :func:`summary_row`, one per run.
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


# ------------------------------------------------------------------------------------------ save and push


def save_and_push(
    trainer: EpicTrainer,
    training_args: EpicConfig,
    a: ScriptArguments,
    spec: Any,
    rows: list[dict[str, Any]],
    finetuned_from: str | None,
    dataset_label: str,
) -> None:
    """Save the model, the attack's spec and the results; write the card; push when asked.

    The card (``README.md``) gets the EPIC section, plots and metadata from
    ``EpicTrainer.create_model_card``; ``push_to_hub`` regenerates it the same way.

    Args:
        trainer: The defended run's trainer.
        training_args: Its ``EpicConfig`` (``push_to_hub``, ``hub_model_id``, ``output_dir``).
        a: Script arguments.
        spec: The attack's ``PoisonSpec`` or None.
        rows: The summary table's rows.
        finetuned_from: Pretrained model id, when one was used.
        dataset_label: Dataset name for the card.
    """
    out = Path(training_args.output_dir)
    trainer.save_model()
    if is_main_process():
        if spec is not None:
            spec.save(out / POISON_SPEC_FILE)
        payload = {
            "script_args": asdict(a),
            "rows": rows,
            "argv": sys.argv[1:],
            "world_size": training_args.world_size,
        }
        (out / RESULTS_FILE).write_text(json.dumps(payload, indent=2, default=str))
    card_kwargs: dict[str, Any] = {"dataset": dataset_label, "tasks": "image-classification"}
    if finetuned_from:
        card_kwargs["finetuned_from"] = finetuned_from
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="EPIC-defended model", **card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)
    if is_main_process():
        print(f"model, card and plots in {out}", flush=True)


def dataset_label(a: ScriptArguments) -> str:
    """Name of the data set for the card."""
    return f"digits-{a.digits_variant}" if a.dataset_name == "digits" else a.dataset_name


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


class Timer:
    """Wall time since construction."""

    def __init__(self) -> None:
        self.start = time.time()

    def __call__(self) -> float:
        return time.time() - self.start


def shutdown_distributed() -> None:
    """Wait for every process, then tear the process group down before the interpreter exits.

    Left to interpreter exit, gloo's teardown can abort a process ("terminate called without an
    active exception") after the work is done, which fails the launch.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
