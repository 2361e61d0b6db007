"""Patch triggers for backdoor attacks (BadNets, Sleeper Agent) and for measuring them.

A trigger is a plain dict (so it fits in :class:`~hf_epic.attacks.spec.PoisonSpec`)::

    {"type": "patch", "size": 5, "location": "bottom_right" | "random" | [row, col],
     "pattern": [[[r, g, b], ...], ...],   # size x size x C uint8 values
     "source_class": 3 | None}              # None: every class other than the poison class

Evaluate a backdoor by stamping the trigger on test images with :func:`apply_trigger` and counting
how many of those (of ``source_class``, or of every non-poison class) the model puts in the poison
class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image as PILImage

from .spec import find_image_column

LOCATIONS = ("bottom_right", "random")


def make_patch_trigger(
    num_channels: int,
    *,
    size: int,
    location: str | tuple[int, int] | list[int] = "bottom_right",
    source_class: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build a random high-contrast patch trigger (each pixel channel is 0 or 255).

    Args:
        num_channels: 1 (grayscale) or 3 (RGB), as the images it will be stamped on.
        size: side of the square patch in pixels.
        location: ``"bottom_right"`` (1-pixel margin), ``"random"`` (a new place per image) or
            ``(row, col)`` of the top-left corner.
        source_class: the class whose images the backdoor is meant for (None: all but the poison class).
        seed: seeds the pattern.

    Returns:
        The trigger dict.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels={num_channels}: use 1 or 3.")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"trigger size={size!r} must be a positive int number of pixels, e.g. 5.")
    if isinstance(location, str):
        if location not in LOCATIONS:
            raise ValueError(f"location={location!r}: use 'bottom_right', 'random' or a (row, col) pair.")
    else:
        location = [int(v) for v in location]
        if len(location) != 2 or min(location) < 0:
            raise ValueError(f"location={location!r} must be a non-negative (row, col) pair.")
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 2, size=(size, size, num_channels)) * 255
    # a checkerboard of the pattern and its complement keeps the patch high-contrast everywhere
    checker = (np.add.outer(np.arange(size), np.arange(size)) % 2).astype(bool)[..., None]
    pattern = np.where(checker, pattern, 255 - pattern).astype(np.uint8)
    return {
        "type": "patch",
        "size": size,
        "location": location,
        "pattern": pattern.tolist(),
        "source_class": None if source_class is None else int(source_class),
    }


def check_trigger(trigger: dict[str, Any], shape: tuple[int, int, int]) -> None:
    """Check a trigger dict against image shape ``(C, H, W)``.

    Raises:
        ValueError: if it is malformed or does not fit the images.
    """
    if not isinstance(trigger, dict) or trigger.get("type") != "patch" or "pattern" not in trigger:
        raise ValueError("trigger must be a dict from make_patch_trigger (type 'patch' with a 'pattern').")
    pattern = np.asarray(trigger["pattern"])
    c, h, w = shape
    if pattern.ndim != 3 or pattern.shape[0] != pattern.shape[1] or pattern.shape[2] != c:
        raise ValueError(
            f"trigger pattern has shape {pattern.shape}; it must be (size, size, {c}) for these images."
        )
    k = pattern.shape[0]
    if k > min(h, w):
        raise ValueError(f"trigger size {k} does not fit {h}x{w} images; use a smaller patch.")
    loc = trigger.get("location", "bottom_right")
    if not isinstance(loc, str) and (loc[0] + k > h or loc[1] + k > w):
        raise ValueError(f"trigger at {loc} with size {k} falls outside {h}x{w} images; move it.")


def _positions(trigger: dict[str, Any], n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Top-left corners ``(n, 2)`` of the patch for ``n`` images."""
    k = len(trigger["pattern"])
    loc = trigger.get("location", "bottom_right")
    if loc == "random":
        rows = torch.randint(0, h - k + 1, (n,), generator=gen)
        cols = torch.randint(0, w - k + 1, (n,), generator=gen)
        return torch.stack([rows, cols], 1)
    if loc == "bottom_right":
        r, c = max(0, h - k - 1), max(0, w - k - 1)
    else:
        r, c = int(loc[0]), int(loc[1])
    return torch.tensor([[r, c]]).repeat(n, 1)


def stamp(x: torch.Tensor, trigger: dict[str, Any], gen: torch.Generator | None = None) -> torch.Tensor:
    """Return images ``x`` (float ``(n, C, H, W)`` in [0, 1] or uint8) with the trigger pasted on.

    Args:
        x: the images (not modified).
        trigger: the trigger dict.
        gen: generator for ``"random"`` locations (None: seed 0).
    """
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    check_trigger(trigger, tuple(x.shape[1:]))
    pattern = torch.tensor(trigger["pattern"], dtype=torch.float32).permute(2, 0, 1)
    if x.dtype != torch.uint8:
        pattern = pattern / 255.0
    pattern = pattern.to(x.device, x.dtype)
    k = pattern.shape[-1]
    out = x.clone()
    for i, (r, c) in enumerate(_positions(trigger, len(x), x.shape[2], x.shape[3], gen).tolist()):
        out[i, :, r : r + k, c : c + k] = pattern
    return out


def apply_trigger(
    ds: Dataset,
    trigger: dict[str, Any],
    *,
    image_column: str | None = None,
    seed: int = 0,
) -> Dataset:
    """Return a copy of ``ds`` with the trigger stamped on every image (labels unchanged).

    Args:
        ds: the dataset (e.g. the test split, filtered to the source class).
        trigger: the trigger dict (e.g. ``spec.trigger``).
        image_column: image column (None: auto-detect).
        seed: seeds ``"random"`` locations.
    """
    image_column = find_image_column(ds, image_column)
    gen = torch.Generator().manual_seed(int(seed))

    def stamp_batch(batch: dict[str, list]) -> dict[str, list]:
        images = []
        for image in batch[image_column]:
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            arr = np.asarray(image, dtype=np.uint8)
            arr = arr[..., None] if arr.ndim == 2 else arr
            x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
            y = stamp(x, trigger, gen)[0].permute(1, 2, 0).numpy()
            images.append(PILImage.fromarray(y[..., 0] if y.shape[-1] == 1 else y))
        return {image_column: images}

    return ds.map(
        stamp_batch, batched=True, batch_size=256, desc="stamping trigger", load_from_cache_file=False
    )
