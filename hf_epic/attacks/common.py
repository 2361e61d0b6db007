"""Argument checks and set-up shared by the attacks (run before any training time is spent)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Image

from .spec import (
    check_budget,
    check_class,
    check_epsilon,
    check_no_poison_column,
    images_to_tensor,
    images_to_uint8,
    num_classes_of,
    resolve_columns,
)
from .surrogate import DEFAULT_NORMALIZATION, Normalization, default_device, train_surrogate


@dataclass
class TrainingSet:
    """A training set checked and loaded for an attack.

    Attributes:
        ds: the dataset.
        image_column: its image column.
        label_column: its label column.
        labels: int64 labels of every row.
        num_classes: number of classes.
        shape: ``(C, H, W)`` of the first image (every loaded image is checked against it).
    """

    ds: Dataset
    image_column: str
    label_column: str
    labels: torch.Tensor
    num_classes: int
    shape: tuple[int, int, int]


def load_training_set(
    train_ds: Dataset,
    image_column: str | None,
    label_column: str | None,
    budget: float,
    epsilon: float | None,
) -> TrainingSet:
    """Check a clean training set and the budget/epsilon arguments.

    Args:
        train_ds: the clean training set.
        image_column: image column (None: auto-detect).
        label_column: label column (None: auto-detect).
        budget: poison fraction in (0, 1).
        epsilon: l_inf bound in (0, 1], or None when the attack has none.
    """
    image_column, label_column = resolve_columns(train_ds, image_column, label_column)
    if not isinstance(train_ds.features[image_column], Image):
        raise ValueError(
            f"column {image_column!r} is {train_ds.features[image_column]}, not a datasets.Image feature; "
            f"cast it first: ds = ds.cast_column({image_column!r}, datasets.Image())."
        )
    check_no_poison_column(train_ds)
    check_budget(budget)
    if epsilon is not None:
        check_epsilon(epsilon)
    if train_ds.num_rows < 2:
        raise ValueError(f"the training set has {train_ds.num_rows} rows; an attack needs at least 2.")
    labels = torch.tensor(train_ds[label_column], dtype=torch.long)
    first = images_to_uint8(train_ds, image_column, [0])
    return TrainingSet(
        train_ds,
        image_column,
        label_column,
        labels,
        num_classes_of(train_ds, label_column),
        tuple(first.shape[1:]),
    )


def check_targets(
    train: TrainingSet,
    target_ds: Dataset | None,
    target_indices: list[int] | None,
    poison_class: int | None,
    target_image_column: str | None,
) -> tuple[str, str]:
    """Check the target dataset, explicit target rows and the poison class against the training set.

    Args:
        train: the loaded training set.
        target_ds: the dataset holding the targets (e.g. the test split).
        target_indices: explicit target rows, or None (chosen later with the surrogate).
        poison_class: the poison class, or None (chosen later).
        target_image_column: image column of ``target_ds`` (None: auto-detect).

    Returns:
        ``(image_column, label_column)`` of ``target_ds``.
    """
    if target_ds is None:
        raise ValueError(
            "a targeted attack needs target_ds=<the dataset holding the targets, e.g. the test split>."
        )
    t_img, t_lab = resolve_columns(target_ds, target_image_column, None)
    if poison_class is not None:
        check_class("poison_class", poison_class, train.num_classes)
    if target_indices is not None:
        if len(target_indices) == 0:
            raise ValueError(
                "target_indices is empty; pass at least one row of target_ds, or None to choose one."
            )
        for i in target_indices:
            if (
                isinstance(i, bool)
                or not isinstance(i, (int, np.integer))
                or not 0 <= int(i) < target_ds.num_rows
            ):
                raise ValueError(
                    f"target index {i!r} is not a row of target_ds (0..{target_ds.num_rows - 1})."
                )
        classes = {int(target_ds[int(i)][t_lab]) for i in target_indices}
        if len(classes) != 1:
            raise ValueError(
                f"all targets must share one class, got classes {sorted(classes)}; pick targets of one class."
            )
        target_class = classes.pop()
        check_class("target class", target_class, train.num_classes)
        if poison_class is not None and target_class == poison_class:
            raise ValueError(
                f"poison_class={poison_class} equals the targets' class; choose a different poison class "
                "(the attack makes the target look like the poison class)."
            )
    shape = tuple(images_to_uint8(target_ds, t_img, [0]).shape[1:])
    if shape != train.shape:
        raise ValueError(f"target images have shape {shape} but training images {train.shape}; use one size.")
    return t_img, t_lab


def draw_classes(
    poison_class: int | None, source_class: int | None, num_classes: int, seed: int
) -> tuple[int, int]:
    """Check (or draw with ``seed``, when None) a poison class and a different source class.

    Args:
        poison_class: the poison class, or None to draw one.
        source_class: the source class, None to draw one different from the poison class, or -1 when
            the attack has none (returned as is).
        num_classes: number of classes.
        seed: seeds the draws.

    Returns:
        ``(poison_class, source_class)``.
    """
    rng = np.random.default_rng([int(seed), 7])
    if poison_class is None:
        poison_class = int(rng.integers(num_classes))
    poison_class = check_class("poison_class", poison_class, num_classes)
    if source_class == -1:
        return poison_class, -1
    if source_class is None:
        source_class = int(rng.choice([c for c in range(num_classes) if c != poison_class]))
    source_class = check_class("source_class", source_class, num_classes)
    if source_class == poison_class:
        raise ValueError(
            f"source_class={source_class} equals poison_class; the backdoor sends source images to another class."
        )
    return poison_class, source_class


def check_count(train: TrainingSet, budget: float, poison_class: int) -> int:
    """Number of poisons for ``budget``, checked against the size of the poison class."""
    from .spec import budget_count

    n = budget_count(budget, train.ds.num_rows)
    available = int((train.labels == poison_class).sum())
    if n > available:
        raise ValueError(
            f"budget={budget} asks for {n} poisons but class {poison_class} has only {available} training rows; "
            "lower the budget."
        )
    return n


def settings_of(settings_class: type, arguments: Mapping[str, Any]) -> Any:
    """An attack's settings dataclass from its craft function's arguments (``locals()`` on entry)."""
    names = {f.name for f in dataclasses.fields(settings_class)}
    return settings_class(**{k: v for k, v in arguments.items() if k in names})


def get_surrogate(
    train: TrainingSet,
    model: torch.nn.Module | None,
    settings: Any,
    device: str | torch.device | None,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    seed_offset: int = 0,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Return the surrogate (trained on the clean set when needed) and a JSON description of it.

    A given ``model`` is used as it is unless ``settings.surrogate_epochs`` asks to train it; with no
    model the default tiny ResNet is built and trained for ``surrogate_epochs`` (12 when None).

    Args:
        train: the loaded training set.
        model: the attacker's model, or None.
        settings: the attack's settings (``surrogate_epochs``, ``seed``, ``progress``).
        device: where to train (None: CUDA if available).
        normalization: the surrogate's input ``(mean, std)``.
        seed_offset: added to ``settings.seed`` (one surrogate of an ensemble).
    """
    surrogate_epochs, seed, progress = (
        settings.surrogate_epochs,
        settings.seed + seed_offset,
        settings.progress,
    )
    dev = default_device(device)
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        info: dict[str, Any] = {"model": type(model).__name__, "trained_here_epochs": surrogate_epochs or 0}
        if not surrogate_epochs:
            return model.to(dev).eval(), info
        epochs = surrogate_epochs
    else:
        epochs = 12 if surrogate_epochs is None else int(surrogate_epochs)
        info = {"model": "hf_epic.models.build_tiny_cnn", "trained_here_epochs": epochs, "seed": seed}
    trained = train_surrogate(
        train.ds,
        model=model,
        epochs=epochs,
        seed=seed,
        image_column=train.image_column,
        label_column=train.label_column,
        device=dev,
        normalization=normalization,
        progress=progress,
    )
    return (trained if model is None else model.to(dev).eval()), info


