"""Poisoned training sets: the attack settings a script asks for, crafting through the attack registry,
and the on-disk cache that lets every defense (and a rerun) reuse one crafted set.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..attacks.registry import AttackInfo, AttackSettings, get_attack
from ..attacks.spec import PoisonSpec

POISON_SPEC_FILE = "poison_spec.json"
CRAFT_FILE = "craft.json"  # written last: its presence marks a complete cache entry

DIGITS_ATTACK_KWARGS: dict[str, dict[str, Any]] = {
    # 4x the field's 16/255 (still visible on 16x16 digits), targets among the 2 % lowest-margin test digits
    "gradient_matching": {"budget": 0.01, "epsilon": 64 / 255, "target_pool_fraction": 0.02, "restarts": 2},
    "bullseye_polytope": {"target_pool_fraction": 0.02},
    # a fixed class pair: patched 7s look nearest to a 2 on a clean model
    "sleeper_agent": {"budget": 0.05, "epsilon": 32 / 255, "source_class": 7, "poison_class": 2},
}
"""Attack settings of the benchmark on the plain digits (``attack_kwargs=None``)."""
HARD_DIGITS_ATTACK_KWARGS: dict[str, dict[str, Any]] = {
    "gradient_matching": {"budget": 0.01, "epsilon": 24 / 255, "target_pool_fraction": 0.1, "restarts": 2},
}
"""Attack settings of the benchmark on the hard digits (the other attacks keep their own defaults)."""
ATTACK_PRESETS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("digits", "plain"): DIGITS_ATTACK_KWARGS,
    ("digits", "hard"): HARD_DIGITS_ATTACK_KWARGS,
}
"""``(dataset_name, digits_variant)`` -> the benchmark's attack settings; other data sets: each attack's
own defaults."""

__all__ = [
    "ATTACK_PRESETS",
    "DIGITS_ATTACK_KWARGS",
    "HARD_DIGITS_ATTACK_KWARGS",
    "POISON_SPEC_FILE",
    "attacker_model",
    "cached_poisons",
    "craft_poisons",
    "describe_poisons",
    "draw_classes",
    "poison_training_set",
    "preset_attack_kwargs",
    "quiet_datasets",
    "victim_setting",
]


def preset_attack_kwargs(config: Any) -> dict[str, dict[str, Any]]:
    """A fresh copy of the data set's attack settings (``{}`` when it has none)."""
    variant = config.digits_variant if config.dataset_name == "digits" else ""
    preset = ATTACK_PRESETS.get((config.dataset_name, variant), {})
    return {name: dict(kwargs) for name, kwargs in preset.items()}


def victim_setting(attack: str, attack_kwargs: Mapping[str, Mapping[str, Any]]) -> str:
    """How the victim trains for this attack: ``"scratch"``, ``"transfer"`` (frozen features, new head) or
    ``"finetune"`` (whole pretrained model), from the attack's ``setting`` when it has one.

    Args:
        attack: Attack name.
        attack_kwargs: Per-attack settings (``attack_kwargs[attack]["setting"]`` overrides the default).
    """
    info = get_attack(attack)
    if "setting" not in {f.name for f in dataclasses.fields(info.settings)}:
        return "scratch"
    default = info.victim_setting
    setting = attack_kwargs.get(attack, {}).get("setting", default)
    allowed = ("scratch", "transfer", "finetune") if default == "scratch" else ("transfer", "finetune")
    if setting not in allowed:
        raise ValueError(
            f"attack_kwargs[{attack!r}]['setting']={setting!r}: use one of {', '.join(map(repr, allowed))}."
        )
    return setting


def draw_classes(
    settings: type[AttackSettings], values: Mapping[str, Any], num_classes: int
) -> dict[str, int]:
    """Draw the classes an attack requires but was not given (a settings field without a default).

    The draw is seeded by ``values["seed"]``, and the source class never equals the poison class.

    Args:
        settings: The attack's settings dataclass.
        values: The settings already chosen (their classes are kept).
        num_classes: Number of classes of the data set.
    """
    fields = {f.name: f for f in dataclasses.fields(settings)}

    def required(name: str) -> bool:
        f = fields.get(name)
        return (
            f is not None
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and name not in values
        )

    rng = np.random.default_rng(int(values["seed"]))
    drawn: dict[str, int] = {}
    poison_class = values.get("poison_class")
    if required("poison_class"):
        poison_class = drawn["poison_class"] = int(rng.integers(num_classes))
    if required("source_class"):
        choices = [c for c in range(num_classes) if c != poison_class]
        drawn["source_class"] = int(choices[int(rng.integers(len(choices)))])
    return drawn


def craft_poisons(
    info: AttackInfo,
    train: Any,
    settings: AttackSettings,
    *,
    target_ds: Any = None,
    model: Any = None,
    copy_model: bool = True,
) -> tuple[Any, PoisonSpec]:
    """Craft a poisoned training set with a registered attack.

    Args:
        info: The attack (:func:`hf_epic.attacks.get_attack`).
        train: The clean training split.
        settings: The attack's settings.
        target_ds: The split holding the targets (targeted attacks).
        model: The model to craft against (None: the attack's own surrogate).
        copy_model: Craft against an eval-mode copy of ``model`` (with eager attention), leaving it as it is.
    """
    if model is not None and info.needs != "nothing":
        if not copy_model:
            return info.run(train, settings, target_ds=target_ds, model=model)
        model = copy.deepcopy(model).eval()
        if hasattr(model, "set_attn_implementation"):
            # Gradient attacks differentiate through the gradient (double backward), which the fused
            # CPU attention kernel does not support; the eager one does.
            model.set_attn_implementation("eager")
    else:
        model = None
    return info.run(train, settings, target_ds=target_ds, model=model)


