"""Bullseye Polytope (Aghakhani et al., EuroS&P 2021): clean-label targeted poisoning for transfer learning.

The poisons are perturbed so that the *mean* of their penultimate features lands on the target's
features: the target sits at the centre ("bullseye") of the polytope the poisons span in feature
space, so a classifier trained on those features puts the target on the poisons' side.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from .feature_space import alias_signature, craft_feature_space_attack
from .spec import PoisonSpec


def craft_bullseye_polytope(train_ds: Dataset, **kwargs: Any) -> tuple[Dataset, PoisonSpec]:
    """Craft a Bullseye Polytope poisoned training set against a feature extractor.

    :func:`~hf_epic.attacks.feature_space.craft_feature_space_attack` with ``objective="polytope"``:
    the same keyword arguments (``target_ds`` required; ``budget=0.01``, ``epsilon=16/255``,
    ``setting="transfer"``, ``steps=300``, ... by default) and the same return value,
    ``(poisoned_ds, spec)`` with ``spec.attack == "bullseye_polytope"`` and ``spec.params`` holding
    ``feature_loss_initial``/``feature_loss_final``.
    """
    return craft_feature_space_attack(train_ds, objective="polytope", **kwargs)


craft_bullseye_polytope.__signature__ = alias_signature()  # type: ignore[attr-defined]
