"""Offline image-classification data: scikit-learn's digits, plain or made harder.

``variant="plain"`` is the 1,797 real 8x8 sklearn digits upsampled to ``image_size`` (grayscale).
A small CNN reaches ~98% on it and is so confident that targeted poisoning barely moves it. With
``renders_per_image > 1`` every training digit appears once as it is and again with a mild random
affine jitter (rotation, scale, shift), a larger plain training set of the same difficulty.

``variant="hard"`` renders every source digit several times in colour on textured random
backgrounds, with small random affine distortions, stroke thickness changes and pixel noise.
Its clean accuracy with a small model is far below plain digits' (nearer CIFAR-10's), which
makes it a setting where clean-label poisoning attacks actually work offline.

The train/test split is made over *source* digits (stratified, seeded), so no test image is
a re-rendering of a training digit. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

DIGIT_NAMES: list[str] = [str(i) for i in range(10)]


def _features(num_channels: int) -> Features:
    """The schema shared by every split: an ``image`` column and a 10-class ``label``."""
    del num_channels
    return Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})


def _split_sources(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple:
    """Stratified split of source-digit indices into train and test.

    Args:
        labels: class of each source digit.
        test_fraction: share of each class's sources that go to the test split.
        rng: the random generator to shuffle with.

    Returns:
        ``(train_indices, test_indices)``, each sorted.
    """
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return np.sort(np.array(train)), np.sort(np.array(test))


def _smooth_noise(n: int, size: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Low-frequency noise in [0, 1]: a random ``cells x cells`` grid upsampled bicubically."""
    grid = torch.rand(n, 1, cells, cells, generator=gen)
    up = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp(0.0, 1.0)


