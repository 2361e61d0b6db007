"""Tiny image classifiers built offline from configs, and the image transforms that feed them.

Every builder returns a randomly initialised ``transformers`` model (nothing is downloaded), small
enough to train on a CPU in seconds. They are the models the tests, recipes and benchmarks use;
real users pass their own (e.g. ``AutoModelForImageClassification.from_pretrained(...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import (
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from .registry import Registry

__all__ = [
    "MODEL_KINDS",
    "build_model",
    "build_tiny_cnn",
    "build_tiny_timm",
    "build_tiny_vit",
    "image_transform",
    "model_kinds",
    "register_model_kind",
]

MODEL_KINDS: Registry[Callable[[int, int, int], Any]] = Registry("model kind")
"""Tiny model kinds built from a config: name -> ``builder(num_labels, image_size, num_channels)``."""


def register_model_kind(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a ``builder(num_labels, image_size, num_channels)`` under ``name``."""

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        MODEL_KINDS.add(name, builder)
        return builder

    return wrap


def model_kinds() -> tuple[str, ...]:
    """Registered tiny model kinds (``--model_kind`` choices)."""
    return MODEL_KINDS.names()


def build_model(kind: str, num_labels: int, image_size: int, num_channels: int) -> Any:
    """Build a tiny model of a registered kind, with random weights (from torch's global generator).

    Args:
        kind: A registered kind (:func:`model_kinds`).
        num_labels: Number of classes.
        image_size: Side of the square input, in pixels.
        num_channels: 1 (grayscale) or 3 (RGB).
    """
    return MODEL_KINDS.get(kind)(num_labels, image_size, num_channels)


def _label_maps(num_labels: int) -> dict[str, dict]:
    """Return ``id2label``/``label2id`` with the class index as the name."""
    id2label = {i: str(i) for i in range(num_labels)}
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _check_sizes(num_labels: int, image_size: int, num_channels: int, patch_size: int | None = None) -> None:
    """Raise a ValueError naming the bad size argument and the fix."""
    if num_labels < 2:
        raise ValueError(
            f"num_labels={num_labels}: a classifier needs at least 2 classes; pass num_labels>=2."
        )
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels={num_channels}: use 1 (grayscale) or 3 (RGB).")
    if patch_size is not None and image_size % patch_size != 0:
        raise ValueError(
            f"image_size={image_size} is not a multiple of patch_size={patch_size}; "
            f"pass an image_size divisible by {patch_size}."
        )


@register_model_kind("vit")
def build_tiny_vit(
    num_labels: int = 10, image_size: int = 32, num_channels: int = 3, **overrides: Any
) -> ViTForImageClassification:
    """Build a tiny ``ViTForImageClassification`` with random weights.

    Args:
        num_labels: Number of classes.
        image_size: Side of the square input image, in pixels (a multiple of the patch size, 4 by default).
        num_channels: 1 for grayscale, 3 for RGB.
        **overrides: Any other ``ViTConfig`` field (e.g. ``hidden_size=64``, ``num_hidden_layers=4``).

    Returns:
        The model, in training mode.
    """
    kwargs: dict[str, Any] = {
        "image_size": image_size,
        "patch_size": 4,
        "num_channels": num_channels,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "num_labels": num_labels,
        **_label_maps(num_labels),
    }
    kwargs.update(overrides)
    _check_sizes(kwargs["num_labels"], kwargs["image_size"], kwargs["num_channels"], kwargs["patch_size"])
    return ViTForImageClassification(ViTConfig(**kwargs))


