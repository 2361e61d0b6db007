"""Fashion-MNIST loading from IDX files: Debian's folder, a --data_dir copy, and the error with no source."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from hf_epic import fashion_mnist as fm

needs_debian = pytest.mark.skipif(
    not fm._has_files(fm.DEBIAN_DIR),
    reason=f"{fm.DEBIAN_DIR} is missing: `make install` installs Debian's dataset-fashion-mnist as root",
)


@needs_debian
def test_debian_files_and_data_dir_copy_give_the_same_arrays(tmp_path):
    debian = fm.arrays_from_idx(fm.DEBIAN_DIR)
    assert debian["train"][0].shape == (60000, 28, 28) and debian["test"][0].shape == (10000, 28, 28)
    assert np.bincount(debian["train"][1]).tolist() == [6000] * 10
    # a copy with the files un-gzipped reads the same
    for path in fm.DEBIAN_DIR.glob("*.gz"):
        with gzip.open(path, "rb") as src, open(tmp_path / path.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert fm.fashion_mnist_source(tmp_path) == str(tmp_path)
    dd = fm.load_fashion_mnist(data_dir=tmp_path)
    assert {k: len(v) for k, v in dd.items()} == {"train": 60000, "test": 10000}
    assert dd["train"].features["label"].names == fm.FASHION_MNIST_CLASSES
    for split in ("train", "test"):
        images, labels = debian[split]
        for i in (0, 1, len(labels) - 1):
            row = dd[split][i]
            assert row["image"].mode == "L" and row["image"].size == (28, 28)
            assert np.array_equal(np.asarray(row["image"]), images[i])
            assert row["label"] == labels[i]


def test_no_source_names_all_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "absent")
    # the Hub refuses at once, as it does offline (instead of waiting for a network time-out)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as err:
        fm.load_fashion_mnist()
    message = str(err.value)
    for way in ("--data_dir", "dataset-fashion-mnist", fm.HUB_ID):
        assert way in message


def test_data_dir_without_the_files_is_refused(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="does not hold the four Fashion-MNIST IDX files"):
        fm.load_fashion_mnist(data_dir=tmp_path)


def test_truncated_idx_file_is_named(tmp_path):
    header = bytes([0, 0, 8, 3]) + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(header + bytes(28 * 28 * 2))  # three images announced, two written
    with pytest.raises(ValueError, match="truncated"):
        fm.read_idx(path)
    path.write_bytes(b"PK\x03\x04" + bytes(10))
    with pytest.raises(ValueError, match="not a uint8 IDX file"):
        fm.read_idx(path)
    good = header + bytes(range(256)) * 9 + bytes(28 * 28 * 3 - 256 * 9)
    path.write_bytes(good)
    assert fm.read_idx(path).shape == (3, 28, 28)
