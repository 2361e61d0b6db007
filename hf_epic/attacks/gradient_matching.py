"""Gradient matching ("Witches' Brew", Geiping et al., ICLR 2021), written from the paper.

Clean-label targeted poisoning trained from scratch: perturb a few training images of the poison
class (within an l_inf ball) so that the training gradient they produce points the same way as the
gradient that would push the target towards the poison class. A victim that trains on them then
takes steps that misclassify the target, while the poisons keep their correct labels.

Loss (minimised over the perturbations ``delta``, ``|delta|_inf <= epsilon``)::

    1 - < grad_theta L(f(aug(x_p + delta)), y_p),  grad_theta L(f(x_t), y_adv) >
        / (|grad_theta L(f(aug(x_p + delta)), y_p)| |grad_theta L(f(x_t), y_adv)|)

optimised with signed Adam steps, a step-decay schedule, several random restarts (the best
final loss is kept) and differentiable augmentation (random shifts/flips) of the poisons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

from .common import (
    check_count,
    check_target_choice,
    check_targets,
    get_surrogate,
    load_training_set,
    resolve_targets,
    settings_of,
)
from .registry import TargetedSettings, register_attack
from .spec import PoisonSpec, build_poisoned_dataset, images_to_tensor, images_to_uint8, quantise_poisons
from .surrogate import DEFAULT_NORMALIZATION, Normalization, logits_of, shift_flip


def parameter_gradients(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy of ``(x, y)`` w.r.t. every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(logits_of(model, x, normalization), y)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def alignment_loss(poison_grads: list[torch.Tensor], target_grads: list[torch.Tensor]) -> torch.Tensor:
    """``1 - cosine`` between two gradients given as lists of per-parameter tensors."""
    dot = sum((p * t).sum() for p, t in zip(poison_grads, target_grads))
    p_norm = torch.sqrt(sum((p * p).sum() for p in poison_grads))
    t_norm = torch.sqrt(sum((t * t).sum() for t in target_grads))
    return 1.0 - dot / (p_norm * t_norm + 1e-12)


def select_poisons(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    poison_class: int,
    count: int,
    *,
    strategy: str,
    seed: int,
    normalization: Normalization = DEFAULT_NORMALIZATION,
) -> list[int]:
    """Choose which training rows of the poison class become poisons.

    Args:
        model: the surrogate (for ``"gradient_norm"``).
        x: all training images in [0, 1] (only rows of the poison class are used).
        labels: all training labels.
        poison_class: the class to take rows from.
        count: how many rows.
        strategy: ``"random"`` or ``"gradient_norm"`` (rows whose gradient w.r.t. the parameters is
            largest, as in Sleeper Agent).
        seed: seeds the random choice.
        normalization: input ``(mean, std)``.

    Returns:
        Sorted row positions.
    """
    candidates = torch.nonzero(labels == poison_class).flatten()
    if strategy == "random":
        rng = np.random.default_rng(seed)
        chosen = rng.choice(candidates.numpy(), size=count, replace=False)
        return sorted(int(i) for i in chosen)
    if strategy != "gradient_norm":
        raise ValueError(f"poison_selection={strategy!r}: use 'random' or 'gradient_norm'.")
    dev = next(model.parameters()).device
    norms = []
    for i in candidates.tolist():
        grads = parameter_gradients(
            model, x[i : i + 1].to(dev), labels[i : i + 1].to(dev), normalization=normalization
        )
        norms.append(float(torch.sqrt(sum((g * g).sum() for g in grads))))
    order = np.argsort(-np.asarray(norms), kind="stable")[:count]
    return sorted(int(candidates[j]) for j in order)


def match_gradients(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    x_clean: torch.Tensor,
    y_poison: torch.Tensor,
    target_grads: list[torch.Tensor] | Sequence[list[torch.Tensor]],
    *,
    epsilon: float,
    steps: int = 240,
    restarts: int = 4,
    step_size: float = 0.25,
    max_shift: int = 2,
    flip: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    init_delta: torch.Tensor | None = None,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    progress: bool = True,
    desc: str = "gradient matching",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Optimise l_inf-bounded perturbations whose training gradient aligns with ``target_grads``.

    Args:
        model: the surrogate, in eval mode, on its device, or a list of them (an ensemble: the loss is
            the mean alignment loss over its members).
        x_clean: clean poison images ``(n, C, H, W)`` in [0, 1].
        y_poison: their (unchanged) labels.
        target_grads: the gradient to align with (one tensor per trainable parameter), or one such
            list per ensemble member.
        epsilon: l_inf bound in [0, 1] pixel units.
        steps: optimisation steps per restart.
        restarts: independent random starts; the lowest final loss wins.
        step_size: Adam learning rate as a fraction of ``epsilon`` (decayed x0.1 at 3/8, 5/8, 9/10).
        max_shift: differentiable random shifts of the poisons while crafting (pixels, 0: none).
        flip: differentiable random horizontal flips while crafting.
        batch_size: poisons per gradient computation (each batch is aligned on its own).
        seed: seeds the random starts and augmentation.
        init_delta: start the first restart from this perturbation instead of a random one.
        normalization: input ``(mean, std)``.
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        ``(delta, info)``: the best perturbation (CPU, float) and ``{"initial_loss", "final_loss",
        "restart_losses"}`` (losses without augmentation; initial = the clean images').
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not isinstance(target_grads[0], (list, tuple)):
        target_grads = [target_grads]
    if len(target_grads) != len(models):
        raise ValueError(
            f"got {len(models)} models but {len(target_grads)} target gradients; pass one per model."
        )
    dev = next(models[0].parameters()).device
    x_clean = x_clean.to(dev)
    y_poison = y_poison.to(dev)
    target_grads = [[t.detach().to(dev) for t in tg] for tg in target_grads]
    n = len(x_clean)
    gen = torch.Generator().manual_seed(int(seed))

    def full_loss(delta: torch.Tensor, augment: bool) -> torch.Tensor:
        total = torch.zeros((), device=dev)
        for start in range(0, n, batch_size):
            xb = x_clean[start : start + batch_size] + delta[start : start + batch_size]
            for member, member_grads in zip(models, target_grads):
                xm = shift_flip(xb, gen, max_shift, flip) if augment else xb
                grads = parameter_gradients(
                    member,
                    xm,
                    y_poison[start : start + batch_size],
                    normalization=normalization,
                    create_graph=augment,
                )
                weight = len(xb) / n / len(models)
                loss = alignment_loss(grads, member_grads) * weight
                if augment:
                    loss.backward(retain_graph=len(models) > 1)
                total = total + loss.detach()
        return total

    with torch.enable_grad():
        initial = float(full_loss(torch.zeros_like(x_clean), augment=False))
    best_delta, best_loss, restart_losses = None, math.inf, []
    lr = step_size * epsilon
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 9 / 10)]
    bar = tqdm(total=steps * restarts, desc=desc, disable=not progress, leave=False)
    for r in range(restarts):
        if r == 0 and init_delta is not None:
            start = init_delta.to(dev).clone()
        else:
            start = (torch.rand(x_clean.shape, generator=gen) * 2 - 1).to(dev) * epsilon
        delta = ((x_clean + start).clamp(0, 1) - x_clean).requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            full_loss(delta, augment=True)
            delta.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                delta.clamp_(-epsilon, epsilon)
                delta.copy_((x_clean + delta).clamp(0, 1) - x_clean)
            bar.update(1)
        with torch.enable_grad():
            final = float(full_loss(delta.detach(), augment=False))
        restart_losses.append(final)
        bar.set_postfix(loss=f"{min(best_loss, final):.4f}")
        if final < best_loss:
            best_loss, best_delta = final, delta.detach().clone()
    bar.close()
    return best_delta.cpu(), {
        "initial_loss": initial,
        "final_loss": best_loss,
        "restart_losses": restart_losses,
    }


@dataclass
class GradientMatchingSettings(TargetedSettings):
    """Settings of :func:`craft_gradient_matching` (the fields are its keyword arguments)."""

    ensemble: int = 1
    restarts: int = 4
    max_shift: int = 2
    flip: bool = False


@register_attack("gradient_matching", kind="targeted", needs="surrogate", settings=GradientMatchingSettings)
def craft_gradient_matching(
    train_ds: Dataset,
    *,
    target_ds: Dataset,
    target_indices: list[int] | None = None,
    poison_class: int | None = None,
    num_targets: int = 1,
    target_selection: str = "low_margin",
    target_pool_fraction: float = 0.1,
    budget: float = 0.01,
    epsilon: float = 16 / 255,
    model: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
    surrogate_epochs: int | None = None,
    ensemble: int = 1,
    steps: int = 240,
    restarts: int = 4,
    step_size: float = 0.25,
    max_shift: int = 2,
    flip: bool = False,
    poison_selection: str = "random",
    batch_size: int = 256,
    image_column: str | None = None,
    label_column: str | None = None,
    target_image_column: str | None = None,
    device: str | torch.device | None = None,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Dataset, PoisonSpec]:
    """Craft a gradient-matching (Witches' Brew) poisoned training set.

    Args:
        train_ds: clean training set (image + label columns; not modified).
        target_ds: dataset holding the target images (usually the test split).
        target_indices: target rows of ``target_ds`` (one class); None chooses ``num_targets`` with the
            surrogate according to ``target_selection``.
        poison_class: class the targets should be classified as; None: the first target's runner-up.
        num_targets: number of targets when they are chosen here.
        target_selection: ``"low_margin"`` or ``"random"`` (see :func:`choose_targets`).
        target_pool_fraction: with ``"low_margin"``, the target is drawn among this share of the correctly
            classified candidates with the smallest surrogate margin (smaller: more ambiguous targets,
            which also flip more often without any poison; measure that with a clean control).
        budget: poisons as a fraction of the training set, in (0, 1).
        epsilon: l_inf bound in [0, 1] pixel units (16/255 by default).
        model: the surrogate (used as given unless ``surrogate_epochs``), or a list of surrogates (an
            ensemble; targets are chosen with the first); None builds ``ensemble`` default tiny ResNets
            (seeds ``seed``, ``seed + 1``, ...) and trains them on ``train_ds``.
        surrogate_epochs: epochs to train the surrogate on clean data (None: 12 for the default model,
            0 for a given one).
        ensemble: number of default surrogates when ``model`` is None (more transfer better to a
            victim trained from scratch, at proportional cost).
        steps: signed-Adam steps per restart.
        restarts: random restarts (the lowest alignment loss is kept).
        step_size: Adam learning rate as a fraction of ``epsilon``.
        max_shift: differentiable random shifts while crafting (pixels).
        flip: differentiable random horizontal flips while crafting (off: digits are not mirror-symmetric).
        poison_selection: ``"random"`` rows of the poison class, or ``"gradient_norm"`` (largest gradients).
        batch_size: poisons per gradient computation.
        image_column: image column of ``train_ds`` (None: auto-detect).
        label_column: label column of ``train_ds`` (None: auto-detect).
        target_image_column: image column of ``target_ds`` (None: auto-detect).
        device: where to craft (None: CUDA if available).
        normalization: input ``(mean, std)`` of the surrogate.
        progress: show tqdm bars.
        seed: seeds every random choice.

    Returns:
        ``(poisoned_ds, spec)``: same schema, rows and order as ``train_ds`` plus a bool ``is_poison``
        column, and the :class:`PoisonSpec`.

    Raises:
        ValueError / TypeError: on bad arguments, before any training.
    """
    settings = settings_of(GradientMatchingSettings, locals())
    train = load_training_set(train_ds, image_column, label_column, budget, epsilon)
    t_img, t_lab = check_targets(train, target_ds, target_indices, poison_class, target_image_column)
    check_target_choice(settings, ("random", "gradient_norm"))
    if poison_class is not None:
        check_count(train, budget, poison_class)
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps={steps} and restarts={restarts} must both be >= 1.")
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble={ensemble!r} must be an int >= 1 (the number of default surrogates).")

    given = list(model) if isinstance(model, (list, tuple)) else [model] * (ensemble if model is None else 1)
    if not given:
        raise ValueError("model is an empty list; pass at least one surrogate (or None for the default).")
    members, member_info = [], []
    for k, member in enumerate(given):
        trained, info_k = get_surrogate(train, member, settings, device, normalization, seed_offset=k)
        members.append(trained)
        member_info.append(info_k)
    surrogate = members[0]
    surrogate_info = member_info[0] if len(members) == 1 else {"ensemble": member_info}
    targets = resolve_targets(surrogate, train, target_ds, (t_img, t_lab), settings, normalization)
    target_indices, target_class, poison_class = targets.indices, targets.target_class, targets.poison_class
    count, chosen_here = targets.count, targets.chosen_here

    dev = next(surrogate.parameters()).device
    x_all = images_to_tensor(train_ds, train.image_column)
    poison_indices = select_poisons(
        surrogate,
        x_all,
        train.labels,
        poison_class,
        count,
        strategy=poison_selection,
        seed=seed,
        normalization=normalization,
    )
    x_target = images_to_tensor(target_ds, t_img, target_indices).to(dev)
    y_adv = torch.full((len(target_indices),), poison_class, dtype=torch.long, device=dev)
    with torch.enable_grad():
        target_grads = [
            [g.detach() for g in parameter_gradients(m, x_target, y_adv, normalization=normalization)]
            for m in members
        ]
    clean_uint8 = images_to_uint8(train_ds, train.image_column, poison_indices)
    x_clean = clean_uint8.float() / 255.0
    delta, info = match_gradients(
        members,
        x_clean,
        train.labels[poison_indices],
        target_grads,
        epsilon=epsilon,
        steps=steps,
        restarts=restarts,
        step_size=step_size,
        max_shift=max_shift,
        flip=flip,
        batch_size=batch_size,
        seed=seed,
        normalization=normalization,
        progress=progress,
    )
    poisons = quantise_poisons(x_clean + delta, clean_uint8, epsilon)
    with torch.enable_grad():
        losses = [
            float(
                alignment_loss(
                    parameter_gradients(
                        m,
                        (poisons.float() / 255).to(dev),
                        train.labels[poison_indices].to(dev),
                        normalization=normalization,
                    ),
                    tg,
                )
            )
            for m, tg in zip(members, target_grads)
        ]
        info["quantised_loss"] = sum(losses) / len(losses)
    poisoned = build_poisoned_dataset(
        train_ds, train.image_column, train.label_column, poison_indices, poisons
    )
    spec = PoisonSpec(
        attack="gradient_matching",
        poison_class=int(poison_class),
        target_class=target_class,
        target_indices=target_indices,
        budget=float(budget),
        epsilon=float(epsilon),
        seed=int(seed),
        poison_indices=poison_indices,
        num_rows=train_ds.num_rows,
        params={
            "steps": steps,
            "restarts": restarts,
            "ensemble": len(members),
            "step_size": step_size,
            "max_shift": max_shift,
            "flip": flip,
            "poison_selection": poison_selection,
            "target_selection": target_selection if chosen_here else "given",
            "target_pool_fraction": target_pool_fraction,
            "surrogate": surrogate_info,
            "alignment_loss_initial": info["initial_loss"],
            "alignment_loss_final": info["final_loss"],
            "alignment_loss_quantised": info["quantised_loss"],
            "restart_losses": info["restart_losses"],
        },
    )
    return poisoned, spec
