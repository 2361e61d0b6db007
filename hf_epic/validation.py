"""Input checks run before any training time is spent; each error names the problem and the fix."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "check_embedding_dataset",
    "check_enough_rows",
    "check_labels_in_range",
    "check_model_logits",
    "check_train_dataset",
    "find_label_column",
    "read_bool_column",
    "read_labels",
]

LABEL_COLUMNS = ("label", "labels")


def check_train_dataset(dataset: Any, what: str = "train_dataset") -> None:
    """Require a map-style ``datasets.Dataset``.

    Args:
        dataset: The object to check.
        what: How the error message names it.

    Raises:
        TypeError: For an ``IterableDataset``, a ``DatasetDict`` or any other type.
    """
    import datasets

    if dataset is None:
        raise ValueError(f"EPIC needs a {what}; pass train_dataset=<datasets.Dataset> to the trainer.")
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError(
            f"{what} is a datasets.IterableDataset: EPIC embeds and drops rows by position, which needs a "
            "map-style dataset. Load it without streaming=True, or materialise it with "
            "datasets.Dataset.from_generator(lambda: iter(ds), features=ds.features)."
        )
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(f"{what} is a DatasetDict; pass one split, e.g. dataset_dict['train'].")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"{what} is a {type(dataset).__name__}; EPIC needs a datasets.Dataset (with an image column "
            "and a 'label' column). Convert it with datasets.Dataset.from_dict / from_generator."
        )
    if len(dataset) == 0:
        raise ValueError(f"{what} has no rows; pass a non-empty dataset.")


def find_label_column(dataset: Any) -> str:
    """Return the integer label column (``label`` or ``labels``).

    When both columns exist they must hold the same values: collators disagree on which one they
    train on (``default_data_collator`` uses ``labels``, ``DataCollatorWithPadding`` ``label``).

    Raises:
        ValueError: If there is none, it is not integer / ``ClassLabel``, or ``label`` and ``labels``
            both exist and differ.
    """
    import datasets

    features = dataset.features
    present = [name for name in LABEL_COLUMNS if name in features]
    for name in present:
        feature = features[name]
        if isinstance(feature, datasets.ClassLabel):
            continue
        if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            continue
        raise ValueError(
            f"column '{name}' has type {feature}; EPIC needs integer class labels. Cast it with "
            f"dataset.cast_column('{name}', datasets.ClassLabel(names=[...])) or map it to ints."
        )
    if not present:
        raise ValueError(
            f"the dataset has no 'label' or 'labels' column (columns: {dataset.column_names}); rename your "
            "class column with dataset.rename_column('<name>', 'label')."
        )
    if len(present) == 2 and not torch.equal(read_labels(dataset, "label"), read_labels(dataset, "labels")):
        raise ValueError(
            "the dataset has both a 'label' and a 'labels' column and they differ; which one the model trains "
            "on depends on the data collator, so EPIC cannot know which labels to select on. Keep one of them, "
            "e.g. dataset.remove_columns('label')."
        )
    return present[0]


def read_labels(dataset: Any, column: str) -> torch.Tensor:
    """Read the label column without running the dataset's transform (no image decoding)."""
    return torch.as_tensor(dataset.with_format(None)[column], dtype=torch.long)


def read_bool_column(dataset: Any, column: str) -> torch.Tensor | None:
    """Return a boolean marker column (e.g. ``is_poison``) as a bool tensor, or None if it is absent.

    A ``bool`` column is read as it is; an integer column holding only 0 and 1 is read as booleans.

    Raises:
        ValueError: If the column exists but is neither (strings, floats, other integers), so that a
            marker column is never silently ignored.
    """
    import datasets

    if column not in dataset.column_names:
        return None
    feature = dataset.features.get(column)
    how = f"cast it with dataset.cast_column('{column}', datasets.Value('bool')), or rename it if it is not a marker"
    if isinstance(feature, datasets.Value) and feature.dtype == "bool":
        return torch.as_tensor(dataset.with_format(None)[column], dtype=torch.bool)
    integer = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    )
    if integer:
        values = torch.as_tensor(dataset.with_format(None)[column], dtype=torch.long)
        if bool(((values == 0) | (values == 1)).all()):
            return values.bool()
        raise ValueError(
            f"column '{column}' holds integers other than 0 and 1 (e.g. {int(values[(values != 0) & (values != 1)][0])}); "
            f"EPIC reads it as a True/False marker of poisoned rows: {how}."
        )
    raise ValueError(
        f"column '{column}' has type {feature}; EPIC reads it as a True/False marker of poisoned rows and needs "
        f"bool values: {how}."
    )


