"""Detection data: the built-in digit scenes, or a user's COCO-format set.

``scenes`` (or ``scenes:N`` for N training scenes, a fifth as many for validation) is
:mod:`pipeline.detection.scenes`. ``coco:PATH`` reads COCO annotations with pycocotools: either
``PATH/train/annotations.json`` and ``PATH/val/annotations.json``, or one
``PATH/annotations.json`` split 80/20 by image. Images are resized to the input shape and their
boxes with them; labels are the category ids in sorted order, from 1 (0 is the background).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import DataBundle, EpochShuffle, check_shape, loader
from ..errors import DataError
from .scenes import NUM_CLASSES, digit_scenes
from .task import collate

SCENES, COCO = "scenes", "coco:"
SPEC_FORMS = "'scenes' or 'scenes:N' (built-in digit scenes) or 'coco:PATH'"
DEFAULT_SCENES = 2000
VAL_FRACTION = 0.2


def load_detection_data(spec: str, input_shape: Sequence[int], *, batch_size: int = 16,
                        seed: int = 0, workers: int = 0, split_seed: int | None = None
                        ) -> DataBundle:
    """Train/val loaders of (images, targets) batches at ``input_shape`` (N, C, H, W)."""
    shape = check_shape(input_shape)
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    split = seed if split_seed is None else split_seed
    if spec == SCENES or spec.startswith(SCENES + ":"):
        count = _scene_count(spec)
        train, val = digit_scenes(shape, train=count, val=max(1, round(count * VAL_FRACTION)),
                                  split_seed=split)
        num_classes = NUM_CLASSES
    elif spec.startswith(COCO):
        train, val, num_classes = _coco(spec[len(COCO):], shape, split)
    else:
        raise DataError(f"unknown detection dataset {spec!r}: use {SPEC_FORMS}")
    return DataBundle(
        train=loader(train, batch_size, workers, EpochShuffle(len(train), seed), collate),
        val=loader(val, batch_size, workers, None, collate),
        num_classes=num_classes, name=spec)


def _scene_count(spec: str) -> int:
    if spec == SCENES:
        return DEFAULT_SCENES
    text = spec[len(SCENES) + 1:]
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"{spec!r}: give the number of training scenes, e.g. scenes:500")
    return int(text)


class CocoImages(Dataset):
    """Images of a COCO annotation file, resized to ``shape``, with their boxes and labels."""

    def __init__(self, coco: object, root: Path, ids: Sequence[int], labels: dict[int, int],
                 shape: tuple[int, int, int]):
        self.coco, self.root, self.ids, self.labels = coco, root, list(ids), labels
        self.channels, self.height, self.width = shape

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        info = self.coco.loadImgs(self.ids[index])[0]
        path = self.root / info["file_name"]
        if not path.is_file():
            path = self.root / "images" / info["file_name"]
        with Image.open(path) as img:
            width, height = img.size
            mode = "L" if self.channels == 1 else "RGB"
            image = pil_to_tensor(img.convert(mode).resize((self.width, self.height)))
        sx, sy = self.width / width, self.height / height
        boxes, labels = [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"], iscrowd=False)):
            x, y, w, h = ann["bbox"]
            if w * sx >= 1 and h * sy >= 1:
                boxes.append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
                labels.append(self.labels[ann["category_id"]])
        return image.float() / 255.0, {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _coco(path_text: str, shape: tuple[int, int, int], split_seed: int
          ) -> tuple[Dataset, Dataset, int]:
    layout = ("expected PATH/annotations.json (split 80/20 here), or PATH/train/annotations.json "
              "and PATH/val/annotations.json, with the images beside them or under images/")
    if not path_text:
        raise DataError(f"'{COCO}' needs a folder: {COCO}PATH; {layout}")
    root = Path(path_text).expanduser()
    if (root / "train" / "annotations.json").is_file():
        parts = [(root / name, _read_coco(root / name / "annotations.json", layout))
                 for name in ("train", "val")]
        categories = sorted(set(parts[0][1].getCatIds()) | set(parts[1][1].getCatIds()))
        labels = {c: i + 1 for i, c in enumerate(categories)}
        train, val = (CocoImages(coco, folder, sorted(coco.getImgIds()), labels, shape)
                      for folder, coco in parts)
        return train, val, len(categories) + 1
    coco = _read_coco(root / "annotations.json", layout)
    ids = np.random.default_rng(split_seed).permutation(sorted(coco.getImgIds())).tolist()
    cut = len(ids) - max(1, round(len(ids) * VAL_FRACTION))
    if cut < 1:
        raise DataError(f"{root / 'annotations.json'} lists {len(ids)} image(s); a train/val "
                        "split needs at least two")
    labels = {c: i + 1 for i, c in enumerate(sorted(coco.getCatIds()))}
    return (CocoImages(coco, root, sorted(ids[:cut]), labels, shape),
            CocoImages(coco, root, sorted(ids[cut:]), labels, shape), len(labels) + 1)


def _read_coco(path: Path, layout: str) -> object:
    if not path.is_file():
        raise DataError(f"no COCO annotations at {path}; {layout}")
    from pycocotools.coco import COCO as CocoApi

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            return CocoApi(str(path))
    except Exception as exc:  # json errors, missing keys: the file is not COCO-format
        raise DataError(f"{path} is not a COCO annotation file ({exc}); {layout}") from exc
