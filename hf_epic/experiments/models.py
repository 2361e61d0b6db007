"""Models for the experiments: tiny kinds from the registry (:func:`hf_epic.models.build_model`), pretrained
ones from the Hub or a folder, and the head surgery of the transfer and fine-tuning settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..attacks.surrogate import capture_features, classifier_layer
from ..models import build_model, image_transform

__all__ = [
    "FeatureProbe",
    "build_classifier",
    "image_batches",
    "model_for",
    "new_model",
    "model_transform",
    "pretrained_copy",
    "freeze_all_but_head",
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


def image_batches(
    ds: Any, image_size: int, num_channels: int, device: Any, batch_size: int = 256
) -> Iterator[torch.Tensor]:
    """The ``pixel_values`` of every row of an image dataset (no augmentation), in row order, in batches
    of ``batch_size`` on ``device``.

    Args:
        ds: Dataset with an ``image`` column (not modified).
        image_size: Side of the model's input.
        num_channels: 1 or 3.
        device: Where the batches go.
        batch_size: Rows per batch.
    """
    view = ds.select_columns(["image"]).with_transform(
        model_transform(image_size, num_channels, augment=False)
    )
    for start in range(0, len(view), batch_size):
        yield torch.stack(view[start : start + batch_size]["pixel_values"]).to(device)


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


class FeatureProbe(torch.nn.Module):
    """A new linear head on a frozen backbone, trained on the backbone's features computed once per row.

    In the transfer setting nothing before the head changes during training and the training rows are not
    augmented, so each row's feature vector (the input of the backbone's own classifier) is the same in
    every epoch. :meth:`features_dataset` computes it once; training batches then carry ``features``
    instead of ``pixel_values`` and only the head runs. Image batches (``pixel_values``: scoring, the
    attack's targets) still go through the frozen backbone first, so the probe is one model either way.

    The backbone is a submodule (it moves with the probe to a device) with ``requires_grad=False``, and it
    stays in eval mode when the Trainer calls ``train()`` (no dropout, frozen normalisation statistics).

    Args:
        backbone: A pretrained classifier of a registered kind (its own head is not used; not modified).
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        own_head = classifier_layer(backbone)
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        # the new head draws its initial weights from torch's global generator, like any new layer
        self.classifier = torch.nn.Linear(own_head.in_features, own_head.out_features)
        self.config = getattr(backbone, "config", None)

    def train(self, mode: bool = True) -> FeatureProbe:
        """Set the head's mode; the backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's penultimate features ``(rows, dim)`` of a batch of images."""
        with capture_features(self.backbone) as store:
            self.backbone(pixel_values=pixel_values)
        return store["features"]

    def forward(
        self,
        features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """Logits (and the mean cross-entropy when ``labels`` are given) from features or from images."""
        from transformers.modeling_outputs import ImageClassifierOutput

        if features is None:
            if pixel_values is None:
                raise ValueError("FeatureProbe needs `features` (cached) or `pixel_values` (images).")
            features = self.backbone_features(pixel_values)
        logits = self.classifier(features)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def features_dataset(self, ds: Any, image_size: int, num_channels: int, batch_size: int = 256) -> Any:
        """A copy of ``ds`` with each row's backbone features in a ``features`` column, formatted for training.

        The rows are read without augmentation. Every other column (``label``, ``is_poison``) is kept in
        the dataset; batches carry ``features`` and ``label``.

        Args:
            ds: Dataset with ``image`` and ``label`` columns (not modified).
            image_size: Side of the backbone's input.
            num_channels: 1 or 3.
            batch_size: Rows per forward pass.
        """
        device = next(self.classifier.parameters()).device
        chunks = [
            self.backbone_features(pixels).float().cpu()
            for pixels in image_batches(ds, image_size, num_channels, device, batch_size)
        ]
        features = torch.cat(chunks).numpy() if chunks else []
        table = ds.remove_columns("image").add_column("features", list(features))

        def transform(batch: dict[str, list]) -> dict[str, Any]:
            return {"features": torch.tensor(batch["features"], dtype=torch.float32), "label": batch["label"]}

        return table.with_transform(transform)
