"""Scoring a trained model: clean accuracy, attack success (targets or triggered images) and target margins."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .models import image_batches
from .poisons import quiet_datasets

__all__ = ["accuracy_metrics", "predict_classes", "predict_logits", "score_attack", "target_margins"]


@torch.no_grad()
def predict_logits(
    model: Any, ds: Any, image_size: int, num_channels: int, batch_size: int = 256
) -> torch.Tensor:
    """Logits ``(rows, classes)`` of every row of an image dataset (no augmentation), on the CPU.

    Args:
        model: A trained classifier returning ``logits``.
        ds: Dataset with an ``image`` column (not modified).
        image_size: Side of the model's input.
        num_channels: 1 or 3.
        batch_size: Rows per forward pass.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = [  # gradients are off: @torch.no_grad()
        model(pixel_values=pixels).logits.float().cpu()
        for pixels in image_batches(ds, image_size, num_channels, device, batch_size)
    ]
    model.train(was_training)
    return torch.cat(chunks)


def predict_classes(
    model: Any, ds: Any, image_size: int, num_channels: int, batch_size: int = 256
) -> list[int]:
    """Predicted class of every row of an image dataset (no augmentation), in row order."""
    if len(ds) == 0:
        return []
    return predict_logits(model, ds, image_size, num_channels, batch_size).argmax(-1).tolist()


def target_margins(logits: torch.Tensor, poison_class: int) -> list[float]:
    """Per row: the poison class's logit minus the largest other logit (> 0: the row is in the poison
    class). A continuous view of a targeted attack's success: the poison's effect on one trial is the
    difference between this margin with the poisons and without them (``clean-control``).
    """
    others = logits.clone()
    others[:, poison_class] = -math.inf
    return (logits[:, poison_class] - others.max(1).values).tolist()


def score_attack(
    model: Any,
    spec: Any,
    test_ds: Any,
    image_size: int,
    num_channels: int,
    trigger_seed: int,
    quiet: bool = True,
) -> dict[str, Any]:
    """Attack success, through the shipped ``attack_success_rate`` metric.

    Targeted attacks: the share of the spec's target images classified as the poison class. Backdoors:
    the share of triggered test images (true class not the poison class; only the trigger's source class
    when it has one) classified as the poison class.

    Args:
        model: The trained model.
        spec: The attack's ``PoisonSpec``.
        test_ds: The clean test split.
        image_size: Side of the model's input.
        num_channels: 1 or 3.
        trigger_seed: Seed of a randomly placed trigger.
        quiet: Hide ``datasets`` progress bars.

    Returns:
        ``attack_kind``, ``asr``, ``num_success``, ``num_evaluated``, and for targeted attacks the
        targets' ``target_predictions`` and ``target_margins`` (None for backdoors).
    """
    from hf_epic.metrics import load_metric

    if spec.trigger is not None:
        from hf_epic.attacks.trigger import apply_trigger

        source = spec.trigger.get("source_class")
        keep = [
            i
            for i, label in enumerate(test_ds["label"])
            if label != spec.poison_class and (source is None or label == source)
        ]
        with quiet_datasets(quiet):
            triggered = apply_trigger(test_ds.select(keep), spec.trigger, seed=trigger_seed)
        predictions = predict_classes(model, triggered, image_size, num_channels)
        metric = load_metric("attack_success_rate", config_name="backdoor")
        out = metric.compute(
            predictions=predictions, references=triggered["label"], poison_class=spec.poison_class
        )
        kind, margins = "backdoor", None
    else:
        logits = predict_logits(model, test_ds.select(spec.target_indices), image_size, num_channels)
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
        "target_margins": margins,
    }


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: clean accuracy through the shipped evaluate module."""
    from hf_epic.metrics import load_metric

    logits, labels = eval_pred
    predictions = np.asarray(logits).argmax(-1)
    result = load_metric("clean_accuracy").compute(predictions=predictions, references=np.asarray(labels))
    return {"clean_accuracy": result["clean_accuracy"]}
