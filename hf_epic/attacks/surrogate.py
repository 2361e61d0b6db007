"""The attacker's surrogate model: building, clean training, logits/features, augmentation, targets.

Any image classifier works as a surrogate: a ``transformers`` model called as
``model(pixel_values=x)`` (its ``.logits`` are used) or a plain ``torch.nn.Module`` returning
logits. Inputs are normalised like :func:`hf_epic.models.image_transform` (mean 0.5, std 0.5)
unless ``normalization`` says otherwise. Penultimate features are read by a forward pre-hook on
the final linear layer (timm wrappers: ``timm_model.get_classifier()``; HF ViT: ``classifier``;
others: ``fc``/``head``/``classifier``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

from .spec import images_to_tensor, num_classes_of, resolve_columns

Normalization = tuple[float, float]
DEFAULT_NORMALIZATION: Normalization = (0.5, 0.5)


def default_device(device: str | torch.device | None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def logits_of(
    model: torch.nn.Module, x: torch.Tensor, normalization: Normalization = DEFAULT_NORMALIZATION
) -> torch.Tensor:
    """Logits of ``model`` for images ``x`` in [0, 1] (normalised here).

    Args:
        model: a transformers image classifier or a module returning logits.
        x: float ``(n, C, H, W)`` in [0, 1].
        normalization: ``(mean, std)`` applied before the model.
    """
    mean, std = normalization
    z = (x - mean) / std
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()  # type: ignore[assignment]
    out = model(pixel_values=z) if isinstance(model, PreTrainedModel) else model(z)
    return out.logits if hasattr(out, "logits") else out


def classifier_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The final linear layer whose input is the penultimate feature vector.

    Raises:
        TypeError: if no final layer can be found.
    """
    if hasattr(model, "timm_model"):
        return model.timm_model.get_classifier()
    for name in ("classifier", "fc", "head"):
        layer = getattr(model, name, None)
        if isinstance(layer, torch.nn.Linear):
            return layer
    raise TypeError(
        f"cannot find the final linear layer of {type(model).__name__}; use a model with a "
        "'classifier', 'fc' or 'head' nn.Linear (or a timm wrapper)."
    )


@contextmanager
def capture_features(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Context manager: every forward stores the classifier's input in ``store["features"]``."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, inputs: tuple) -> None:
        store["features"] = inputs[0].flatten(1)

    handle = classifier_layer(model).register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def features_of(
    model: torch.nn.Module, x: torch.Tensor, normalization: Normalization = DEFAULT_NORMALIZATION
) -> torch.Tensor:
    """Penultimate features ``(n, D)`` of images ``x`` in [0, 1] (differentiable)."""
    with capture_features(model) as store:
        logits_of(model, x, normalization)
    return store["features"]


def shift_flip(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2, flip: bool = False) -> torch.Tensor:
    """Differentiable augmentation: random integer shifts (zero fill) and optional horizontal flips.

    Args:
        x: ``(n, C, H, W)``.
        gen: CPU generator for the random choices.
        max_shift: largest shift in pixels along each axis.
        flip: also flip a random half of the images left-right.
    """
    n, _, h, w = x.shape
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen).to(x.device, x.dtype)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = shifts[:, 0] * 2.0 / w
        theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x


def build_default_surrogate(num_classes: int, image_size: int, num_channels: int) -> torch.nn.Module:
    """The default surrogate: :func:`hf_epic.models.build_tiny_cnn` (a tiny timm ResNet)."""
    from hf_epic.models import build_tiny_cnn

    return build_tiny_cnn(num_labels=num_classes, image_size=image_size, num_channels=num_channels)