def check_labels_in_range(labels: torch.Tensor, num_labels: int) -> None:
    """Every label must be a class of the model.

    Raises:
        ValueError: Naming the offending label and the model's class count.
    """
    bad = (labels < 0) | (labels >= num_labels)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"row {first} has label {int(labels[first])} but the model has {num_labels} classes (0..{num_labels - 1}); "
            f"build the model with num_labels={int(labels.max()) + 1} or fix the labels."
        )


def check_enough_rows(labels: torch.Tensor, num_processes: int = 1) -> None:
    """Each class present needs at least 2 rows, and the set must cover every process.

    Raises:
        ValueError: If a class has a single row (it would always be isolated) or rows < processes.
    """
    if len(labels) < max(2, num_processes):
        raise ValueError(
            f"the training set has {len(labels)} rows; EPIC needs at least max(2, num_processes={num_processes}). "
            "Pass a larger dataset."
        )
    counts = torch.bincount(labels)
    single = torch.nonzero(counts == 1).flatten().tolist()
    if single:
        raise ValueError(
            f"class(es) {single} have a single training row, which EPIC would always drop as isolated; "
            "add examples of those classes or remove them from the training set."
        )


def check_model_logits(model: nn.Module, dataset: Any, num_labels: int | None, collate_fn: Any = None) -> int:
    """Run the model on two rows, collated as in training, and check it returns 2-D ``logits``.

    Args:
        model: The classifier.
        dataset: Rows as the model is fed (with their transform).
        num_labels: The class count the model declares (``config.num_labels``), or None to read it
            from the logits.
        collate_fn: The trainer's data collator (None: stack the model-input columns).

    Returns:
        The number of logits per row (the class count).

    Raises:
        ValueError: If the forward fails to produce such logits, or their width is not ``num_labels``.
    """
    from .embeddings import collate_rows, extract_logits

    items = dataset.__getitems__(list(range(min(2, len(dataset)))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(**collate_rows(items, model, collate_fn))
    finally:
        model.train(was_training)
    logits = extract_logits(output)
    if num_labels is not None and logits.shape[-1] != num_labels:
        raise ValueError(
            f"the model returns {logits.shape[-1]} logits per row but config.num_labels is {num_labels}; "
            "make them agree (build the model with the right num_labels)."
        )
    return int(logits.shape[-1])


def check_embedding_dataset(embedding_dataset: Any, train_dataset: Any, label_column: str) -> None:
    """The un-augmented view must hold the same rows, in the same order, as the training set.

    Raises:
        ValueError: If lengths or labels differ.
    """
    check_train_dataset(embedding_dataset, "epic_embedding_dataset")
    if len(embedding_dataset) != len(train_dataset):
        raise ValueError(
            f"epic_embedding_dataset has {len(embedding_dataset)} rows but train_dataset has {len(train_dataset)}; "
            "pass the same dataset with an un-augmented transform, e.g. train_ds.with_transform(eval_transform)."
        )
    column = find_label_column(embedding_dataset)
    if not torch.equal(read_labels(embedding_dataset, column), read_labels(train_dataset, label_column)):
        raise ValueError(
            "epic_embedding_dataset's labels differ from train_dataset's; it must be the same rows in the same "
            "order (only the transform may differ)."
        )
