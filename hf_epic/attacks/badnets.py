"""BadNets (Gu et al., 2017): the dirty-label patch backdoor, the simple baseline.

A fraction of training images from other classes get a small fixed patch and are relabelled as the
poison class. A model trained on them learns "patch => poison class", so any test image carrying
the patch goes to the poison class while clean accuracy stays intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from .common import draw_classes, load_training_set
from .registry import AttackSettings, register_attack
from .spec import PoisonSpec, budget_count, build_poisoned_dataset, check_class, images_to_uint8
from .trigger import check_trigger, make_patch_trigger, stamp


@dataclass
class BadNetsSettings(AttackSettings):
    """Settings of :func:`craft_badnets` (the fields are its keyword arguments)."""

    budget: float = 0.05
    source_class: int | None = None
    trigger: dict[str, Any] | None = None
    patch_size: int | None = None
    location: str | tuple[int, int] = "bottom_right"


@register_attack("badnets", kind="backdoor", needs="nothing", settings=BadNetsSettings)
def craft_badnets(
    train_ds: Dataset,
    *,
    poison_class: int | None = None,
    budget: float = 0.05,
    source_class: int | None = None,
    trigger: dict[str, Any] | None = None,
    patch_size: int | None = None,
    location: str | tuple[int, int] = "bottom_right",
    image_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
) -> tuple[Dataset, PoisonSpec]:
    """Craft a BadNets poisoned training set (patched rows relabelled as ``poison_class``).

    Args:
        train_ds: clean training set (image + label columns; not modified).
        poison_class: the class triggered inputs should be classified as (None: drawn with ``seed``).
        budget: poisoned rows as a fraction of the training set, in (0, 1).
        source_class: take poison rows only from this class (None: from every other class).
        trigger: a trigger dict (see :func:`make_patch_trigger`); None makes one from ``patch_size``,
            ``location`` and ``seed``.
        patch_size: side of the generated patch (None: 20% of the image side, at least 3 pixels).
        location: where the generated patch goes (``"bottom_right"``, ``"random"`` or ``(row, col)``).
        image_column: image column (None: auto-detect).
        label_column: label column (None: auto-detect).
        seed: seeds the trigger pattern and the choice of rows.

    Returns:
        ``(poisoned_ds, spec)``; ``spec.epsilon`` is None (the patch is not norm-bounded) and
        ``spec.trigger`` holds the trigger.
    """
    train = load_training_set(train_ds, image_column, label_column, budget, None)
    poison_class, _ = draw_classes(poison_class, -1, train.num_classes, seed)
    if source_class is not None:
        source_class = check_class("source_class", source_class, train.num_classes)
        if source_class == poison_class:
            raise ValueError(
                f"source_class={source_class} equals poison_class; pick a different source class."
            )
    c, h, _ = train.shape
    if trigger is None:
        size = patch_size if patch_size is not None else max(3, round(0.2 * h))
        trigger = make_patch_trigger(c, size=size, location=location, source_class=source_class, seed=seed)
    else:
        trigger = dict(
            trigger, source_class=source_class if source_class is not None else trigger.get("source_class")
        )
    check_trigger(trigger, train.shape)

    eligible = (
        (train.labels != poison_class if source_class is None else train.labels == source_class)
        .nonzero()
        .flatten()
    )
    count = budget_count(budget, train_ds.num_rows)
    if count > len(eligible):
        raise ValueError(
            f"budget={budget} asks for {count} rows but only {len(eligible)} are eligible; lower it."
        )
    rng = np.random.default_rng(seed)
    poison_indices = sorted(int(i) for i in rng.choice(eligible.numpy(), size=count, replace=False))
    clean = images_to_uint8(train_ds, train.image_column, poison_indices)
    poisons = stamp(clean, trigger, torch.Generator().manual_seed(int(seed)))
    poisoned = build_poisoned_dataset(
        train_ds, train.image_column, train.label_column, poison_indices, poisons, [poison_class] * count
    )
    spec = PoisonSpec(
        attack="badnets",
        poison_class=poison_class,
        trigger=trigger,
        budget=float(budget),
        epsilon=None,
        seed=int(seed),
        poison_indices=poison_indices,
        num_rows=train_ds.num_rows,
        params={
            "original_labels": [int(v) for v in train.labels[poison_indices]],
            "dirty_label": True,
        },
    )
    return poisoned, spec
