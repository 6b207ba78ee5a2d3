"""Datasets for training and fine-tuning: the built-in digits and a user's ImageFolder.

The built-in set is scikit-learn's bundled handwritten digits (1,797 scanned 8x8 images, 10
classes), so `halp demo` runs on real images with no download. Images are resized once, up front,
and kept as tensors: per-batch resizing would cost more than the small networks we train on them.

Shuffling (and the digits' random shifts) come from a sampler seeded by ``(seed, epoch)``: the
order is reproducible, independent of the worker count, and the same after a resume
(:func:`pipeline.train.fit` calls ``set_epoch`` like it would on a ``DistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from .errors import DataError

IMAGEFOLDER = "imagefolder:"
SPEC_FORMS = "'digits' (built-in, no download) or 'imagefolder:PATH' (PATH/train and PATH/val)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class DataBundle:
    train: DataLoader
    val: DataLoader
    num_classes: int
    name: str


def load_data(spec: str, input_shape: Sequence[int], *, batch_size: int = 64, seed: int = 0,
              workers: int = 0, split_seed: int | None = None) -> DataBundle:
    """Train/val loaders for ``spec`` whose images match ``input_shape`` (N, C, H, W).

    ``seed`` orders and augments the training batches; ``split_seed`` (default: ``seed``)
    draws the digits' train/val split, held fixed where runs with several seeds must share
    one validation set (a baseline trained on one split must not see another's val images)."""
    channels, height, width = check_shape(input_shape)
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if spec == "digits":
        train, val, num_classes = _digits(channels, height, width,
                                          seed if split_seed is None else split_seed)
    elif spec.startswith(IMAGEFOLDER):
        train, val, num_classes = _imagefolder(spec[len(IMAGEFOLDER):], channels, height, width)
    elif spec.split(":")[0] in ("scenes", "coco"):
        raise DataError(f"{spec!r} is detection data: prune a detector with --task detection, "
                        f"or give a classification dataset: {SPEC_FORMS}")
    else:
        raise DataError(f"unknown dataset {spec!r}: use {SPEC_FORMS}")
    return DataBundle(
        train=loader(train, batch_size, workers, sampler=_sampler_for(train, seed)),
        val=loader(val, batch_size, workers, sampler=None),
        num_classes=num_classes,
        name=spec,
    )


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 4 or any(int(d) < 1 for d in shape):
        raise DataError(f"input shape {tuple(shape)} is not N x C x H x W with positive sizes; "
                        "give an image shape such as 1x3x32x32")
    _, channels, height, width = (int(d) for d in shape)
    if channels not in (1, 3):
        raise DataError(f"input shape {tuple(shape)} has {channels} channels; image datasets "
                        "provide 1 (grayscale) or 3 (RGB)")
    return channels, height, width


class EpochShuffle(Sampler[int]):
    """A permutation drawn from ``(seed, epoch)``; advances one epoch per pass unless set."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        return self._draw(generator)

    def _draw(self, generator: torch.Generator) -> Iterator:
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ShiftShuffle(EpochShuffle):
    """Also draws a random (dy, dx) shift per sample, so augmentation is seeded like the order."""

    def __init__(self, size: int, seed: int, max_shift: int):
        super().__init__(size, seed)
        self.max_shift = max_shift

    def _draw(self, generator: torch.Generator) -> Iterator:
        order = torch.randperm(self.size, generator=generator)
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (self.size, 2),
                               generator=generator)
        return iter(map(tuple, torch.column_stack([order, shifts]).tolist()))


class ShiftedImages(Dataset):
    """Training images with a small random translation, cropped from a once-padded copy.

    Indexed by ``(i, dy, dx)`` from :class:`ShiftShuffle`. ``indices`` are the positions of these
    samples in the full dataset (so a test can check the split).
    """

    def __init__(self, padded: torch.Tensor, labels: torch.Tensor, indices: Sequence[int],
                 shape: tuple[int, int, int], pad: int):
        self.padded = padded
        self.labels = labels
        self.indices = list(indices)
        self.shape = shape
        self.pad = pad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, dy, dx = key
        channels, height, width = self.shape
        top, left = self.pad + dy, self.pad + dx
        image = self.padded[self.indices[i], :, top:top + height, left:left + width]
        return image.expand(channels, height, width), self.labels[self.indices[i]]


def digit_scans(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """The bundled digits: N x 8 x 8 scans in [0, 1], labels, and train / val indices of a
    stratified 80/20 split drawn from ``seed`` (the classifier's and the scenes' split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    scans = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(range(len(labels)), test_size=VAL_FRACTION,
                                          random_state=seed, stratify=labels.numpy())
    return scans, labels, train_idx, val_idx


def _digits(channels: int, height: int, width: int, seed: int) -> tuple[Dataset, Dataset, int]:
    """Digits scaled to [0, 1], resized, normalised with train statistics, split 80/20."""
    scans, labels, train_idx, val_idx = digit_scans(seed)
    images = F.interpolate(scans.unsqueeze(1), size=(height, width), mode="bilinear",
                           align_corners=False, antialias=True)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    pad = max(1, round(min(height, width) / 16))  # about half a source pixel
    padded = F.pad(images, (pad, pad, pad, pad), value=float(-mean / std))
    train = ShiftedImages(padded, labels, train_idx, (channels, height, width), pad)
    centred = padded[:, :, pad:pad + height, pad:pad + width]  # a view: one copy in memory
    full = TensorDataset(centred.expand(-1, channels, -1, -1), labels)
    return train, Subset(full, list(val_idx)), 10


def _imagefolder(path_text: str, channels: int, height: int,
                 width: int) -> tuple[Dataset, Dataset, int]:
    from torchvision import transforms

    if not path_text:
        raise DataError(f"'{IMAGEFOLDER}' needs a folder: {IMAGEFOLDER}PATH with PATH/train and "
                        "PATH/val holding one sub-folder of images per class")
    root = Path(path_text).expanduser()
    steps = [transforms.Resize((height, width))]
    if channels == 1:
        steps += [transforms.Grayscale(1), transforms.ToTensor(),
                  transforms.Normalize([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])]
    else:
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    transform = transforms.Compose(steps)
    train, val = (_split(root, name, transform) for name in ("train", "val"))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"class folders differ between {root / 'train'} and {root / 'val'} "
                        f"(only in train: {only_train or '-'}; only in val: {only_val or '-'}); "
                        "both splits need the same class sub-folders")
    return train, val, len(train.classes)


def _split(root: Path, name: str, transform: object) -> Dataset:
    """One ImageFolder split, with a message that says how the folder should look."""
    from torchvision.datasets import ImageFolder

    layout = f"expected {root}/{name}/<class>/<image files>"
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; {layout}")
    if not (root / name).is_dir():
        raise DataError(f"dataset folder {root} has no '{name}' sub-folder; {layout}")
    try:
        return ImageFolder(str(root / name), transform=transform)
    except FileNotFoundError as exc:
        raise DataError(f"no images in {root / name} ({exc}); {layout}") from exc


def _sampler_for(dataset: Dataset, seed: int) -> EpochShuffle:
    if isinstance(dataset, ShiftedImages):
        return ShiftShuffle(len(dataset), seed, dataset.pad)
    return EpochShuffle(len(dataset), seed)


def loader(dataset: Dataset, batch_size: int, workers: int, sampler: EpochShuffle | None,
           collate_fn: Callable | None = None) -> DataLoader:
    """Batches of ``dataset``: shuffled by ``sampler`` for training, in order without one."""
    # Dropping a ragged last training batch avoids a batch of one, which BatchNorm rejects.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=sampler is not None and len(dataset) > batch_size,
                      pin_memory=torch.cuda.is_available(), collate_fn=collate_fn)
