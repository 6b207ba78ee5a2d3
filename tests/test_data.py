"""Built-in digits and ImageFolder loading: shapes, determinism, split, and every error path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import load_data
from pipeline.errors import DataError


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", (1, 3, 16, 16), batch_size=32, seed=0)


def _labels(dataset) -> list[int]:
    return [int(dataset.labels[i]) for i in dataset.indices]


def test_digits_shapes_and_classes(digits):
    images, labels = next(iter(digits.train))
    assert images.shape == (32, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() <= 9
    assert torch.equal(images[:, 0], images[:, 2])  # grey replicated to every channel
    assert digits.num_classes == 10 and digits.name == "digits"
    val_images, _ = next(iter(digits.val))
    assert val_images.shape == (32, 3, 16, 16)
    assert len(digits.train.dataset) + len(digits.val.dataset) == 1797


def test_digits_grayscale_non_square():
    bundle = load_data("digits", (2, 1, 12, 20), batch_size=8)
    assert next(iter(bundle.train))[0].shape == (8, 1, 12, 20)
    assert next(iter(bundle.val))[0].shape == (8, 1, 12, 20)


def test_digits_normalised_with_train_statistics(digits):
    images = torch.cat([x for x, _ in digits.train])
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1


def test_split_is_disjoint_complete_and_stratified(digits):
    train_idx, val_idx = set(digits.train.dataset.indices), set(digits.val.dataset.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == 1797
    train_counts = Counter(_labels(digits.train.dataset))
    val_counts = Counter(int(y) for _, y in digits.val.dataset)
    for label in range(10):
        share = val_counts[label] / (val_counts[label] + train_counts[label])
        assert 0.18 < share < 0.22


def test_same_seed_same_batches_new_epoch_new_order(digits):
    once, again = (load_data("digits", (1, 3, 16, 16), batch_size=32, seed=0) for _ in "12")
    first, repeat = next(iter(once.train)), next(iter(again.train))
    assert torch.equal(first[0], repeat[0]) and torch.equal(first[1], repeat[1])
    assert torch.equal(next(iter(once.val))[0], next(iter(again.val))[0])
    assert not torch.equal(next(iter(again.train))[0], repeat[0])  # second pass reshuffles
    other = load_data("digits", (1, 3, 16, 16), batch_size=32, seed=1)
    assert set(other.val.dataset.indices) != set(digits.val.dataset.indices)


def test_set_epoch_replays_an_epoch(digits):
    sampler = digits.train.sampler
    sampler.set_epoch(3)
    first = next(iter(digits.train))[0]
    sampler.set_epoch(3)
    assert torch.equal(first, next(iter(digits.train))[0])


def _write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def _image_folder(root: Path, train=("cat", "dog"), val=("cat", "dog"), count=3) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for k, name in enumerate(classes):
            _write_images(root / split / name, count, seed=k)
    return root


def test_imagefolder_loads_resized_normalised_batches(tmp_path):
    bundle = load_data(f"imagefolder:{_image_folder(tmp_path)}", (1, 3, 8, 8), batch_size=4)
    images, labels = next(iter(bundle.train))
    assert images.shape == (4, 3, 8, 8) and set(labels.tolist()) <= {0, 1}
    assert bundle.num_classes == 2 and bundle.name == f"imagefolder:{tmp_path}"
    assert sum(len(y) for _, y in bundle.val) == 6
    grey = load_data(f"imagefolder:{tmp_path}", (1, 1, 8, 8), batch_size=2)
    assert next(iter(grey.val))[0].shape == (2, 1, 8, 8)


def _no_root(tmp_path: Path) -> Path:
    return tmp_path / "absent"


def _no_val(tmp_path: Path) -> Path:
    _write_images(tmp_path / "train" / "cat", 2, 0)
    return tmp_path


def _no_train(tmp_path: Path) -> Path:
    _write_images(tmp_path / "val" / "cat", 2, 0)
    return tmp_path


def _empty_class(tmp_path: Path) -> Path:
    _image_folder(tmp_path)
    (tmp_path / "val" / "bird").mkdir()
    (tmp_path / "train" / "bird").mkdir()
    return tmp_path


def _no_classes(tmp_path: Path) -> Path:
    _write_images(tmp_path / "train" / "cat", 2, 0)
    (tmp_path / "val").mkdir()
    return tmp_path


def _mismatch(tmp_path: Path) -> Path:
    return _image_folder(tmp_path, train=("cat", "dog"), val=("cat", "emu"))


@pytest.mark.parametrize(("make", "message"), [
    (_no_root, "does not exist"),
    (_no_val, "no 'val' sub-folder"),
    (_no_train, "no 'train' sub-folder"),
    (_empty_class, "no images in"),
    (_no_classes, "no images in"),
    (_mismatch, r"only in train: \['dog'\]; only in val: \['emu'\]"),
])
def test_imagefolder_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_data(f"imagefolder:{make(tmp_path)}", (1, 3, 8, 8))


@pytest.mark.parametrize(("spec", "shape", "message"), [
    ("cifar10", (1, 3, 8, 8), "unknown dataset 'cifar10'.*imagefolder:PATH"),
    ("imagefolder:", (1, 3, 8, 8), "needs a folder"),
    ("digits", (1, 3, 32), "not N x C x H x W"),
    ("digits", (1, 3, 0, 8), "not N x C x H x W"),
    ("digits", (1, 4, 8, 8), "4 channels"),
])
def test_bad_spec_or_shape(spec, shape, message):
    with pytest.raises(DataError, match=message):
        load_data(spec, shape)