@register_model_kind("timm-vit")
def build_tiny_timm(
    num_labels: int = 10,
    image_size: int = 32,
    num_channels: int = 3,
    architecture: str = "vit_tiny_patch16_224",
    **model_args: Any,
) -> TimmWrapperForImageClassification:
    """Build a tiny timm model wrapped in ``TimmWrapperForImageClassification``, with random weights.

    Args:
        num_labels: Number of classes.
        image_size: Side of the square input image, in pixels.
        num_channels: 1 for grayscale, 3 for RGB.
        architecture: A timm architecture name. For ``vit_*`` names the model is shrunk to 2 blocks of
            width 32 with 4-pixel patches; for ``resnet*`` names to widths 16/32/64/128 with one block
            per stage; other names are built with their defaults plus ``model_args``.
        **model_args: Extra keyword arguments for ``timm.create_model`` (override the shrinking above).

    Returns:
        The wrapped model, in training mode.
    """
    args: dict[str, Any] = {"in_chans": num_channels}
    if architecture.startswith("vit"):
        _check_sizes(num_labels, image_size, num_channels, patch_size=4)
        args.update(img_size=image_size, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    elif architecture.startswith("resnet"):
        _check_sizes(num_labels, image_size, num_channels)
        args.update(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16)
    else:
        _check_sizes(num_labels, image_size, num_channels)
    args.update(model_args)
    config = TimmWrapperConfig(
        architecture=architecture, num_labels=num_labels, model_args=args, **_label_maps(num_labels)
    )
    return TimmWrapperForImageClassification(config)


@register_model_kind("cnn")
def build_tiny_cnn(
    num_labels: int = 10, image_size: int = 32, num_channels: int = 3
) -> TimmWrapperForImageClassification:
    """Build a tiny ResNet (timm ``resnet18`` layout, one block per stage, widths 16-128) with random weights.

    Args:
        num_labels: Number of classes.
        image_size: Side of the square input image, in pixels (any size >= 8; the network pools globally).
        num_channels: 1 for grayscale, 3 for RGB.

    Returns:
        A ``TimmWrapperForImageClassification`` (its final layer is ``timm_model.fc``).
    """
    if image_size < 8:
        raise ValueError(f"image_size={image_size} is too small for a ResNet; pass image_size>=8.")
    return build_tiny_timm(num_labels, image_size, num_channels, architecture="resnet18")


def _to_tensor(image: Any, image_size: int, num_channels: int) -> torch.Tensor:
    """Convert one PIL image or array to a float tensor (C, H, W) in [0, 1]."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("L" if num_channels == 1 else "RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal-shift crop (pad 2, crop back) and no flip (digits are not mirror-symmetric)."""
    pad = 2
    size = pixels.shape[-1]
    padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad))
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, dy : dy + size, dx : dx + size]


def image_transform(
    image_size: int,
    num_channels: int,
    augment: bool = False,
    image_column: str = "image",
    seed: int | None = None,
) -> Callable[[dict[str, list]], dict[str, list]]:
    """Return a ``set_transform``/``with_transform`` function that turns images into ``pixel_values``.

    The returned function replaces the ``image_column`` of a batch by ``pixel_values`` (float tensors
    ``(C, H, W)`` normalised to mean 0.5 / std 0.5) and passes every other column through unchanged
    (``label``, ``is_poison``, an index column, ...).

    Args:
        image_size: Side of the square output image, in pixels (images are resized bilinearly).
        num_channels: 1 (grayscale) or 3 (RGB).
        augment: If True, apply a random translation of up to 2 pixels (training-time augmentation).
        image_column: Name of the column holding PIL images or arrays.
        seed: Seed for the augmentation's random generator (None: seeded from torch's global RNG).

    Returns:
        The transform function.

    Example:
        >>> ds = load_digits_dataset()["train"].with_transform(image_transform(32, 3))
        >>> ds[0]["pixel_values"].shape
        torch.Size([3, 32, 32])
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels={num_channels}: use 1 (grayscale) or 3 (RGB).")
    generator = torch.Generator()
    generator.manual_seed(int(torch.initial_seed() if seed is None else seed) % (2**63))

    def transform(batch: dict[str, list]) -> dict[str, list]:
        if image_column not in batch:
            raise KeyError(
                f"image_transform expects an '{image_column}' column, got {sorted(batch)}; "
                f"pass image_column=<your image column name>."
            )
        out = {k: v for k, v in batch.items() if k != image_column}
        pixels = []
        for image in batch[image_column]:
            tensor = _to_tensor(image, image_size, num_channels)
            if augment:
                tensor = _augment(tensor, generator)
            pixels.append((tensor - 0.5) / 0.5)
        out["pixel_values"] = pixels
        return out

    return transform
