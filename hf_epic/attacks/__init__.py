"""Data-poisoning attacks on ``datasets.Dataset`` image-classification sets.

Every attack is ``craft_<name>(train_ds, *, ..., seed) -> (poisoned_ds, PoisonSpec)``: the poisoned set
has the same schema, rows and order as ``train_ds`` plus a bool ``is_poison`` column, and only the
poison rows differ. Save both to re-evaluate later::

    poisoned, spec = craft_gradient_matching(ds["train"], target_ds=ds["test"], poison_class=3)
    poisoned.save_to_disk("poisoned")
    spec.save("poisoned/poison_spec.json")
"""

from .badnets import craft_badnets
from .bullseye_polytope import craft_bullseye_polytope
from .feature_collision import craft_feature_collision
from .gradient_matching import alignment_loss, craft_gradient_matching, match_gradients
from .sleeper_agent import craft_sleeper_agent
from .spec import PoisonSpec
from .surrogate import choose_targets, features_of, logits_of, predict, train_on_tensors, train_surrogate
from .trigger import apply_trigger, make_patch_trigger, stamp

ATTACKS = {
    "gradient_matching": craft_gradient_matching,
    "bullseye_polytope": craft_bullseye_polytope,
    "feature_collision": craft_feature_collision,
    "sleeper_agent": craft_sleeper_agent,
    "badnets": craft_badnets,
}

__all__ = [
    "ATTACKS",
    "PoisonSpec",
    "alignment_loss",
    "apply_trigger",
    "choose_targets",
    "craft_badnets",
    "craft_bullseye_polytope",
    "craft_feature_collision",
    "craft_gradient_matching",
    "craft_sleeper_agent",
    "features_of",
    "logits_of",
    "make_patch_trigger",
    "match_gradients",
    "predict",
    "stamp",
    "train_on_tensors",
    "train_surrogate",
]
