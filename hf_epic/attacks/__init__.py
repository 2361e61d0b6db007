"""Data-poisoning attacks on ``datasets.Dataset`` image-classification sets.

Every attack is ``craft_<name>(train_ds, *, ..., seed) -> (poisoned_ds, PoisonSpec)``: the poisoned set
has the same schema, rows and order as ``train_ds`` plus a bool ``is_poison`` column, and only the
poison rows differ. Each registers once (:mod:`hf_epic.attacks.registry`) with its kind, what it needs
and its settings dataclass. Save both to re-evaluate later::

    poisoned, spec = craft_gradient_matching(ds["train"], target_ds=ds["test"], poison_class=3)
    poisoned.save_to_disk("poisoned")
    spec.save("poisoned/poison_spec.json")
"""

# imported in this order: the registry lists targeted attacks first, then the backdoors
from .gradient_matching import (
    GradientMatchingSettings,
    alignment_loss,
    craft_gradient_matching,
    match_gradients,
)

from .feature_space import FeatureSpaceSettings, craft_bullseye_polytope, craft_feature_collision  # isort: skip
from .sleeper_agent import SleeperAgentSettings, craft_sleeper_agent  # isort: skip
from .badnets import BadNetsSettings, craft_badnets  # isort: skip
from .registry import (
    ATTACK_REGISTRY,
    AttackInfo,
    AttackSettings,
    PerturbationSettings,
    TargetedSettings,
    attack_names,
    get_attack,
    register_attack,
)
from .spec import PoisonSpec
from .surrogate import choose_targets, features_of, logits_of, predict, train_on_tensors, train_surrogate
from .trigger import apply_trigger, make_patch_trigger, stamp

__all__ = [
    "ATTACK_REGISTRY",
    "AttackInfo",
    "AttackSettings",
    "BadNetsSettings",
    "FeatureSpaceSettings",
    "GradientMatchingSettings",
    "PerturbationSettings",
    "PoisonSpec",
    "SleeperAgentSettings",
    "TargetedSettings",
    "alignment_loss",
    "apply_trigger",
    "attack_names",
    "choose_targets",
    "craft_badnets",
    "craft_bullseye_polytope",
    "craft_feature_collision",
    "craft_gradient_matching",
    "craft_sleeper_agent",
    "features_of",
    "get_attack",
    "logits_of",
    "make_patch_trigger",
    "match_gradients",
    "predict",
    "register_attack",
    "stamp",
    "train_on_tensors",
    "train_surrogate",
]
