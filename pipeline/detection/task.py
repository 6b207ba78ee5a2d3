"""Detection as a training task: torchvision's own losses, mAP from torchmetrics (pycocotools).

A batch is (images, targets): a stacked image tensor in [0, 1] and one ``{"boxes", "labels"}``
dict per image. The detector normalises and resizes internally, so the same batches train the
whole detector and evaluate it with its post-processing, dense or pruned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import HalpError


class Detection:
    """The sum of the detector's loss dict; scored by COCO mAP in percent: ``map50``
    (IoU 0.5, the headline) and ``map`` (IoU 0.5:0.95)."""

    metric = "map50"

    def loss(self, model: nn.Module, batch: Any, device: torch.device
             ) -> tuple[torch.Tensor, int]:
        images, targets = batch
        losses = model(list(images.to(device, non_blocking=True)), _to(targets, device))
        return sum(losses.values()), len(targets)

    def scores(self, model: nn.Module, loader: Iterable, device: torch.device
               ) -> dict[str, float]:
        return mean_ap(model, loader, device)


DETECTION = Detection()


def mean_ap(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu"
            ) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@[.5:.95] in percent over ``loader``, in eval mode (restored)."""
    from torchmetrics.detection import MeanAveragePrecision

    device = torch.device(device)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.warn_on_many_detections = False  # COCO's rule: each image's 100 best count
    was_training = model.training
    model.to(device).eval()
    seen = 0
    try:
        with torch.no_grad():
            for images, targets in loader:
                detections = model(list(images.to(device, non_blocking=True)))
                metric.update(_to(detections, "cpu"), _to(targets, "cpu"))
                seen += len(targets)
    finally:
        model.train(was_training)
    if seen == 0:
        raise HalpError("the validation loader yields no images; add images to the val split")
    result = metric.compute()
    return {"map50": 100.0 * float(result["map_50"]), "map": 100.0 * float(result["map"])}


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]
            ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack the (equal-sized) images; keep the targets as a list."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images), list(targets)


def _to(targets: Iterable[dict[str, torch.Tensor]], device: str | torch.device
        ) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]
