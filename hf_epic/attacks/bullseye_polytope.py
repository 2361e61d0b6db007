"""Bullseye Polytope (Aghakhani et al., EuroS&P 2021): clean-label targeted poisoning for transfer learning.

The poisons are perturbed so that the *mean* of their penultimate features lands on the target's
features: the target sits at the centre ("bullseye") of the polytope the poisons span in feature
space, so a classifier trained on those features puts the target on the poisons' side.
"""

from __future__ import annotations

import torch
from datasets import Dataset

from .feature_space import craft_feature_attack
from .spec import PoisonSpec
from .surrogate import DEFAULT_NORMALIZATION, Normalization


def craft_bullseye_polytope(
    train_ds: Dataset,
    *,
    target_ds: Dataset,
    target_indices: list[int] | None = None,
    poison_class: int | None = None,
    num_targets: int = 1,
    target_selection: str = "low_margin",
    budget: float = 0.01,
    epsilon: float = 16 / 255,
    model: torch.nn.Module | None = None,
    surrogate_epochs: int | None = None,
    setting: str = "transfer",
    steps: int = 300,
    step_size: float = 0.05,
    poison_selection: str = "nearest",
    batch_size: int = 256,
    image_column: str | None = None,
    label_column: str | None = None,
    target_image_column: str | None = None,
    device: str | torch.device | None = None,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Dataset, PoisonSpec]:
    """Craft a Bullseye Polytope poisoned training set against a feature extractor.

    Args:
        train_ds: clean training set (image + label columns; not modified).
        target_ds: dataset holding the target images (usually the test split).
        target_indices: target rows of ``target_ds`` (one class); None chooses ``num_targets`` with the
            surrogate according to ``target_selection``.
        poison_class: class the targets should be classified as; None: the first target's runner-up.
        num_targets: number of targets when they are chosen here (their mean feature is the aim).
        target_selection: ``"low_margin"`` or ``"random"``.
        budget: poisons as a fraction of the training set, in (0, 1).
        epsilon: l_inf bound in [0, 1] pixel units.
        model: the pretrained feature extractor / classifier whose penultimate features are attacked
            (pass the same model the victim starts from); None trains the default tiny ResNet on
            ``train_ds``.
        surrogate_epochs: epochs of clean training (None: 12 for the default model, 0 for a given one).
        setting: ``"transfer"`` (the victim retrains only the head on frozen features) or
            ``"finetune"`` (the victim fine-tunes the whole model); recorded in the spec for the
            evaluation, the crafting is the same.
        steps: Adam steps (cosine-decayed).
        step_size: initial Adam learning rate as a fraction of ``epsilon``.
        poison_selection: ``"nearest"`` (poison-class rows whose features are closest to the target)
            or ``"random"``.
        batch_size: images per forward pass.
        image_column: image column of ``train_ds`` (None: auto-detect).
        label_column: label column of ``train_ds`` (None: auto-detect).
        target_image_column: image column of ``target_ds`` (None: auto-detect).
        device: where to craft (None: CUDA if available).
        normalization: input ``(mean, std)`` of the model.
        progress: show tqdm bars.
        seed: seeds every random choice.

    Returns:
        ``(poisoned_ds, spec)``; ``spec.params`` holds ``feature_loss_initial``/``feature_loss_final``
        (relative squared feature distance before and after, the latter on the stored uint8 poisons).
    """
    return craft_feature_attack(
        "bullseye_polytope",
        "polytope",
        train_ds,
        target_ds=target_ds,
        target_indices=target_indices,
        poison_class=poison_class,
        num_targets=num_targets,
        target_selection=target_selection,
        budget=budget,
        epsilon=epsilon,
        model=model,
        surrogate_epochs=surrogate_epochs,
        setting=setting,
        steps=steps,
        step_size=step_size,
        poison_selection=poison_selection,
        batch_size=batch_size,
        image_column=image_column,
        label_column=label_column,
        target_image_column=target_image_column,
        device=device,
        normalization=normalization,
        progress=progress,
        seed=seed,
    )