def _affine_theta(
    angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, shear: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``(n, 2, 3)`` matrices for ``F.affine_grid``: rotate, shear, scale per axis, shift.

    Args:
        angle: rotation in radians, ``(n,)``.
        scale: how large the digit appears along x and y, ``(n, 2)`` (the grid is divided by it).
        shift: translation in normalised coordinates, ``(n, 2)``.
        shear: added to the x row's off-diagonal term, ``(n,)`` (None: no shear).
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(angle.shape[0], 2, 3)
    theta[:, 0, 0] = cos / scale[:, 0]
    theta[:, 0, 1] = (-sin if shear is None else -sin + shear) / scale[:, 0]
    theta[:, 1, 0] = sin / scale[:, 1]
    theta[:, 1, 1] = cos / scale[:, 1]
    theta[:, :, 2] = shift
    return theta


def _render_hard(digits: torch.Tensor, image_size: int, gen: torch.Generator) -> torch.Tensor:
    """Render 8x8 digits (values in [0, 1]) as hard colour images.

    Args:
        digits: float tensor ``(n, 8, 8)`` in [0, 1].
        image_size: side of the square output.
        gen: torch generator driving every random choice.

    Returns:
        uint8 tensor ``(n, image_size, image_size, 3)``.
    """
    n = digits.shape[0]
    s = image_size
    # Random affine distortion: rotation, anisotropic scale, shear, translation.
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(15)
    scale = 0.80 + 0.35 * torch.rand(n, 2, generator=gen)  # digit covers 80-115% of its box
    shear = (torch.rand(n, generator=gen) * 2 - 1) * 0.2
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.18
    theta = _affine_theta(angle, scale, shift, shear)
    # Pad the 8x8 digit with a 1-pixel margin so the warp fills with zeros outside it.
    src = F.pad(digits[:, None], (1, 1, 1, 1))
    grid = F.affine_grid(theta, (n, 1, s, s), align_corners=False)
    mask = F.grid_sample(src, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    mask = mask.clamp(0.0, 1.0)
    # Stroke thickness: a random gamma thickens (<1) or thins (>1) the strokes.
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.7)
    mask = mask.pow(gamma)
    # Background: two random colours blended by smooth noise, plus fine texture.
    bg_a = torch.rand(n, 3, 1, 1, generator=gen)
    bg_b = torch.rand(n, 3, 1, 1, generator=gen)
    blend = _smooth_noise(n, s, 4, gen)
    texture = (_smooth_noise(n, s, s // 2, gen) - 0.5) * 0.35
    background = bg_a * blend + bg_b * (1 - blend) + texture
    # Foreground: a random colour pushed away from the mean background colour by a random
    # contrast, so some digits are clearly visible and some are faint.
    fg = torch.rand(n, 3, 1, 1, generator=gen)
    bg_mean = background.mean(dim=(2, 3), keepdim=True)
    direction = fg - bg_mean
    norm = direction.flatten(1).norm(dim=1).clamp_min(1e-3).view(n, 1, 1, 1)
    contrast = 0.25 + 0.55 * torch.rand(n, 1, 1, 1, generator=gen)
    fg = (bg_mean + direction / norm * contrast * math.sqrt(3)).clamp(0.0, 1.0)
    image = background * (1 - mask) + fg * mask
    image = image + torch.randn(n, 3, s, s, generator=gen) * (
        0.03 + 0.07 * torch.rand(n, 1, 1, 1, generator=gen)
    )
    image = image.clamp(0.0, 1.0)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _render_plain(digits: torch.Tensor, image_size: int) -> torch.Tensor:
    """Upsample 8x8 digits in [0, 1] bilinearly to uint8 ``(n, image_size, image_size)``."""
    up = F.interpolate(digits[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (up[:, 0].clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def _render_jittered(digits: torch.Tensor, image_size: int, gen: torch.Generator) -> torch.Tensor:
    """Plain renderings with a mild random affine jitter, uint8 ``(n, image_size, image_size)``.

    Rotation within +-10 degrees, scale 0.9-1.1, shift within +-6 % of the side; no colour, texture or
    noise, so the images stay as easy as the plain ones.
    """
    n = digits.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.12
    theta = _affine_theta(angle, scale[:, None].expand(n, 2), shift)
    grid = F.affine_grid(theta, (n, 1, image_size, image_size), align_corners=False)
    up = F.grid_sample(digits[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (up[:, 0].clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def _to_dataset(images: torch.Tensor, labels: np.ndarray) -> Dataset:
    """Build a ``datasets.Dataset`` with PIL ``image`` and ClassLabel ``label`` columns."""
    mode = "RGB" if images.ndim == 4 else "L"
    arr = images.numpy()
    pils = [PILImage.fromarray(a, mode=mode) for a in arr]
    return Dataset.from_dict(
        {"image": pils, "label": labels.tolist()}, features=_features(3 if mode == "RGB" else 1)
    )


def _plain_split(
    digits: torch.Tensor,
    labels: np.ndarray,
    src: np.ndarray,
    renders: int,
    image_size: int,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> Dataset:
    """One plain split: each source digit as it is, plus ``renders - 1`` jittered copies, shuffled.

    With ``renders=1`` the rows are the source digits in index order (no random draw is made).
    """
    images = _render_plain(digits[src], image_size)
    ids = src
    if renders > 1:
        extra = np.tile(src, renders - 1)
        images = torch.cat([images, _render_jittered(digits[extra], image_size, gen)])
        ids = np.concatenate([src, extra])
        order = rng.permutation(len(ids))
        images, ids = images[torch.from_numpy(order)], ids[order]
    return _to_dataset(images, labels[ids])


def check_renders(name: str, value: object) -> None:
    """Raise ``ValueError`` unless a renderings count is None (the variant's default) or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"{name} must be an int >= 1, or None for the variant's default, got {value!r}; use e.g. 1 or 3."
        )


def load_digits_dataset(
    variant: str = "hard",
    seed: int = 0,
    image_size: int = 32,
    *,
    renders_per_image: int | None = None,
    test_renders_per_image: int | None = None,
    test_fraction: float = 0.2,
) -> DatasetDict:
    """Build the offline digits dataset (no download; scikit-learn ships the source digits).

    Args:
        variant: ``"hard"`` (colour, textured backgrounds, distortions, noise) or ``"plain"``
            (the 8x8 digits upsampled, grayscale).
        seed: seed for the train/test split and every random rendering choice.
        image_size: side of the square images, at least 8.
        renders_per_image: how many renderings of each training source digit (None: 3 for ``"hard"``,
            1 for ``"plain"``). For ``"plain"``, the first is the digit as it is and the others are
            jittered (small rotation, scale and shift); rows are then shuffled.
        test_renders_per_image: the same for the test source digits (None: 2 for ``"hard"``, 1 for
            ``"plain"``).
        test_fraction: share of the source digits (per class) held out for the test split.

    Returns:
        A ``DatasetDict`` with ``train`` and ``test`` splits, columns ``image`` (``datasets.Image``)
        and ``label`` (``ClassLabel`` with names ``"0"``..``"9"``).

    Raises:
        ValueError: on an unknown variant or out-of-range sizes.
    """
    if variant not in ("hard", "plain"):
        raise ValueError(f"variant must be 'hard' or 'plain', got {variant!r}; pick one of those two.")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}; use e.g. 32.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}; use e.g. 0.2.")
    check_renders("renders_per_image", renders_per_image)
    check_renders("test_renders_per_image", test_renders_per_image)
    if renders_per_image is None:
        renders_per_image = 3 if variant == "hard" else 1
    if test_renders_per_image is None:
        test_renders_per_image = 2 if variant == "hard" else 1
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits_dataset needs scikit-learn: pip install scikit-learn") from err

    raw = load_digits()
    digits = torch.from_numpy(raw.images.astype(np.float32) / 16.0)
    labels = raw.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_src, test_src = _split_sources(labels, test_fraction, rng)

    gen = torch.Generator().manual_seed(int(seed))
    if variant == "plain":
        train = _plain_split(digits, labels, train_src, renders_per_image, image_size, rng, gen)
        test = _plain_split(digits, labels, test_src, test_renders_per_image, image_size, rng, gen)
        return DatasetDict(train=train, test=test)

    # Renderings of the same source digit are interleaved (all sources, then all again) and
    # then shuffled, so neighbouring rows are unrelated.
    train_ids = np.tile(train_src, renders_per_image)
    order = rng.permutation(len(train_ids))
    train_ids = train_ids[order]
    test_ids = np.tile(test_src, test_renders_per_image)
    train_imgs = _render_hard(digits[train_ids], image_size, gen)
    test_imgs = _render_hard(digits[test_ids], image_size, gen)
    return DatasetDict(
        train=_to_dataset(train_imgs, labels[train_ids]),
        test=_to_dataset(test_imgs, labels[test_ids]),
    )