def train_on_tensors(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 12,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    max_shift: int = 2,
    flip: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    progress: bool = True,
    params: list[torch.nn.Parameter] | None = None,
) -> torch.nn.Module:
    """Train ``model`` in place on ``(x, y)`` with SGD + Nesterov momentum and a cosine schedule.

    Args:
        model: the classifier.
        x: float ``(N, C, H, W)`` in [0, 1].
        y: int64 labels.
        epochs: passes over the data.
        batch_size: minibatch size.
        lr: peak learning rate.
        weight_decay: L2 penalty.
        max_shift: random-shift augmentation in pixels (0: none).
        flip: random horizontal flips.
        seed: seeds the shuffling and augmentation.
        device: where to train (None: CUDA if available).
        normalization: input ``(mean, std)``.
        progress: show a tqdm bar.
        params: train only these parameters (None: all), e.g. a linear head on frozen features.

    Returns:
        The model, in eval mode.
    """
    dev = default_device(device)
    model.to(dev).train()
    gen = torch.Generator().manual_seed(int(seed))
    trainable = list(model.parameters()) if params is None else list(params)
    opt = torch.optim.SGD(trainable, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    n = len(x)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    bar = tqdm(total=steps, desc="training surrogate", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = shift_flip(x[idx], gen, max_shift, flip).to(dev)
            loss = F.cross_entropy(logits_of(model, xb, normalization), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


def train_surrogate(
    train_ds: Dataset,
    *,
    model: torch.nn.Module | None = None,
    epochs: int = 12,
    batch_size: int = 128,
    lr: float = 0.05,
    max_shift: int = 2,
    flip: bool = False,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    device: str | torch.device | None = None,
    normalization: Normalization = DEFAULT_NORMALIZATION,
    progress: bool = True,
) -> torch.nn.Module:
    """Train a surrogate classifier on a clean dataset (deterministic given ``seed`` on CPU).

    Args:
        train_ds: clean training set with an image and a label column.
        model: the model to train (None: :func:`build_default_surrogate`, seeded by ``seed``).
        epochs: passes over the data.
        batch_size: minibatch size.
        lr: peak SGD learning rate.
        max_shift: random-shift augmentation in pixels.
        flip: random horizontal flips.
        seed: seeds initialisation, shuffling and augmentation.
        image_column: image column (None: auto-detect).
        label_column: label column (None: auto-detect).
        device: training device (None: CUDA if available).
        normalization: input ``(mean, std)``.
        progress: show a tqdm bar.

    Returns:
        The trained model, in eval mode.
    """
    image_column, label_column = resolve_columns(train_ds, image_column, label_column)
    x = images_to_tensor(train_ds, image_column)
    y = torch.tensor(train_ds[label_column], dtype=torch.long)
    if model is None:
        torch.manual_seed(int(seed))
        model = build_default_surrogate(num_classes_of(train_ds, label_column), x.shape[-1], x.shape[1])
    return train_on_tensors(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_shift=max_shift,
        flip=flip,
        seed=seed,
        device=device,
        normalization=normalization,
        progress=progress,
    )


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    normalization: Normalization = DEFAULT_NORMALIZATION,
) -> torch.Tensor:
    """Logits ``(n, K)`` for images in [0, 1], in eval mode, on the model's device, returned on CPU."""
    model.eval()
    dev = next(model.parameters()).device
    outs = [
        logits_of(model, x[i : i + batch_size].to(dev), normalization).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs)


def choose_targets(
    model: torch.nn.Module,
    target_ds: Dataset,
    *,
    num_targets: int = 1,
    poison_class: int | None = None,
    strategy: str = "low_margin",
    pool_fraction: float = 0.1,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    normalization: Normalization = DEFAULT_NORMALIZATION,
) -> tuple[list[int], int]:
    """Pick target rows (and the poison class) for a targeted attack.

    Candidates are rows the model classifies correctly, of one class, not of ``poison_class``.
    ``"low_margin"`` draws at random among the ``pool_fraction`` of candidates with the smallest
    margin (true-class logit minus poison-class logit, or minus the runner-up when no poison class
    is given); ``"random"`` draws among all candidates.

    Args:
        model: the surrogate.
        target_ds: the dataset the targets come from (usually the test split).
        num_targets: how many targets (all of the first target's class).
        poison_class: the class to push targets into (None: the first target's runner-up class).
        strategy: ``"low_margin"`` or ``"random"``.
        pool_fraction: share of lowest-margin candidates to draw from.
        seed: seeds the draw.
        image_column: image column (None: auto-detect).
        label_column: label column (None: auto-detect).
        normalization: input ``(mean, std)``.

    Returns:
        ``(target_indices, poison_class)``.
    """
    if strategy not in ("low_margin", "random"):
        raise ValueError(f"strategy={strategy!r}: use 'low_margin' or 'random'.")
    image_column, label_column = resolve_columns(target_ds, image_column, label_column)
    y = torch.tensor(target_ds[label_column], dtype=torch.long)
    logits = predict(model, images_to_tensor(target_ds, image_column), normalization=normalization)
    correct = logits.argmax(1) == y
    if poison_class is not None:
        correct &= y != poison_class
        other = logits[:, poison_class]
    else:
        masked = logits.clone()
        masked[torch.arange(len(y)), y] = -float("inf")
        other = masked.max(1).values
    margin = logits[torch.arange(len(y)), y] - other
    cand = torch.nonzero(correct).flatten()
    if len(cand) == 0:
        raise ValueError("the model classifies no eligible target correctly; train the surrogate longer.")
    rng = np.random.default_rng(seed)
    if strategy == "low_margin":
        pool = cand[margin[cand].argsort()][: max(1, int(math.ceil(pool_fraction * len(cand))))]
    else:
        pool = cand
    first = int(pool[rng.integers(len(pool))])
    target_class = int(y[first])
    if poison_class is None:
        masked = logits[first].clone()
        masked[target_class] = -float("inf")
        poison_class = int(masked.argmax())
    same = [int(i) for i in pool if int(y[i]) == target_class and int(i) != first]
    if len(same) < num_targets - 1:
        same = [int(i) for i in cand if int(y[i]) == target_class and int(i) != first]
    extra = rng.permutation(same)[: num_targets - 1].tolist() if num_targets > 1 else []
    return [first, *[int(i) for i in extra]], int(poison_class)
