"""Tests for the offline digits datasets (hf_epic.data)."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Image

from hf_epic.data import load_digits_dataset


@pytest.fixture(scope="module")
def hard():
    return load_digits_dataset("hard", seed=0, image_size=32)


def test_hard_schema_and_sizes(hard):
    assert set(hard) == {"train", "test"}
    for split in hard.values():
        assert isinstance(split.features["image"], Image)
        assert isinstance(split.features["label"], ClassLabel)
        assert split.features["label"].names == [str(i) for i in range(10)]
    # 3 renderings of each of the ~80% training sources, 2 of each test source
    assert hard["train"].num_rows == 3 * 1438
    assert hard["test"].num_rows == 2 * 359
    img = hard["train"][0]["image"]
    assert img.mode == "RGB" and img.size == (32, 32)
    assert sorted(set(hard["train"]["label"])) == list(range(10))


def test_hard_is_deterministic_and_seeded(hard):
    again = load_digits_dataset("hard", seed=0, image_size=32, renders_per_image=1, test_renders_per_image=1)
    other = load_digits_dataset("hard", seed=1, image_size=32, renders_per_image=1, test_renders_per_image=1)
    same = load_digits_dataset("hard", seed=0, image_size=32, renders_per_image=1, test_renders_per_image=1)
    a = np.asarray(again["test"][0]["image"])
    assert np.array_equal(a, np.asarray(same["test"][0]["image"]))
    assert not np.array_equal(a, np.asarray(other["test"][0]["image"]))


def test_hard_images_vary_in_colour_and_background(hard):
    arr = np.stack([np.asarray(hard["train"][i]["image"], dtype=np.float32) for i in range(64)])
    # colour: channels differ; backgrounds differ between images
    assert np.abs(arr[..., 0] - arr[..., 1]).mean() > 10
    corners = arr[:, 0, 0, :]
    assert corners.std(axis=0).mean() > 20


def test_plain_variant():
    plain = load_digits_dataset("plain", seed=0, image_size=16)
    assert plain["train"].num_rows == 1438 and plain["test"].num_rows == 359
    img = plain["train"][0]["image"]
    assert img.mode == "L" and img.size == (16, 16)


def test_plain_renders_keep_every_digit_and_add_jittered_copies():
    one = load_digits_dataset("plain", seed=0, image_size=16)["train"]
    three = load_digits_dataset("plain", seed=0, image_size=16, renders_per_image=3)
    assert three["train"].num_rows == 3 * one.num_rows
    assert three["test"].num_rows == 359  # the test split keeps one rendering
    originals = {np.asarray(img).tobytes(): label for img, label in zip(one["image"], one["label"])}
    rows = [(np.asarray(img), label) for img, label in zip(three["train"]["image"], three["train"]["label"])]
    kept = [label for img, label in rows if img.tobytes() in originals]
    # every digit appears once as it is (with its label), the two others are new jittered images
    assert len(kept) == one.num_rows
    assert sorted(kept) == sorted(one["label"])
    assert np.bincount(three["train"]["label"]).tolist() == (3 * np.bincount(one["label"])).tolist()
    # shuffled: the original rows are not one block at the start
    first = [rows[i][0].tobytes() in originals for i in range(one.num_rows)]
    assert 0.2 < np.mean(first) < 0.5
    # deterministic given the seed
    again = load_digits_dataset("plain", seed=0, image_size=16, renders_per_image=3)["train"]
    assert np.array_equal(np.asarray(again[5]["image"]), rows[5][0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "cifar"}, "variant"),
        ({"image_size": 4}, "image_size"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"renders_per_image": 0}, "renders_per_image"),
        ({"variant": "plain", "test_renders_per_image": 0}, "test_renders_per_image"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_dataset(**kwargs)
