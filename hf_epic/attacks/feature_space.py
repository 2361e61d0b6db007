"""Shared machinery of the feature-space attacks (Bullseye Polytope, Feature Collision).

Both perturb poison-class training images, within an l_inf ball, so that the penultimate features
of a (pretrained) feature extractor approach the target's features. A victim that trains a
classifier on those features (transfer learning: frozen extractor, new linear head) or fine-tunes
from them then places the target among the poisons, i.e. in the poison class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .common import (
    check_count,
    check_target_choice,
    check_targets,
    freeze,
    get_surrogate,
    load_training_set,
    resolve_targets,
    settings_of,
    unfreeze,
)
from .registry import TargetedSettings, register_attack
from .spec import PoisonSpec, build_poisoned_dataset, images_to_tensor, images_to_uint8, quantise_poisons
from .surrogate import DEFAULT_NORMALIZATION, Normalization, features_of

OBJECTIVES = {"polytope": "bullseye_polytope", "collision": "feature_collision"}
"""Objective -> the attack name recorded in ``PoisonSpec.attack``."""
SETTINGS = ("transfer", "finetune")


@dataclass
class FeatureSpaceSettings(TargetedSettings):
    """Settings of the feature-space attacks (the keyword arguments of
    :func:`craft_feature_space_attack` but ``objective``)."""

    setting: str = "transfer"
    steps: int = 300
    step_size: float = 0.05
    poison_selection: str = "nearest"


def feature_loss(
    poison_features: torch.Tensor, target_features: torch.Tensor, objective: str
) -> torch.Tensor:
    """Relative squared feature distance, the objective both attacks minimise.

    ``"polytope"``: ``|mean_i f(x_i) - mean_t f(x_t)|^2 / |mean_t f(x_t)|^2`` (the target at the centre
    of the poisons' polytope). ``"collision"``: the mean over poisons of ``|f(x_i) - mean_t f(x_t)|^2 /
    |mean_t f(x_t)|^2`` (every poison on top of the target).
    """
    centre = target_features.mean(0)
    scale = (centre * centre).sum().clamp_min(1e-12)
    if objective == "polytope":
        diff = poison_features.mean(0) - centre
        return (diff * diff).sum() / scale
    return ((poison_features - centre) ** 2).sum(1).mean() / scale


def nearest_rows(
    model: torch.nn.Module,
    x: torch.Tensor,
    candidates: torch.Tensor,
    target_features: torch.Tensor,
    count: int,
    normalization: Normalization,
    batch_size: int = 256,
) -> list[int]:
    """Candidate rows whose features are closest to the target's (sorted row positions)."""
    dev = next(model.parameters()).device
    centre = target_features.mean(0)
    dists = []
    with torch.no_grad():
        for start in range(0, len(candidates), batch_size):
            rows = candidates[start : start + batch_size]
            f = features_of(model, x[rows].to(dev), normalization)
            dists.append(((f - centre) ** 2).sum(1).cpu())
    order = torch.cat(dists).argsort()[:count]
    return sorted(int(candidates[i]) for i in order)


def craft_feature_space_attack(
    train_ds: Dataset,
    *,
    objective: str,
    target_ds: Dataset,
    target_indices: list[int] | None = None,
    poison_class: int | None = None,
    num_targets: int = 1,
    target_selection: str = "low_margin",
    target_pool_fraction: float = 0.1,
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
    """Craft a feature-space poisoned training set (Bullseye Polytope or Feature Collision).

    Poison-class rows are perturbed within the l_inf ball so that the extractor's penultimate
    features move onto the target's; :func:`feature_loss` gives the two objectives.
    ``craft_bullseye_polytope`` and ``craft_feature_collision`` are this function with the
    objective fixed.

    Args:
        train_ds: clean training set (image + label columns; not modified).
        objective: ``"polytope"`` (Bullseye Polytope: the poisons' mean feature on the target;
            spec.attack ``"bullseye_polytope"``) or ``"collision"`` (Feature Collision: every poison's
            feature on the target; spec.attack ``"feature_collision"``).
        target_ds: dataset holding the target images (usually the test split).
        target_indices: target rows of ``target_ds`` (one class); None chooses ``num_targets`` with the
            surrogate according to ``target_selection``.
        poison_class: class the targets should be classified as; None: the first target's runner-up.
        num_targets: number of targets when they are chosen here (their mean feature is the aim).
        target_selection: ``"low_margin"`` or ``"random"``.
        target_pool_fraction: with ``"low_margin"``, the target is drawn among this share of the correctly
            classified candidates with the smallest surrogate margin (smaller: more ambiguous targets,
            which also flip more often without any poison; measure that with a clean control).
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
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: use one of {tuple(OBJECTIVES)}.")
    attack = OBJECTIVES[objective]
    settings = settings_of(FeatureSpaceSettings, locals())
    train = load_training_set(train_ds, image_column, label_column, budget, epsilon)
    t_img, t_lab = check_targets(train, target_ds, target_indices, poison_class, target_image_column)
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}: use 'transfer' (frozen features) or 'finetune'.")
    check_target_choice(settings, ("nearest", "random"))
    if poison_class is not None:
        check_count(train, budget, poison_class)
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")

    surrogate, surrogate_info = get_surrogate(train, model, settings, device, normalization)
    targets = resolve_targets(surrogate, train, target_ds, (t_img, t_lab), settings, normalization)
    target_indices, target_class, poison_class = targets.indices, targets.target_class, targets.poison_class
    count, chosen_here = targets.count, targets.chosen_here
    x_target = images_to_tensor(target_ds, t_img, target_indices)

    dev = next(surrogate.parameters()).device
    flags = freeze(surrogate)
    try:
        with torch.no_grad():
            target_features = features_of(surrogate, x_target.to(dev), normalization)
        x_all = images_to_tensor(train_ds, train.image_column)
        candidates = (train.labels == poison_class).nonzero().flatten()
        if poison_selection == "nearest":
            poison_indices = nearest_rows(surrogate, x_all, candidates, target_features, count, normalization)
        else:
            gen = torch.Generator().manual_seed(int(seed))
            poison_indices = sorted(
                int(i) for i in candidates[torch.randperm(len(candidates), generator=gen)[:count]]
            )
        del x_all
        clean_uint8 = images_to_uint8(train_ds, train.image_column, poison_indices)
        x_clean = clean_uint8.float().div(255).to(dev)

        def loss_of(delta: torch.Tensor) -> torch.Tensor:
            feats = torch.cat(
                [
                    features_of(
                        surrogate, x_clean[s : s + batch_size] + delta[s : s + batch_size], normalization
                    )
                    for s in range(0, count, batch_size)
                ]
            )
            return feature_loss(feats, target_features, objective)

        with torch.no_grad():
            initial = float(loss_of(torch.zeros_like(x_clean)))
        delta = torch.zeros_like(x_clean, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=step_size * epsilon)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        bar = tqdm(range(steps), desc=attack.replace("_", " "), disable=not progress, leave=False)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_of(delta)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                delta.clamp_(-epsilon, epsilon)
                delta.copy_((x_clean + delta).clamp(0, 1) - x_clean)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        poisons = quantise_poisons(x_clean + delta.detach(), clean_uint8, epsilon)
        with torch.no_grad():
            final = float(loss_of(poisons.float().div(255).to(dev) - x_clean))
    finally:
        unfreeze(flags)

    poisoned = build_poisoned_dataset(
        train_ds, train.image_column, train.label_column, poison_indices, poisons
    )
    params: dict[str, Any] = {
        "objective": objective,
        "setting": setting,
        "steps": steps,
        "step_size": step_size,
        "poison_selection": poison_selection,
        "target_selection": target_selection if chosen_here else "given",
        "target_pool_fraction": target_pool_fraction,
        "surrogate": surrogate_info,
        "feature_loss_initial": initial,
        "feature_loss_final": final,
    }
    spec = PoisonSpec(
        attack=attack,
        poison_class=int(poison_class),
        target_class=target_class,
        target_indices=target_indices,
        budget=float(budget),
        epsilon=float(epsilon),
        seed=int(seed),
        poison_indices=poison_indices,
        num_rows=train_ds.num_rows,
        params=params,
    )
    return poisoned, spec


def alias_signature() -> inspect.Signature:
    """Signature of :func:`craft_feature_space_attack` without ``objective`` (the aliases' signature).

    The aliases take ``**kwargs``; giving them this signature keeps ``inspect.signature`` and ``help()``
    accurate.
    """
    sig = inspect.signature(craft_feature_space_attack)
    return sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "objective"])


@register_attack("bullseye_polytope", kind="targeted", needs="features", settings=FeatureSpaceSettings)
def craft_bullseye_polytope(train_ds: Dataset, **kwargs: Any) -> tuple[Dataset, PoisonSpec]:
    """Bullseye Polytope (Aghakhani et al., EuroS&P 2021): the *mean* of the poisons' penultimate
    features is pulled onto the target's, so the target sits at the centre ("bullseye") of the polytope
    the poisons span in feature space.

    :func:`craft_feature_space_attack` with ``objective="polytope"``: the same keyword arguments and
    return value (``spec.attack == "bullseye_polytope"``).
    """
    return craft_feature_space_attack(train_ds, objective="polytope", **kwargs)


@register_attack("feature_collision", kind="targeted", needs="features", settings=FeatureSpaceSettings)
def craft_feature_collision(train_ds: Dataset, **kwargs: Any) -> tuple[Dataset, PoisonSpec]:
    """Feature Collision ("Poison Frogs", Shafahi et al., NeurIPS 2018): every poison's own penultimate
    features are pulled onto the target's, within an l_inf ball of its clean image.

    :func:`craft_feature_space_attack` with ``objective="collision"``: the same keyword arguments and
    return value (``spec.attack == "feature_collision"``).
    """
    return craft_feature_space_attack(train_ds, objective="collision", **kwargs)


craft_bullseye_polytope.__signature__ = alias_signature()  # type: ignore[attr-defined]
craft_feature_collision.__signature__ = alias_signature()  # type: ignore[attr-defined]
