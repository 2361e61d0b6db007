"""Clean backbones: a model trained on clean rows once, cached, and the starting point of the transfer and
fine-tuning settings (and what the feature-space attacks craft against).

* :func:`backbone_and_task_split` - a recipe's backbone: a pretrained model, or (offline) a tiny model
  trained with the ``Trainer`` on a clean share of the training rows, saved with ``save_pretrained`` in
  ``<output_dir>/_backbone`` and loaded back the way a Hub model is;
* :func:`trial_backbone` - a benchmark trial's backbone: the victim architecture trained on the clean
  training split, cached as safetensors per trial.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..models import build_model
from .data import split_source
from .models import build_classifier, load_pretrained, model_transform
from .runtime import banner, is_main_process

BACKBONE_DIR = "_backbone"  # under output_dir; names starting with "_" are not pushed to the Hub
BACKBONE_INFO = "recipe_backbone.json"

__all__ = [
    "BACKBONE_DIR",
    "backbone_and_task_split",
    "backbone_description",
    "pretrain_backbone",
    "trial_backbone",
]


def pretrain_backbone(
    kind: str, args: Any, training_args: Any, source: Any, id2label: dict[int, str]
) -> tuple[Any, str, bool]:
    """Train a tiny backbone on the clean source rows once, cache it, and load it from the cache.

    The cache is ``<output_dir>/_backbone`` (not pushed to the Hub); it is reused when its settings
    match. With several processes all of them train it together, the main one saves.

    Args:
        kind: Registered model kind.
        args: :class:`~hf_epic.experiments.args.ScriptArguments`.
        training_args: The run's arguments (output_dir, batch size, seed, device).
        source: The clean source rows.
        id2label: Class names.

    Returns:
        ``(model, folder, reused)``: the backbone loaded through ``AutoModelForImageClassification``
        (the path a Hub model takes), its folder, and whether the cache was reused.
    """
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments

    folder = Path(training_args.output_dir) / BACKBONE_DIR
    settings = {
        "kind": kind,
        "dataset": args.dataset_name,
        "variant": args.digits_variant,
        "image_size": args.image_size,
        "num_channels": args.num_channels,
        "rows": len(source),
        "epochs": args.backbone_epochs,
        "learning_rate": args.backbone_learning_rate,
        "seed": training_args.seed,
    }
    info = folder / BACKBONE_INFO
    reused = (
        info.is_file() and json.loads(info.read_text()) == settings and (folder / "config.json").is_file()
    )
    PartialState().wait_for_everyone()  # every rank has decided before anyone writes
    if not reused:
        model = build_classifier(kind, id2label, args.image_size, args.num_channels)
        backbone_args = TrainingArguments(
            output_dir=str(folder),
            num_train_epochs=args.backbone_epochs,
            learning_rate=args.backbone_learning_rate,
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
        train_ds = source.with_transform(model_transform(args.image_size, args.num_channels, augment=True))
        Trainer(model=model, args=backbone_args, train_dataset=train_ds).train()
        if is_main_process():
            model.save_pretrained(folder)
            info.write_text(json.dumps(settings, indent=2))
        PartialState().wait_for_everyone()
    return load_pretrained(str(folder), id2label), str(folder), reused


def backbone_and_task_split(
    kind: str, args: Any, training_args: Any, train: Any, id2label: dict[int, str]
) -> tuple[Any, str, Any, dict[str, Any]]:
    """The pretrained backbone and the rows to fine-tune on.

    With ``--model_name_or_path`` the backbone is that model and every training row is used. Without
    it (offline), a share ``--source_fraction`` of the training rows stays clean and trains a tiny
    backbone of ``kind`` (cached in ``<output_dir>/_backbone``); the other rows are the task.

    Returns:
        ``(backbone, source_name, task_rows, key)``: the backbone model, the name or folder to load
        fresh copies from, the rows to poison and fine-tune on, and settings for the poison cache.
    """
    banner("model")
    if args.model_name_or_path:
        return load_pretrained(args.model_name_or_path, id2label), args.model_name_or_path, train, {}
    source, task = split_source(train, args.source_fraction, training_args.seed)
    backbone, folder, reused = pretrain_backbone(kind, args, training_args, source, id2label)
    note = "reused from the cache" if reused else "trained now"
    if is_main_process():
        print(f"backbone: tiny {kind} on {len(source)} clean source rows ({note}), saved in {folder}")
    return backbone, folder, task, {"backbone": json.loads((Path(folder) / BACKBONE_INFO).read_text())}


def backbone_description(args: Any, key: dict[str, Any]) -> str | None:
    """What a recipe's model was fine-tuned from, in words, for its card (None for a Hub model, which the
    card names itself).

    Args:
        args: Script arguments (``model_name_or_path``, ``dataset_name``).
        key: The ``key`` :func:`backbone_and_task_split` returned.
    """
    info = key.get("backbone")
    if args.model_name_or_path or not info:
        return None
    from .data import dataset_label

    return (
        f"a tiny `{info['kind']}` backbone trained for {info['epochs']} epoch{'s' if info['epochs'] != 1 else ''} on {info['rows']:,} clean "
        f"{dataset_label(args)} rows held out from the fine-tuning rows (saved in `{BACKBONE_DIR}`)"
    )


def trial_backbone(train: Any, config: Any, seed: int, cache_dir: str | os.PathLike, trial: int) -> Any:
    """A benchmark trial's backbone: the victim architecture trained on the clean set (cached as safetensors).

    Args:
        train: The clean training split.
        config: :class:`~hf_epic.experiments.args.BenchmarkConfig` (``model_kind``, ``backbone_epochs``).
        seed: The trial's training seed (initialisation and training).
        cache_dir: Folder of the cached weights (``<cache_dir>/trial_<t>/model.safetensors``).
        trial: Trial number (names the cache entry).

    Returns:
        A freshly loaded copy of the backbone, in eval mode.
    """
    from safetensors.torch import load_file, save_file

    from ..attacks.surrogate import train_surrogate

    path = Path(cache_dir) / f"trial_{trial:03d}" / "model.safetensors"
    torch.manual_seed(seed)
    model = build_model(
        config.model_kind, train.features["label"].num_classes, config.image_size, config.num_channels
    )
    if path.exists():
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval()
    train_surrogate(
        train,
        model=model,
        epochs=config.backbone_epochs,
        seed=seed,
        device="cuda" if torch.cuda.is_available() else "cpu",
        progress=config.progress,
    )
    model = model.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path.with_suffix(".tmp")))
    os.replace(path.with_suffix(".tmp"), path)
    return model.eval()
