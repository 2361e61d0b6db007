"""Feature Collision ("Poison Frogs", Shafahi et al., NeurIPS 2018): clean-label targeted poisoning.

Every poison is perturbed so that its own penultimate features collide with the target's, while it
stays within an l_inf ball of its clean image (the original bounds the change with a penalty; here the
ball keeps it comparable with the other attacks). A classifier trained on those features then puts
the target in the poison class.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from .feature_space import alias_signature, craft_feature_space_attack
from .spec import PoisonSpec


def craft_feature_collision(train_ds: Dataset, **kwargs: Any) -> tuple[Dataset, PoisonSpec]:
    """Craft a Feature Collision poisoned training set against a feature extractor.

    :func:`~hf_epic.attacks.feature_space.craft_feature_space_attack` with ``objective="collision"``:
    the same keyword arguments (``target_ds`` required; ``budget=0.01``, ``epsilon=16/255``,
    ``setting="transfer"``, ``steps=300``, ... by default) and the same return value,
    ``(poisoned_ds, spec)`` with ``spec.attack == "feature_collision"`` and ``spec.params`` holding
    ``feature_loss_initial``/``feature_loss_final``.
    """
    return craft_feature_space_attack(train_ds, objective="collision", **kwargs)


craft_feature_collision.__signature__ = alias_signature()  # type: ignore[attr-defined]
