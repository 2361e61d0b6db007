"""The attack registry: every attack registers once, next to its code, with its kind, what it needs and
its settings (a small dataclass over :class:`AttackSettings`).

Register a new attack (one file, no other edit)::

    @dataclass
    class MyAttackSettings(AttackSettings):
        budget: float = 0.02

    @register_attack("my_attack", kind="backdoor", needs="nothing", settings=MyAttackSettings)
    def craft_my_attack(train_ds, *, budget=0.02, poison_class=None, seed=0):
        ...
        return poisoned_ds, spec

The recipes' ``--attack`` choices and the benchmark's ``--attacks`` choices are read from the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..registry import Registry

KINDS = ("targeted", "backdoor")
NEEDS = ("surrogate", "features", "nothing")
"""What an attack needs: a surrogate (trained from scratch when none is given), a backbone's features
(the transfer / fine-tuning attacks, crafted against the pretrained model the victim starts from), or
nothing (data-only attacks)."""

__all__ = [
    "ATTACK_REGISTRY",
    "AttackInfo",
    "AttackSettings",
    "PerturbationSettings",
    "TargetedSettings",
    "attack_names",
    "get_attack",
    "register_attack",
]


@dataclass
class AttackSettings:
    """Settings every attack takes.

    Args:
        budget: Poisons as a fraction of the training rows.
        poison_class: Class the poisons carry (None: chosen by the attack).
        seed: Seeds every random choice of the attack.
    """

    budget: float = 0.01
    poison_class: int | None = None
    seed: int = 0


@dataclass
class PerturbationSettings(AttackSettings):
    """Settings of the attacks that optimise bounded perturbations against a model.

    Args:
        epsilon: l_inf bound of the perturbations, in [0, 1].
        surrogate_epochs: Epochs to train the surrogate (None: a given model is used as is, the default
            surrogate trains for 12).
        steps: Optimisation steps.
        step_size: Step size of the optimiser.
        batch_size: Rows per forward pass.
        progress: Show progress bars.
    """

    epsilon: float = 16 / 255
    surrogate_epochs: int | None = None
    steps: int = 240
    step_size: float = 0.25
    batch_size: int = 256
    progress: bool = True


@dataclass
class TargetedSettings(PerturbationSettings):
    """Settings of the targeted attacks (the targets are rows of a target set, e.g. the test split).

    Args:
        target_indices: Explicit target rows (None: chosen with the surrogate).
        num_targets: Targets to choose.
        target_selection: ``"low_margin"`` or ``"random"``.
        target_pool_fraction: Share of the candidate targets (lowest margin first) drawn from.
        poison_selection: How the poison rows are picked.
    """

    target_indices: list[int] | None = None
    num_targets: int = 1
    target_selection: str = "low_margin"
    target_pool_fraction: float = 0.1
    poison_selection: str = "random"


@dataclass(frozen=True)
class AttackInfo:
    """One registered attack.

    Attributes:
        name: Its name (``spec.attack``).
        kind: ``"targeted"`` (targets of the test split land in the poison class) or ``"backdoor"``
            (a trigger sends test images to the poison class).
        needs: ``"surrogate"``, ``"features"`` or ``"nothing"`` (see :data:`NEEDS`).
        settings: Its settings dataclass.
        craft: ``craft(train_ds, **settings, [target_ds=...], [model=...]) -> (poisoned_ds, PoisonSpec)``.
    """

    name: str
    kind: str
    needs: str
    settings: type[AttackSettings]
    craft: Callable[..., Any]

    def make_settings(self, values: Mapping[str, Any] | None = None, strict: bool = True) -> AttackSettings:
        """Build the attack's settings from a dict.

        Args:
            values: Field values (the rest keep their defaults).
            strict: Raise on names the attack does not take (False: ignore them, so one set of generic
                flags can serve every attack).
        """
        fields = {f.name for f in dataclasses.fields(self.settings)}
        values = dict(values or {})
        unknown = sorted(set(values) - fields)
        if unknown and strict:
            raise ValueError(
                f"attack {self.name!r} has no setting {', '.join(unknown)}; its settings are "
                f"{', '.join(sorted(fields))} ({self.settings.__name__})."
            )
        return self.settings(**{k: v for k, v in values.items() if k in fields})

    @property
    def victim_setting(self) -> str:
        """How its victim trains by default: ``"scratch"``, ``"transfer"`` or ``"finetune"``."""
        return getattr(self.settings(), "setting", "scratch")

    def run(
        self, train_ds: Any, settings: AttackSettings, *, target_ds: Any = None, model: Any = None
    ) -> tuple[Any, Any]:
        """Craft the poisoned training set.

        Args:
            train_ds: The clean training set.
            settings: Its settings (:meth:`make_settings`).
            target_ds: The set holding the targets (targeted attacks).
            model: The model to craft against (None: the attack's own surrogate, when it needs one).

        Returns:
            ``(poisoned_ds, spec)``.
        """
        if not isinstance(settings, self.settings):
            raise TypeError(
                f"attack {self.name!r} takes {self.settings.__name__}, got {type(settings).__name__}."
            )
        kwargs = dataclasses.asdict(settings)
        if self.kind == "targeted":
            kwargs["target_ds"] = target_ds
        if model is not None:
            kwargs["model"] = model
        return self.craft(train_ds, **kwargs)


ATTACK_REGISTRY: Registry[AttackInfo] = Registry("attack")


def register_attack(
    name: str, *, kind: str, needs: str, settings: type[AttackSettings]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``craft`` under ``name`` (returned unchanged).

    Args:
        name: The attack's name.
        kind: ``"targeted"`` or ``"backdoor"``.
        needs: ``"surrogate"``, ``"features"`` or ``"nothing"``.
        settings: Its settings dataclass (a subclass of :class:`AttackSettings`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(KINDS)}.")
    if needs not in NEEDS:
        raise ValueError(f"needs={needs!r}: use one of {', '.join(NEEDS)}.")
    if not (dataclasses.is_dataclass(settings) and issubclass(settings, AttackSettings)):
        raise TypeError(f"settings={settings!r}: pass a dataclass subclassing AttackSettings.")

    def wrap(craft: Callable[..., Any]) -> Callable[..., Any]:
        ATTACK_REGISTRY.add(name, AttackInfo(name, kind, needs, settings, craft))
        return craft

    return wrap


def get_attack(name: str) -> AttackInfo:
    """The registered attack ``name`` (a ValueError lists the known ones)."""
    return ATTACK_REGISTRY.get(name)


def attack_names(kind: str | None = None) -> tuple[str, ...]:
    """Registered attack names, optionally of one kind, in registration order."""
    return ATTACK_REGISTRY.names(None if kind is None else (lambda a: a.kind == kind))