@contextlib.contextmanager
def quiet_datasets(quiet: bool) -> Iterator[None]:
    """Hide ``datasets`` progress bars inside the block when ``quiet`` (restoring the setting after)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if quiet and was_enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and was_enabled:
            datasets.enable_progress_bars()


def cached_poisons(
    folder: str | os.PathLike,
    key: Mapping[str, Any],
    craft: Any,
    write: bool = True,
    quiet: bool = False,
) -> tuple[Any, PoisonSpec, float, bool]:
    """Load a poisoned set from ``folder`` when it was crafted with ``key``, else craft and save it.

    Args:
        folder: Cache folder (``dataset/``, ``poison_spec.json``, ``craft.json``).
        key: The settings that decide the poisons (JSON-serialisable).
        craft: ``craft() -> (poisoned_ds, spec)``.
        write: Craft and write when the cache misses (False on the processes that only read).
        quiet: Hide ``datasets`` progress bars.

    Returns:
        ``(poisoned_ds, spec, craft_seconds, reused)``, the set loaded from the cache folder.
    """
    import datasets

    folder = Path(folder)
    meta_path = folder / CRAFT_FILE
    key = json.loads(json.dumps(dict(key), default=str))
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    reused = meta is not None and meta.get("key") == key
    if not reused and write:
        start = time.perf_counter()
        with quiet_datasets(quiet):
            poisoned, spec = craft()
            seconds = time.perf_counter() - start
            folder.mkdir(parents=True, exist_ok=True)
            poisoned.save_to_disk(str(folder / "dataset"))
        spec.save(folder / POISON_SPEC_FILE)
        meta = {"key": key, "craft_seconds": seconds}
        meta_path.write_text(json.dumps(meta, indent=2))
    elif not reused:
        meta = json.loads(meta_path.read_text())
    poisoned = datasets.load_from_disk(str(folder / "dataset"))
    return poisoned, PoisonSpec.load(folder / POISON_SPEC_FILE), float(meta["craft_seconds"]), reused


def poison_training_set(
    args: Any,
    training_args: Any,
    train: Any,
    test: Any,
    surrogate: Any = None,
    key: Mapping[str, Any] | None = None,
) -> tuple[Any, PoisonSpec | None]:
    """A recipe's poisoned training set: crafted on the main process, cached in ``<output_dir>/_poisoned``
    (reused while its settings match), loaded on every process.

    Args:
        args: :class:`~hf_epic.experiments.args.ScriptArguments` (the attack and its flags).
        training_args: The run's arguments (``output_dir``, ``seed``, ``main_process_first``).
        train: The clean training split.
        test: The test split (the targets come from it).
        surrogate: The attacker's model (a copy is used), or None: the attack trains its own.
        key: More settings that decide the poisons (e.g. the backbone's), for the cache check.

    Returns:
        ``(poisoned_train, spec)``; ``(train, None)`` with ``--attack none``.
    """
    from .runtime import banner, is_main_process

    banner("attack")
    if args.attack == "none":
        return train, None
    info = get_attack(args.attack)
    settings = info.make_settings(args.attack_settings(with_model=surrogate is not None), strict=False)
    skip = ("compare_undefended", "backbone_learning_rate")
    cache_key = {
        **{k: v for k, v in dataclasses.asdict(args).items() if k not in skip},
        "train_rows": len(train),
        "seed": training_args.seed,
        **(key or {}),
    }
    with training_args.main_process_first(desc="crafting poisons"):
        poisoned, spec, _, reused = cached_poisons(
            Path(training_args.output_dir) / "_poisoned",
            cache_key,
            lambda: craft_poisons(info, train, settings, target_ds=test, model=surrogate),
            write=is_main_process(),
        )
    if is_main_process():
        print(describe_poisons(spec, len(poisoned), reused))
    return poisoned, spec


def describe_poisons(spec: PoisonSpec | None, num_rows: int, reused: bool) -> str:
    """One line on what the attack did (empty without an attack)."""
    if spec is None:
        return "no attack"
    cached = " [cached]" if reused else ""
    if spec.trigger:
        return (
            f"{spec.attack}: {len(spec.poison_indices)} poisons of {num_rows} rows labelled {spec.poison_class}, "
            f"trigger {spec.trigger.get('size', '?')} px at {spec.trigger.get('location', '?')}{cached}"
        )
    return (
        f"{spec.attack}: {len(spec.poison_indices)} poisons of {num_rows} rows in class {spec.poison_class}, "
        f"targets {spec.target_indices} (class {spec.target_class}){cached}"
    )


def attacker_model(args: Any, backbone: Any) -> Any:
    """The model a recipe's attacker crafts against when the victim starts from ``backbone``.

    The offline backbone (its head trained on the source rows) is attacked white-box; so is a pretrained
    model's feature extractor when the attack needs only features. A Hub model's new head is untrained,
    so gradient attacks train their own surrogate then (None).
    """
    if args.attack == "none":
        return None
    if not args.model_name_or_path or get_attack(args.attack).needs == "features":
        return backbone
    return None
