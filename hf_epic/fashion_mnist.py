"""Fashion-MNIST: 70,000 real 28x28 grayscale photos of clothing, 10 classes, read without the Hub.

Zalando's Fashion-MNIST (60,000 training and 10,000 test images, 6,000 / 1,000 per class) ships in
the IDX format. :func:`load_fashion_mnist` looks for it in three places, in this order:

1. ``data_dir``: a folder with the four IDX files (gzipped or not), e.g. a copy of the Debian files
   or the files from the data set's own repository;
2. ``/usr/share/datasets/fashion-mnist/``, where Debian's package ``dataset-fashion-mnist`` puts them
   (``apt-get install dataset-fashion-mnist``; ``make install`` installs it when it can);
3. the Hugging Face Hub, ``zalando-datasets/fashion_mnist`` (needs the internet).

Every source gives the same ``DatasetDict``: ``train`` and ``test`` splits with an ``image`` column
(``datasets.Image``, 28x28 mode ``"L"``) and a ``label`` column (``ClassLabel`` with the ten class
names), in the files' row order.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HUB_ID = "zalando-datasets/fashion_mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers: 0x00000803 (uint8, 3 dims) for images, 0x00000801 (uint8, 1 dim) for labels.
_MAGIC = {3: 2051, 1: 2049}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one uint8 IDX file (gzipped or not) into a numpy array of its stored shape.

    Args:
        path: The file.

    Raises:
        ValueError: when the header is not a uint8 IDX header or the payload is short.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (bad header); use the data set's IDX files.")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(
            f"{path} holds {len(data) - header} bytes of data for shape {shape} ({expected} expected): "
            "the file is truncated or not an IDX file; copy it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``folder``, gzipped or not (None when absent)."""
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_files(folder: Path) -> bool:
    """True when ``folder`` holds all four IDX files."""
    return all(_find(folder, stem) is not None for pair in _FILES.values() for stem in pair)


def features() -> Features:
    """The schema of every split: ``image`` (``datasets.Image``) and a 10-class ``label``."""
    return Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})


def arrays_from_idx(folder: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images uint8 [n, 28, 28], labels int64 [n])}`` read from the four IDX files in ``folder``."""
    folder = Path(folder)
    out = {}
    for split, (image_stem, label_stem) in _FILES.items():
        images = read_idx(_find(folder, image_stem))
        labels = read_idx(_find(folder, label_stem)).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{folder}: {split} images have shape {images.shape} and labels {labels.shape}; "
                "expected [n, 28, 28] and [n]. Use the data set's own IDX files."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
            raise ValueError(f"{folder}: {split} labels lie outside 0-9; use the data set's own IDX files.")
        out[split] = (images, labels)
    return out


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    """A ``datasets.Dataset`` of PIL grayscale images and labels."""
    pils = [PILImage.fromarray(a, mode="L") for a in images]
    return Dataset.from_dict({"image": pils, "label": labels.tolist()}, features=features())


def fashion_mnist_source(data_dir: str | os.PathLike | None = None) -> str:
    """Where :func:`load_fashion_mnist` reads from: a folder's path, or the Hub id.

    Raises:
        FileNotFoundError: when ``data_dir`` is given but lacks the files.
    """
    if data_dir is not None:
        if not _has_files(Path(data_dir)):
            raise FileNotFoundError(
                f"--data_dir {data_dir} does not hold the four Fashion-MNIST IDX files "
                f"({', '.join(s for pair in _FILES.values() for s in pair)}, optionally .gz). Point it at "
                f"a folder that does, or leave it unset to use {DEBIAN_DIR} or the Hub ({HUB_ID})."
            )
        return str(data_dir)
    if _has_files(DEBIAN_DIR):
        return str(DEBIAN_DIR)
    return HUB_ID


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> DatasetDict:
    """Load Fashion-MNIST as a ``DatasetDict`` with ``train`` (60,000) and ``test`` (10,000) rows.

    Args:
        data_dir: A folder with the four IDX files. None: Debian's folder, else the Hub.

    Raises:
        FileNotFoundError: when no source works; the message names all three ways to get the data.
    """
    source = fashion_mnist_source(data_dir)
    if source != HUB_ID:
        return DatasetDict({split: _to_dataset(*pair) for split, pair in arrays_from_idx(source).items()})
    try:
        import datasets

        loaded = datasets.load_dataset(HUB_ID)
    except Exception as err:  # offline, or the Hub refused: say every way to get the data
        raise FileNotFoundError(
            "Fashion-MNIST is not available: no --data_dir was given, "
            f"{DEBIAN_DIR} does not hold the IDX files, and the Hub ({HUB_ID}) could not be reached "
            f"({type(err).__name__}: {err}). Fix it one of three ways: pass --data_dir with a folder of "
            "the four IDX files; install Debian's package (apt-get install dataset-fashion-mnist, or "
            "make install as root); or connect to the internet for the Hub."
        ) from err
    return DatasetDict(
        {split: loaded[split].cast(features()) for split in ("train", "test")}
    )
