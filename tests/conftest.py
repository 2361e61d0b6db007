"""Shared fixtures for the trainer tests: small offline digits sets, tiny models, EpicConfig factory, and
the loader of the repository's scripts."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from transformers import default_data_collator

IMAGE_SIZE = 16

# Tiny models gain nothing from intra-op threads, and on a small shared CI machine several threads per
# process make every test several times slower (measured: 4.3 s with 1 thread vs 11.8 s with 2).
# Set HF_EPIC_TEST_THREADS to override.
torch.set_num_threads(int(os.environ.get("HF_EPIC_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """Import a script of the repository (``recipes/x.py``, ``benchmarks/y.py``) as a module; its main()
    is not run. Each call loads it afresh."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(f"script_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the script look their module up here
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _digits_train():
    from hf_epic.data import load_digits_dataset

    return load_digits_dataset(variant="plain", seed=0, image_size=IMAGE_SIZE)["train"]


@pytest.fixture
def digits_train():
    """The plain digits training split (1,438 rows, 16x16 grayscale, no transform)."""
    return _digits_train()


def small_digits(num_rows: int = 400, plant: dict[int, int] | None = None):
    """The first ``num_rows`` digits, with a ``row_id`` column and, optionally, relabelled rows.

    Args:
        num_rows: Rows to keep.
        plant: ``{row: new_label}``: rows whose label is changed (isolated points in gradient space).

    Returns:
        A ``datasets.Dataset`` with ``image``, ``label``, ``row_id`` and a bool ``is_poison`` column.
    """
    ds = _digits_train().select(range(num_rows)).flatten_indices()
    plant = plant or {}
    labels = list(ds["label"])
    for row, label in plant.items():
        labels[row] = label
    features = ds.features.copy()
    ds = ds.remove_columns("label").add_column("label", labels).cast_column("label", features["label"])
    ds = ds.add_column("row_id", list(range(num_rows)))
    return ds.add_column("is_poison", [i in plant for i in range(num_rows)])


def with_pixels(ds, augment: bool = False):
    """A view of ``ds`` whose rows carry ``pixel_values`` (the dataset itself is not changed)."""
    from hf_epic.models import image_transform

    return ds.with_transform(image_transform(IMAGE_SIZE, 1, augment=augment, seed=0))


class RecordingCollator:
    """A data collator that records the ``row_id`` of every row of every training batch.

    EPIC's input check and embedding pass collate with the trainer's collator too; they run under
    ``torch.no_grad`` and are counted in ``no_grad_calls``, not recorded as training batches.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.no_grad_calls = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if torch.is_grad_enabled():
            self.batches.append([int(f["row_id"]) for f in features])
        else:
            self.no_grad_calls += 1
        keep = [{k: v for k, v in f.items() if k in ("pixel_values", "label")} for f in features]
        return default_data_collator(keep)


def make_config(output_dir, **overrides: Any):
    """An EpicConfig for fast CPU tests (overridable)."""
    from hf_epic.epic_config import EpicConfig

    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": 3,
        "per_device_train_batch_size": 32,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "linear",
        "remove_unused_columns": False,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 5,
        "seed": 0,
        "epic_fraction": 0.2,
        "epic_start_epoch": 1,
        "epic_interval": 1,
        "epic_embedding_batch_size": 256,
    }
    kwargs.update(overrides)
    return EpicConfig(**kwargs)


def tiny_cnn(seed: int = 0):
    """A tiny timm ResNet for 16x16 grayscale digits, seeded."""
    from hf_epic.models import build_tiny_cnn

    torch.manual_seed(seed)
    return build_tiny_cnn(10, IMAGE_SIZE, 1)


def tiny_vit(seed: int = 0):
    """A tiny HF ViT for 16x16 grayscale digits, seeded."""
    from hf_epic.models import build_tiny_vit

    torch.manual_seed(seed)
    return build_tiny_vit(10, IMAGE_SIZE, 1)


def tiny_timm_vit(seed: int = 0):
    """A tiny timm ViT (TimmWrapper) for 16x16 grayscale digits, seeded."""
    from hf_epic.models import build_tiny_timm

    torch.manual_seed(seed)
    return build_tiny_timm(10, IMAGE_SIZE, 1)
