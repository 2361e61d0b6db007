"""The poison specification, and the image <-> tensor plumbing every attack shares.

Attacks work on float tensors ``(N, C, H, W)`` in [0, 1] at the dataset's native resolution and
channel count, then write the poisoned rows back as uint8 images. Quantisation happens *after*
the l_inf projection and is clipped again in uint8 space, so a stored poison never exceeds its
budget: ``|x_p - x| <= floor(epsilon * 255)`` per pixel, in the 0..255 values the file holds.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Image, Value
from PIL import Image as PILImage

from ..epic_callback import POISON_COLUMN  # the column EPIC reads: one name

SPEC_VERSION = 1


@dataclass
class PoisonSpec:
    """What an attack did, in a JSON-serialisable form (saved next to a poisoned dataset).

    Attributes:
        attack: attack name (``"gradient_matching"``, ``"bullseye_polytope"``, ``"feature_collision"``,
            ``"sleeper_agent"`` or ``"badnets"``).
        poison_class: the class the poisons are labelled as (targeted attacks: the class the target
            should be misclassified into; backdoors: the class triggered inputs should go to).
        target_class: true class of the target(s) for targeted attacks, else None.
        target_indices: row positions of the target(s) in the *target* (test) dataset; empty for
            backdoors.
        trigger: the backdoor trigger (see :func:`hf_epic.attacks.trigger.make_patch_trigger`) or None.
        budget: poisons as a fraction of the training set.
        epsilon: l_inf bound in [0, 1] pixel units (None for dirty-label BadNets).
        seed: the seed the attack ran with.
        poison_indices: sorted row positions of the poisoned training rows.
        num_rows: number of rows of the training set.
        params: attack hyper-parameters and diagnostics (losses before/after, surrogate settings).
        version: schema version of this record.
    """

    attack: str
    poison_class: int
    target_class: int | None = None
    target_indices: list[int] = field(default_factory=list)
    trigger: dict[str, Any] | None = None
    budget: float = 0.0
    epsilon: float | None = None
    seed: int = 0
    poison_indices: list[int] = field(default_factory=list)
    num_rows: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return a plain-JSON dict of every field."""
        return json.loads(json.dumps(asdict(self), default=_json_default))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoisonSpec:
        """Rebuild a spec from :meth:`to_dict` output.

        Args:
            data: the dict.

        Raises:
            ValueError: on a missing required key or an unknown schema version.
        """
        missing = [k for k in ("attack", "poison_class") if k not in data]
        if missing:
            raise ValueError(
                f"PoisonSpec dict is missing {missing}; pass the output of PoisonSpec.to_dict()."
            )
        if int(data.get("version", SPEC_VERSION)) > SPEC_VERSION:
            raise ValueError(
                f"PoisonSpec version {data['version']} is newer than this hf_epic ({SPEC_VERSION}); upgrade hf_epic."
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec as JSON, atomically (temporary file + rename).

        Args:
            path: destination file (e.g. ``<dataset_dir>/poison_spec.json``).
        """
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".poison_spec.", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PoisonSpec:
        """Read a spec written by :meth:`save`.

        Args:
            path: the JSON file.
        """
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


def _json_default(obj: Any) -> Any:
    """Turn numpy/torch scalars and arrays into plain JSON values."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------
# Columns and validation
# ---------------------------------------------------------------------------------------------


def find_image_column(ds: Dataset, image_column: str | None = None) -> str:
    """Return ``image_column`` if it is a column, else the first ``datasets.Image`` column, else
    ``"image"``/``"img"``.

    Raises:
        TypeError: if ``ds`` is not a ``datasets.Dataset``.
        ValueError: if no image column can be found.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(
            f"expected a datasets.Dataset, got {type(ds).__name__}; pass one split, e.g. dataset_dict['train']."
        )
    cols = ds.column_names
    if image_column is None:
        image_column = next((c for c in cols if isinstance(ds.features[c], Image)), None)
        if image_column is None:
            image_column = next((c for c in ("image", "img") if c in cols), None)
        if image_column is None:
            raise ValueError(
                f"no image column found among {cols}; pass image_column=<name of the image column>."
            )
    elif image_column not in cols:
        raise ValueError(
            f"image_column={image_column!r} is not a column of the dataset {cols}; pass one of those."
        )
    return image_column


def resolve_columns(ds: Dataset, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """Find the image and label columns of a dataset.

    Args:
        ds: the dataset.
        image_column: explicit name, or None to use the first ``datasets.Image`` column (then
            ``"image"``/``"img"``).
        label_column: explicit name, or None to use ``"label"``/``"labels"`` or the first ClassLabel.

    Returns:
        ``(image_column, label_column)``.

    Raises:
        TypeError: if ``ds`` is not a ``datasets.Dataset``.
        ValueError: if a column cannot be found.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(
            f"expected a datasets.Dataset, got {type(ds).__name__}; pass one split, e.g. dataset_dict['train']."
        )
    cols = ds.column_names
    image_column = find_image_column(ds, image_column)
    if label_column is None:
        label_column = next((c for c in ("label", "labels") if c in cols), None)
        if label_column is None:
            label_column = next((c for c in cols if isinstance(ds.features[c], ClassLabel)), None)
        if label_column is None:
            raise ValueError(
                f"no label column found among {cols}; pass label_column=<name of the label column>."
            )
    elif label_column not in cols:
        raise ValueError(
            f"label_column={label_column!r} is not a column of the dataset {cols}; pass one of those."
        )
    return image_column, label_column


def num_classes_of(ds: Dataset, label_column: str) -> int:
    """Number of classes: the ClassLabel's size, else ``max(label) + 1``."""
    feat = ds.features[label_column]
    if isinstance(feat, ClassLabel):
        return feat.num_classes
    return int(max(ds[label_column])) + 1


def check_class(name: str, value: Any, num_classes: int) -> int:
    """Validate a class index argument and return it as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int class index, got {value!r}; pass e.g. {name}=0.")
    if not 0 <= int(value) < num_classes:
        raise ValueError(
            f"{name}={value} is not a class of this dataset (0..{num_classes - 1}); pick one of those."
        )
    return int(value)


def check_budget(budget: float) -> float:
    """Validate a poison budget (a fraction of the training set in (0, 1))."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) < 1.0:
        raise ValueError(
            f"budget={budget!r} must be a fraction of the training set in (0, 1); e.g. budget=0.01 poisons 1% of rows."
        )
    return float(budget)


def check_epsilon(epsilon: float) -> float:
    """Validate an l_inf bound given in [0, 1] pixel units, at least one uint8 step."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, (int, float))
        or not math.isfinite(float(epsilon))
    ):
        raise ValueError(f"epsilon={epsilon!r} must be a number in (0, 1], e.g. epsilon=16/255.")
    if float(epsilon) <= 0.0:
        raise ValueError(
            f"epsilon={epsilon} must be > 0; pass the l_inf bound in pixel units, e.g. epsilon=16/255."
        )
    if float(epsilon) > 1.0:
        raise ValueError(
            f"epsilon={epsilon} is in 0..255 units; pass it in [0, 1] pixel units, e.g. epsilon={epsilon}/255."
        )
    if int(math.floor(float(epsilon) * 255 + 1e-6)) < 1:
        raise ValueError(
            f"epsilon={epsilon} is below one uint8 step (1/255), so nothing could change; use >= 1/255."
        )
    return float(epsilon)


def check_no_poison_column(ds: Dataset) -> None:
    """Refuse a dataset that is already poisoned (has an ``is_poison`` column)."""
    if POISON_COLUMN in ds.column_names:
        raise ValueError(
            f"the dataset already has an {POISON_COLUMN!r} column; attack a clean dataset "
            f"(e.g. ds.remove_columns({POISON_COLUMN!r}))."
        )


def budget_count(budget: float, num_rows: int) -> int:
    """Number of poison rows for a budget fraction: ``round(budget * num_rows)``, at least 1."""
    return max(1, int(round(budget * num_rows)))


# ---------------------------------------------------------------------------------------------
# Images <-> tensors
# ---------------------------------------------------------------------------------------------


def _pil_to_array(image: Any) -> np.ndarray:
    """Convert a PIL image (or array) to uint8 ``(H, W, C)`` with C in {1, 3}."""
    if not isinstance(image, PILImage.Image):
        image = PILImage.fromarray(np.asarray(image))
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def images_to_uint8(ds: Dataset, image_column: str, indices: Any = None) -> torch.Tensor:
    """Load images as a uint8 tensor ``(n, C, H, W)``.

    Args:
        ds: the dataset.
        image_column: the image column.
        indices: row positions to load (None: all rows).

    Raises:
        ValueError: if images differ in size or channel count.
    """
    if indices is None:
        indices = range(ds.num_rows)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("no rows to load")
    sub = ds.select_columns([image_column]).select(indices)
    arrays = [_pil_to_array(row[image_column]) for row in sub]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"images have different shapes {sorted(shapes)[:4]}; resize them to one size first "
            f"(e.g. ds.map(lambda r: {{'{image_column}': r['{image_column}'].resize((32, 32))}}))."
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def images_to_tensor(ds: Dataset, image_column: str, indices: Any = None) -> torch.Tensor:
    """Load images as float ``(n, C, H, W)`` in [0, 1] (see :func:`images_to_uint8`)."""
    return images_to_uint8(ds, image_column, indices).float() / 255.0


def quantise_poisons(
    poisoned: torch.Tensor, clean_uint8: torch.Tensor, epsilon: float | None
) -> torch.Tensor:
    """Round poisons to uint8 and clip them to the l_inf ball *in uint8 space*.

    Args:
        poisoned: float ``(n, C, H, W)`` in [0, 1].
        clean_uint8: the clean images, uint8 of the same shape.
        epsilon: the bound in [0, 1] pixel units (None: no bound, only rounding).

    Returns:
        uint8 tensor with ``|q - clean| <= floor(epsilon * 255)`` everywhere.
    """
    q = (poisoned.detach().cpu().clamp(0, 1) * 255).round()
    if epsilon is not None:
        e = int(math.floor(epsilon * 255 + 1e-6))
        c = clean_uint8.float()
        q = torch.minimum(torch.maximum(q, c - e), c + e)
    return q.clamp(0, 255).to(torch.uint8)


def uint8_to_pil(images: torch.Tensor) -> list[PILImage.Image]:
    """Convert uint8 ``(n, C, H, W)`` (C = 1 or 3) to PIL images (mode ``L`` or ``RGB``)."""
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    if arr.shape[-1] == 1:
        return [PILImage.fromarray(a[..., 0], mode="L") for a in arr]
    return [PILImage.fromarray(a, mode="RGB") for a in arr]


def _png_bytes(image: PILImage.Image) -> bytes:
    """Encode one image losslessly as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def build_poisoned_dataset(
    ds: Dataset,
    image_column: str,
    label_column: str,
    poison_indices: list[int],
    poison_images: torch.Tensor,
    poison_labels: list[int] | None = None,
) -> Dataset:
    """Return a copy of ``ds`` where only the poison rows change, plus a bool ``is_poison`` column.

    Images are written as lossless PNG, so the stored pixels are exactly ``poison_images``. The
    schema (features, column order) and row order are kept; ``ds`` itself is not modified.

    Args:
        ds: the clean dataset.
        image_column: its image column.
        label_column: its label column.
        poison_indices: row positions to replace, in the same order as ``poison_images``.
        poison_images: uint8 ``(n, C, H, W)``.
        poison_labels: new labels for the poison rows (dirty-label attacks), or None to keep them.
    """
    if poison_images.dtype != torch.uint8 or len(poison_images) != len(poison_indices):
        raise ValueError("poison_images must be uint8 with one image per poison index")
    encoded = dict(
        zip((int(i) for i in poison_indices), (_png_bytes(p) for p in uint8_to_pil(poison_images)))
    )
    new_labels = (
        dict(zip((int(i) for i in poison_indices), poison_labels)) if poison_labels is not None else {}
    )
    image_feature = ds.features[image_column]
    raw = ds.cast_column(image_column, Image(decode=False)) if isinstance(image_feature, Image) else ds

    def replace(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        images = list(batch[image_column])
        labels = list(batch[label_column])
        flags = []
        for j, i in enumerate(idx):
            hit = i in encoded
            flags.append(hit)
            if hit:
                images[j] = {"bytes": encoded[i], "path": None}
                if i in new_labels:
                    labels[j] = int(new_labels[i])
        return {image_column: images, label_column: labels, POISON_COLUMN: flags}

    features = raw.features.copy()
    if not isinstance(image_feature, Image):
        features[image_column] = Image(decode=False)
    features[POISON_COLUMN] = Value("bool")
    out = raw.map(
        replace,
        with_indices=True,
        batched=True,
        batch_size=1000,
        features=features,
        desc="writing poisons",
        load_from_cache_file=False,
    )
    return out.cast_column(image_column, image_feature if isinstance(image_feature, Image) else Image())
