"""Models for the experiments: tiny kinds from the registry (:func:`hf_epic.models.build_model`), pretrained
ones from the Hub or a folder, and the head surgery of the transfer and fine-tuning settings.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..attacks.surrogate import classifier_layer
from ..models import build_model, image_transform

__all__ = [
    "build_classifier",
    "model_for",
    "new_model",
    "model_transform",
    "pretrained_copy",
    "freeze_all_but_head",
    "freeze_features",
    "load_pretrained",
    "reset_head",
]


def build_classifier(kind: str, id2label: dict[int, str], image_size: int, num_channels: int) -> Any:
    """A tiny classifier of a registered kind with these class names (random weights, offline).

    Args:
        kind: A registered model kind (``vit``, ``timm-vit``, ``cnn``, ...).
        id2label: Class names.
        image_size: Side of the square input, in pixels.
        num_channels: 1 or 3.
    """
    model = build_model(kind, len(id2label), image_size, num_channels)
    model.config.id2label = dict(id2label)
    model.config.label2id = {v: k for k, v in id2label.items()}
    return model


def model_transform(
    image_size: int, num_channels: int, augment: bool, seed: int | None = None
) -> Callable[[dict[str, list]], dict[str, list]]:
    """``with_transform`` function feeding a model: ``image`` -> ``pixel_values``, keeps ``label``, drops
    the rest (``is_poison`` stays in the dataset's features, where EPIC reads it, but not in batches).

    Args:
        image_size: Side of the model's input.
        num_channels: 1 or 3.
        augment: Random 2-pixel shifts (training only).
        seed: Seed of the shifts (None: from torch's global generator when the transform is built).
    """
    base = image_transform(image_size, num_channels, augment=augment, seed=seed)

    def transform(batch: dict[str, list]) -> dict[str, list]:
        out = base(batch)
        return {k: out[k] for k in ("pixel_values", "label") if k in out}

    return transform


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


def model_for(args: Any, id2label: dict[int, str]) -> Any:
    """The model a recipe trains from scratch: ``--model_name_or_path``, or a tiny ``--model_kind``."""
    if args.model_name_or_path:
        return load_pretrained(args.model_name_or_path, id2label)
    return build_classifier(args.model_kind, id2label, args.image_size, args.num_channels)


def new_model(args: Any, id2label: dict[int, str]) -> Any:
    """:func:`model_for`, announced: the recipes' model step."""
    from .runtime import banner, is_main_process

    banner("model")
    model = model_for(args, id2label)
    if is_main_process():
        print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return model


def pretrained_copy(source: str, id2label: dict[int, str], seed: int, new_head: bool) -> Any:
    """A fresh copy of a backbone with a classification head for these classes.

    Args:
        source: Hub id, timm name or a cached backbone's folder.
        id2label: Class names.
        seed: Seed of the new head.
        new_head: Re-initialise the loaded head (it was trained on the source task; a Hub model's head
            is replaced by ``from_pretrained`` already).
    """
    model = load_pretrained(source, id2label)
    if new_head:
        reset_head(model, seed)
    return model


def _only_head_trains(model: Any) -> torch.nn.Module:
    """Freeze every parameter except the final classifier's; return the classifier."""
    head = classifier_layer(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def freeze_all_but_head(model: Any) -> int:
    """Freeze every parameter except the final classifier; return the trainable count.

    Args:
        model: An HF ViT (``classifier``) or a timm wrapper (``timm_model.get_classifier()``).
    """
    _only_head_trains(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reset_head(model: Any, seed: int) -> None:
    """Re-initialise the final classifier from ``seed`` (a new linear head on a pretrained backbone).

    Args:
        model: An HF ViT or a timm wrapper.
        seed: Seed of the initialisation.
    """
    head = classifier_layer(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
        head.bias.zero_()


def freeze_features(model: Any) -> None:
    """Transfer setting: freeze all but a re-initialised final layer, and keep normalisation and dropout
    layers in eval mode (the Trainer calls ``model.train()`` every step; frozen features keep their
    statistics)."""
    head = classifier_layer(model)
    head.reset_parameters()
    _only_head_trains(model)
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)):
            module.eval()
            module.train = types.MethodType(lambda self, mode=True: self, module)
