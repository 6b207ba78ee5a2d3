"""Detection scenes composed from the bundled digit scans: real handwriting, synthetic layout.

A detector needs boxes, and no detection set ships with the project's dependencies. Each scene
places 1-5 of scikit-learn's real 8x8 digit scans on a dark, noisy canvas at random positions
and sizes; the boxes and labels come from the placement (the box is the ink's extent, not the
scan's margin). Scenes are drawn from a per-scene seed when read, so a set of any size costs no
memory, is the same on every machine, and train and val scenes use disjoint scans.

These are not photographs: a detector that does well here has learnt to find strokes on a
plain background, which says how pruning changes a detector, not how it does on a user's data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from ..data import digit_scans
from ..errors import DataError

#: digit d has label d + 1: torchvision's detectors keep label 0 for the background
NUM_CLASSES = 11
#: a digit's side as a fraction of the canvas's shorter side
SCALES = (0.12, 0.32)
DIGITS_PER_SCENE = (1, 5)
#: a new digit is redrawn while its box overlaps a placed one by more than this IoU
MAX_OVERLAP = 0.2
#: ink threshold (scans are 0..1 after scaling) for the tight box
INK = 0.2
NOISE = 0.04


class DigitScenes(Dataset):
    """``count`` scenes of ``channels`` x ``height`` x ``width`` drawn from ``scans`` (N x 8 x 8
    in [0, 1]) and their ``labels``; item i is (image in [0, 1], {"boxes": xyxy float tensor,
    "labels": int64 tensor}) and depends only on (seed, i)."""

    def __init__(self, scans: torch.Tensor, labels: torch.Tensor, count: int, *, seed: int,
                 shape: Sequence[int]):
        if count < 1:
            raise DataError(f"a scene set needs at least one scene, got {count}")
        self.scans, self.labels, self.count, self.seed = scans, labels, count, seed
        self.channels, self.height, self.width = (int(d) for d in shape)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        canvas = torch.as_tensor(rng.normal(0.0, NOISE, (self.height, self.width)),
                                 dtype=torch.float32).clamp_(0.0, 1.0)
        boxes: list[list[float]] = []
        labels: list[int] = []
        short = min(self.height, self.width)
        for _ in range(int(rng.integers(DIGITS_PER_SCENE[0], DIGITS_PER_SCENE[1] + 1))):
            scan = int(rng.integers(len(self.scans)))
            side = max(8, round(rng.uniform(*SCALES) * short))
            placed = self._place(rng, side, boxes)
            if placed is None:
                continue
            top, left = placed
            patch = F.interpolate(self.scans[scan][None, None], size=(side, side),
                                  mode="bilinear", align_corners=False, antialias=True)[0, 0]
            box = _ink_box(patch, top, left)
            if box is None:
                continue
            region = canvas[top:top + side, left:left + side]
            torch.maximum(region, patch.clamp(0.0, 1.0), out=region)
            boxes.append(box)
            labels.append(int(self.labels[scan]) + 1)
        image = canvas.expand(self.channels, -1, -1).contiguous()
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64)}
        return image, target

    def _place(self, rng: np.random.Generator, side: int,
               boxes: list[list[float]]) -> tuple[int, int] | None:
        """A free (top, left) for a side x side patch, or None after a few tries."""
        for _ in range(20):
            top = int(rng.integers(0, self.height - side + 1))
            left = int(rng.integers(0, self.width - side + 1))
            square = torch.tensor([[left, top, left + side, top + side]], dtype=torch.float32)
            if not boxes or box_iou(square, torch.tensor(boxes)).max() <= MAX_OVERLAP:
                return top, left
        return None


def _ink_box(patch: torch.Tensor, top: int, left: int) -> list[float] | None:
    """The xyxy box of the patch's ink in canvas coordinates (None for a blank scan)."""
    rows = torch.nonzero(patch.amax(1) > INK).flatten()
    cols = torch.nonzero(patch.amax(0) > INK).flatten()
    if rows.numel() == 0 or cols.numel() == 0:
        return None
    return [float(left + cols[0]), float(top + rows[0]), float(left + cols[-1] + 1),
            float(top + rows[-1] + 1)]


def digit_scenes(shape: Sequence[int], *, train: int, val: int, split_seed: int = 0
                 ) -> tuple[DigitScenes, DigitScenes]:
    """Train and val scene sets whose scans come from disjoint 80/20 splits of the digits."""
    scans, labels, train_idx, val_idx = digit_scans(split_seed)
    return (DigitScenes(scans[train_idx], labels[train_idx], train, seed=2 * split_seed,
                        shape=shape),
            DigitScenes(scans[val_idx], labels[val_idx], val, seed=2 * split_seed + 1,
                        shape=shape))
