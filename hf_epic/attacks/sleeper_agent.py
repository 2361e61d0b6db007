"""Sleeper Agent (Souri et al., NeurIPS 2022): a hidden-trigger, clean-label backdoor.

The poisons are correctly labelled images of the poison class with an invisible l_inf perturbation
and no trigger at all. They are crafted by gradient matching: their training gradient is aligned
with the gradient that would teach the model "source-class image + patch => poison class". After
training on them, patched source-class images go to the poison class.

As in the paper, poisons are the poison-class rows with the largest gradients, and the surrogate
can be retrained on the current poisoned set a few times while crafting so the poisons keep
working as the victim's weights move.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from .common import check_count, draw_classes, get_surrogate, load_training_set, settings_of
from .gradient_matching import alignment_loss, match_gradients, parameter_gradients, select_poisons
from .registry import PerturbationSettings, register_attack
from .spec import PoisonSpec, build_poisoned_dataset, images_to_tensor, quantise_poisons
from .surrogate import DEFAULT_NORMALIZATION, Normalization, build_default_surrogate, train_on_tensors
from .trigger import check_trigger, make_patch_trigger, stamp


def _trigger_gradient(
    model: torch.nn.Module,
    x_source: torch.Tensor,
    trigger: dict[str, Any],
    poison_class: int,
    *,
    seed: int,
    batch_size: int,
    normalization: Normalization,
) -> list[torch.Tensor]:
    """Mean gradient of "patched source images are the poison class" over ``x_source``."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    total: list[torch.Tensor] | None = None
    n = len(x_source)
    for start in range(0, n, batch_size):
        xb = stamp(x_source[start : start + batch_size], trigger, gen).to(dev)
        yb = torch.full((len(xb),), poison_class, dtype=torch.long, device=dev)
        with torch.enable_grad():
            grads = parameter_gradients(model, xb, yb, normalization=normalization)
        weight = len(xb) / n
        total = (
            [g * weight for g in grads] if total is None else [t + g * weight for t, g in zip(total, grads)]
        )
    return [t.detach() for t in total]


@dataclass
class SleeperAgentSettings(PerturbationSettings):
    """Settings of :func:`craft_sleeper_agent` (the fields are its keyword arguments)."""

    source_class: int | None = None
    trigger: dict[str, Any] | None = None
    patch_size: int | None = None
    location: str | tuple[int, int] = "bottom_right"
    setting: str = "scratch"
    retrain_rounds: int = 1
    retrain_epochs: int | None = None
    num_source: int | None = None
    restarts: int = 1
    max_shift: int = 2
    flip: bool = False
    poison_selection: str = "gradient_norm"


