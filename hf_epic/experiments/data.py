"""The data-set registry and the loading every script shares.

A data set registers a loader ``loader(args, seed) -> DatasetDict(train=..., test=...)`` whose splits have
an ``image`` and a ``label`` (ClassLabel) column. ``digits`` (offline, :mod:`hf_epic.data`) and
``cifar10`` (from the Hub) are registered here; any other name is read as a ``save_to_disk`` folder of a
``DatasetDict`` or a Hub data set id. Adding a data set is one file with a registration::

    @register_dataset("fashion_mnist")
    def load_fashion_mnist(args, seed):
        return hub_splits("fashion_mnist")

plus its import at the end of this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..registry import Registry

__all__ = [
    "DATASET_REGISTRY",
    "dataset_label",
    "dataset_names",
    "hub_splits",
    "label_names",
    "load_splits",
    "load_task",
    "normalise_columns",
    "register_dataset",
    "split_source",
]

DATASET_REGISTRY: Registry[Callable[[Any, int], Any]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[Callable[[Any, int], Any]], Callable[[Any, int], Any]]:
    """Decorator: register ``loader(args, seed) -> DatasetDict`` under ``name``."""

    def wrap(loader: Callable[[Any, int], Any]) -> Callable[[Any, int], Any]:
        DATASET_REGISTRY.add(name, loader)
        return loader

    return wrap


def dataset_names() -> tuple[str, ...]:
    """Registered data set names."""
    return DATASET_REGISTRY.names()


def normalise_columns(ds: Any) -> Any:
    """Rename a dataset's first image and ClassLabel columns to ``image`` and ``label`` and keep only those.

    Args:
        ds: a ``datasets.Dataset`` (not modified).

    Returns:
        A new dataset with exactly the columns ``image`` and ``label``.
    """
    import datasets

    for column, feature, cast in (
        ("image", datasets.Image, "datasets.Image()"),
        ("label", datasets.ClassLabel, "datasets.ClassLabel(num_classes=...)"),
    ):
        if column in ds.features:
            continue
        found = [k for k, v in ds.features.items() if isinstance(v, feature)]
        if not found:
            raise ValueError(
                f"No {column} column in {sorted(ds.features)}: hf-epic needs a {feature.__name__} column "
                f"(named {column!r}, or any name of that feature type); cast yours with "
                f"ds.cast_column(name, {cast})."
            )
        ds = ds.rename_column(found[0], column)
    return ds.select_columns(["image", "label"])


def hub_splits(name: str) -> Any:
    """Train and test splits of a Hub data set id or a ``save_to_disk`` folder, columns normalised.

    Args:
        name: a Hub id for ``datasets.load_dataset`` (needs the internet) or a folder holding a saved
            ``DatasetDict``. Its ``test`` split (or ``validation``) is the test split.
    """
    import datasets

    local = Path(name)
    if (local / "dataset_dict.json").is_file():  # a DatasetDict saved with save_to_disk
        loaded = datasets.load_from_disk(str(local))
    else:
        loaded = datasets.load_dataset(name)
    test_split = "test" if "test" in loaded else ("validation" if "validation" in loaded else None)
    if "train" not in loaded or test_split is None:
        raise ValueError(
            f"Dataset {name!r} has splits {sorted(loaded)}; hf-epic needs 'train' and 'test' (or 'validation')."
        )
    return datasets.DatasetDict(
        train=normalise_columns(loaded["train"]), test=normalise_columns(loaded[test_split])
    )


@register_dataset("digits")
def load_digits(args: Any, seed: int) -> Any:
    """scikit-learn's digits rendered as images (offline; ``args.digits_variant``, ``args.digits_renders``)."""
    from hf_epic.data import load_digits_dataset

    return load_digits_dataset(
        args.digits_variant, seed=seed, image_size=args.image_size, renders_per_image=args.digits_renders
    )


@register_dataset("cifar10")
def load_cifar10(args: Any, seed: int) -> Any:
    """CIFAR-10 from the Hub (needs the internet)."""
    return hub_splits("cifar10")


def load_splits(args: Any, seed: int) -> Any:
    """Train and test splits with ``image`` and ``label`` columns, as ``args`` asks.

    Args:
        args: :class:`~hf_epic.experiments.args.DataArguments` (or a config extending it): the data set,
            its variant, image size and row limits. ``num_channels=None`` is set from the images.
        seed: Seed of the data set's own randomness (the digits' rendering).

    Returns:
        A ``datasets.DatasetDict`` with ``train`` (its first ``max_train_rows`` rows) and ``test`` (its
        first ``max_eval_rows`` rows).
    """
    import datasets

    if args.dataset_name in DATASET_REGISTRY:
        dd = DATASET_REGISTRY.get(args.dataset_name)(args, seed)
    else:
        dd = hub_splits(args.dataset_name)
    train, test = dd["train"], dd["test"]
    if args.max_train_rows is not None:
        train = train.select(range(min(args.max_train_rows, len(train))))
    if args.max_eval_rows is not None:
        test = test.select(range(min(args.max_eval_rows, len(test))))
    if args.num_channels is None:  # the model and the attacks see the images as they are stored
        args.num_channels = 1 if train[0]["image"].mode == "L" else 3
    return datasets.DatasetDict(train=train, test=test)


def split_source(train: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split the training rows into a clean source part (for a backbone) and the rest, by class.

    Args:
        train: The training split.
        fraction: Share of rows in the source part.
        seed: Seed of the split.

    Returns:
        ``(source, rest)``.
    """
    parts = train.train_test_split(test_size=1.0 - fraction, stratify_by_column="label", seed=seed)
    return parts["train"].flatten_indices(), parts["test"].flatten_indices()


def label_names(ds: Any) -> dict[int, str]:
    """``id2label`` from a dataset's ClassLabel feature."""
    return dict(enumerate(ds.features["label"].names))


def dataset_label(args: Any) -> str:
    """Name of the data set for a model card (``digits-plain``, ``cifar10``, ...)."""
    return f"digits-{args.digits_variant}" if args.dataset_name == "digits" else args.dataset_name


def load_task(args: Any, seed: int) -> tuple[Any, Any, dict[int, str]]:
    """A recipe's data: ``(train, test, id2label)`` from :func:`load_splits`, with a line saying what it is."""
    from .runtime import banner, is_main_process

    banner("data")
    splits = load_splits(args, seed)
    train, test = splits["train"], splits["test"]
    id2label = label_names(train)
    if is_main_process():
        print(
            f"{dataset_label(args)}: {len(train)} training rows, {len(test)} test rows, {len(id2label)} classes"
        )
    return train, test, id2label