def check_target_choice(settings: Any, poison_selections: tuple[str, ...]) -> None:
    """Check how a targeted attack chooses its targets and its poison rows.

    Args:
        settings: the attack's settings (``target_selection``, ``target_pool_fraction``, ``poison_selection``).
        poison_selections: the attack's poison-row strategies.
    """
    if settings.target_selection not in ("low_margin", "random"):
        raise ValueError(f"target_selection={settings.target_selection!r}: use 'low_margin' or 'random'.")
    if not 0 < settings.target_pool_fraction <= 1:
        raise ValueError(f"target_pool_fraction={settings.target_pool_fraction!r} must be in (0, 1].")
    if settings.poison_selection not in poison_selections:
        options = " or ".join(repr(s) for s in poison_selections)
        raise ValueError(f"poison_selection={settings.poison_selection!r}: use {options}.")


@dataclass
class Targets:
    """The targets of a targeted attack and the class the poisons carry.

    Attributes:
        indices: target rows of the target set.
        target_class: their (shared) class.
        poison_class: the class the poisons carry (the target should land in it).
        count: number of poisons.
        chosen_here: whether the targets were chosen by the attack (not given).
    """

    indices: list[int]
    target_class: int
    poison_class: int
    count: int
    chosen_here: bool


def resolve_targets(
    surrogate: torch.nn.Module,
    train: TrainingSet,
    target_ds: Dataset,
    columns: tuple[str, str],
    settings: Any,
    normalization: Normalization,
) -> Targets:
    """Choose the targets with the surrogate (unless given), then the poison class (unless given: the
    surrogate's most likely other class for the first target), then the number of poisons.

    Args:
        surrogate: the attacker's model.
        train: the loaded training set.
        target_ds: the set holding the targets.
        columns: ``(image_column, label_column)`` of ``target_ds``.
        settings: the attack's :class:`~hf_epic.attacks.registry.TargetedSettings` (explicit targets
            and poison class or None, how many targets, how they are chosen, the budget, the seed).
        normalization: the surrogate's input ``(mean, std)``.
    """
    from .surrogate import choose_targets, predict

    t_img, t_lab = columns
    target_indices, poison_class = settings.target_indices, settings.poison_class
    chosen_here = target_indices is None
    if chosen_here:
        target_indices, poison_class = choose_targets(
            surrogate,
            target_ds,
            num_targets=settings.num_targets,
            poison_class=poison_class,
            strategy=settings.target_selection,
            pool_fraction=settings.target_pool_fraction,
            seed=settings.seed,
            image_column=t_img,
            label_column=t_lab,
            normalization=normalization,
        )
    target_indices = [int(i) for i in target_indices]
    target_class = int(target_ds[target_indices[0]][t_lab])
    if poison_class is None:
        first = images_to_tensor(target_ds, t_img, target_indices[:1])
        logits = predict(surrogate, first, normalization=normalization)[0]
        logits[target_class] = -math.inf
        poison_class = int(logits.argmax())
    count = check_count(train, settings.budget, poison_class)
    return Targets(target_indices, target_class, poison_class, count, chosen_here)


def freeze(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, bool]]:
    """Stop gradients to the model's parameters; returns the previous flags for :func:`unfreeze`."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    return flags


def unfreeze(flags: list[tuple[torch.nn.Parameter, bool]]) -> None:
    """Restore ``requires_grad`` flags saved by :func:`freeze`."""
    for p, flag in flags:
        p.requires_grad_(flag)