@register_attack("sleeper_agent", kind="backdoor", needs="surrogate", settings=SleeperAgentSettings)
def craft_sleeper_agent(
    train_ds: Dataset,
    *,
    poison_class: int | None = None,
    source_class: int | None = None,
    budget: float = 0.01,
    epsilon: float = 16 / 255,
    trigger: dict[str, Any] | None = None,
    patch_size: int | None = None,
    location: str | tuple[int, int] = "bottom_right",
    model: torch.nn.Module | None = None,
    setting: str = "scratch",
    surrogate_epochs: int | None = None,
    retrain_rounds: int = 1,
    retrain_epochs: int | None = None,
    num_source: int | None = None,
    steps: int = 240,
    restarts: int = 1,
    step_size: float = 0.25,
    max_shift: int = 2,
    flip: bool = False,
    poison_selection: str = "gradient_norm",
    batch_size: int = 256,
    image_column: str | None = None,
    label_column: str | None = None,
    device: str | torch.device | None = None,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Dataset, PoisonSpec]:
    """Craft a Sleeper Agent poisoned training set.

    Args:
        train_ds: clean training set (image + label columns; not modified).
        poison_class: class that patched source images should be classified as (the poisons' class);
            None draws one with ``seed``.
        source_class: class whose patched images the backdoor targets; None draws one (different from
            the poison class) with ``seed``.
        budget: poisons as a fraction of the training set, in (0, 1).
        epsilon: l_inf bound in [0, 1] pixel units.
        trigger: a trigger dict (see :func:`make_patch_trigger`); None makes one from ``patch_size``,
            ``location`` and ``seed``.
        patch_size: side of the generated patch (None: a quarter of the image side).
        location: where the generated patch goes at test time (``"bottom_right"``, ``"random"`` or
            ``(row, col)``); crafting uses the same rule.
        model: the surrogate (None: the default tiny ResNet trained on ``train_ds``).
        setting: how the victim will train: ``"scratch"`` (from random weights, as in the paper; each
            retraining round trains a new surrogate from scratch when ``model`` is None) or
            ``"finetune"`` (the victim fine-tunes ``model``, a public pretrained checkpoint the attacker
            also has; each retraining round fine-tunes a fresh copy of it). Benchmarks read it to build
            the victim.
        surrogate_epochs: epochs of clean training (None: 12 for the default model, 0 for a given one).
        retrain_rounds: times the surrogate is retrained on the current poisoned set while crafting
            (the steps are split evenly around them). The default model is retrained from scratch; a
            given model is copied and fine-tuned.
        retrain_epochs: epochs per retraining (None: as for the clean surrogate, 12 when unknown).
        num_source: source-class training rows used for the trigger gradient (None: all of them).
        steps: total signed-Adam steps (over all rounds).
        restarts: random restarts in the first round (the lowest alignment loss is kept).
        step_size: Adam learning rate as a fraction of ``epsilon``.
        max_shift: differentiable random shifts while crafting (pixels).
        flip: differentiable random horizontal flips while crafting.
        poison_selection: ``"gradient_norm"`` (largest gradients, as in the paper) or ``"random"``.
        batch_size: images per gradient computation.
        image_column: image column (None: auto-detect).
        label_column: label column (None: auto-detect).
        device: where to craft (None: CUDA if available).
        normalization: input ``(mean, std)`` of the surrogate.
        progress: show tqdm bars.
        seed: seeds every random choice.

    Returns:
        ``(poisoned_ds, spec)``; ``spec.trigger`` holds the trigger with its ``source_class``.
    """
    settings = settings_of(SleeperAgentSettings, locals())
    train = load_training_set(train_ds, image_column, label_column, budget, epsilon)
    poison_class, source_class = draw_classes(poison_class, source_class, train.num_classes, seed)
    if setting not in ("scratch", "finetune"):
        raise ValueError(f"setting={setting!r}: use 'scratch' (victim trained from scratch) or 'finetune'.")
    if poison_selection not in ("random", "gradient_norm"):
        raise ValueError(f"poison_selection={poison_selection!r}: use 'random' or 'gradient_norm'.")
    if retrain_rounds < 0 or steps < retrain_rounds + 1 or restarts < 1:
        raise ValueError(
            f"need retrain_rounds >= 0, steps >= retrain_rounds + 1 and restarts >= 1 "
            f"(got {retrain_rounds}, {steps}, {restarts})."
        )
    count = check_count(train, budget, poison_class)
    c, h, _ = train.shape
    if trigger is None:
        size = patch_size if patch_size is not None else max(3, h // 4)
        trigger = make_patch_trigger(c, size=size, location=location, source_class=source_class, seed=seed)
    else:
        trigger = dict(trigger, source_class=source_class)
    check_trigger(trigger, train.shape)

    surrogate, surrogate_info = get_surrogate(train, model, settings, device, normalization)
    dev = next(surrogate.parameters()).device
    pretrained = copy.deepcopy(surrogate) if setting == "finetune" else None
    x_all = images_to_tensor(train_ds, train.image_column)
    source_rows = (train.labels == source_class).nonzero().flatten()
    if num_source is not None:
        gen = torch.Generator().manual_seed(int(seed))
        source_rows = source_rows[torch.randperm(len(source_rows), generator=gen)[:num_source]]
    x_source = x_all[source_rows]
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
    clean_uint8 = (x_all[poison_indices] * 255).round().to(torch.uint8)
    x_clean = clean_uint8.float() / 255.0
    y_poison = train.labels[poison_indices]
    rounds = retrain_rounds + 1
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    if retrain_epochs is None:
        retrain_epochs = int(surrogate_info.get("trained_here_epochs") or 12)

    delta, history = None, []
    for r in range(rounds):
        if r > 0:
            x_train = x_all.clone()
            x_train[poison_indices] = quantise_poisons(x_clean + delta, clean_uint8, epsilon).float() / 255
            if pretrained is not None:
                surrogate = copy.deepcopy(pretrained)
            elif model is None:
                torch.manual_seed(int(seed) + r)
                surrogate = build_default_surrogate(train.num_classes, h, c)
            else:
                surrogate = copy.deepcopy(surrogate)
            train_on_tensors(
                surrogate,
                x_train,
                train.labels,
                epochs=retrain_epochs,
                seed=int(seed) + r,
                device=dev,
                normalization=normalization,
                progress=progress,
            )
        target_grads = _trigger_gradient(
            surrogate,
            x_source,
            trigger,
            poison_class,
            seed=seed,
            batch_size=batch_size,
            normalization=normalization,
        )
        delta, info = match_gradients(
            surrogate,
            x_clean,
            y_poison,
            target_grads,
            epsilon=epsilon,
            steps=per_round[r],
            restarts=restarts if r == 0 else 1,
            step_size=step_size,
            max_shift=max_shift,
            flip=flip,
            batch_size=batch_size,
            seed=int(seed) + r,
            init_delta=delta,
            normalization=normalization,
            progress=progress,
            desc=f"sleeper agent round {r + 1}/{rounds}",
        )
        history.append(
            {"round": r + 1, "initial_loss": info["initial_loss"], "final_loss": info["final_loss"]}
        )

    poisons = quantise_poisons(x_clean + delta, clean_uint8, epsilon)
    with torch.enable_grad():
        grads = parameter_gradients(
            surrogate, (poisons.float() / 255).to(dev), y_poison.to(dev), normalization=normalization
        )
        quantised_loss = float(alignment_loss(grads, target_grads))
    poisoned = build_poisoned_dataset(
        train_ds, train.image_column, train.label_column, poison_indices, poisons
    )
    spec = PoisonSpec(
        attack="sleeper_agent",
        poison_class=poison_class,
        trigger=trigger,
        budget=float(budget),
        epsilon=float(epsilon),
        seed=int(seed),
        poison_indices=poison_indices,
        num_rows=train_ds.num_rows,
        params={
            "source_class": source_class,
            "setting": setting,
            "steps": steps,
            "restarts": restarts,
            "retrain_rounds": retrain_rounds,
            "retrain_epochs": retrain_epochs,
            "step_size": step_size,
            "max_shift": max_shift,
            "flip": flip,
            "poison_selection": poison_selection,
            "num_source": len(source_rows),
            "surrogate": surrogate_info,
            "alignment_loss_initial": history[0]["initial_loss"],
            "alignment_loss_final": history[-1]["final_loss"],
            "alignment_loss_quantised": quantised_loss,
            "rounds": history,
        },
    )
    return poisoned, spec
