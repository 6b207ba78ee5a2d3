"""The deployable part of a torchvision one-stage detector: image tensor in, raw head outputs out.

What ships to TensorRT is backbone, extra layers and heads; anchor decoding and NMS run after
the engine (or in TensorRT's NMS plugin). :class:`DetectorCore` is that part as a module of its
own, sharing its parameters with the detector, so everything HALP does to a classifier (analyze,
table, knapsack, masks, slimming, export) applies to it unchanged, while the user trains the
whole detector with its own losses. Its input is the image after the detector's transform
(normalised, at the transform's size).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import detection

from ..errors import ModelLoadError

#: torchvision's one-stage detectors: forward is backbone -> head, post-processing after
ONE_STAGE = (detection.ssd.SSD, detection.retinanet.RetinaNet, detection.fcos.FCOS)
TWO_STAGE = (detection.generalized_rcnn.GeneralizedRCNN,)


class DetectorCore(nn.Module):
    """``detector.backbone`` then the head's convolutions, returning the head's raw maps per
    feature level, level by level: SSD and RetinaNet ``(box regression, class logits)``, FCOS
    ``(box regression, centre-ness, class logits)``, each N x (anchors * values) x H x W.

    The head's own forward also reshapes and concatenates the maps over levels; that is
    post-processing (decoding runs after the engine), and tracing it makes Torch-Pruning
    follow every anchor through the reshapes (minutes for SSDlite, against a second).
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        check_one_stage(detector)
        self.backbone = detector.backbone
        self.head = detector.head
        self.per_level = isinstance(detector, detection.ssd.SSD)  # SSD: a head per level
        self.centreness = isinstance(detector, detection.fcos.FCOS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(x)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return tuple(m for level, f in enumerate(features.values())
                     for m in self._maps(level, f))

    def _maps(self, level: int, f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls, reg = self.head.classification_head, self.head.regression_head
        if self.per_level:
            return reg.module_list[level](f), cls.module_list[level](f)
        logits = cls.cls_logits(cls.conv(f))
        boxes = reg.conv(f)
        if self.centreness:  # FCOS's regression is non-negative distances
            return F.relu(reg.bbox_reg(boxes)), reg.bbox_ctrness(boxes), logits
        return reg.bbox_reg(boxes), logits


def check_one_stage(model: nn.Module) -> None:
    """Refuse, saying what ``model`` is, anything but a one-stage detector."""
    if not isinstance(model, ONE_STAGE):
        raise ModelLoadError(_unsupported(model))


def is_detector(model: nn.Module) -> bool:
    return isinstance(model, ONE_STAGE + TWO_STAGE)


def deployable(model: nn.Module) -> nn.Module:
    """The network HALP prunes: a detector's :class:`DetectorCore`, any other model itself."""
    return DetectorCore(model) if is_detector(model) else model


def with_core(detector: nn.Module, core: DetectorCore) -> nn.Module:
    """A copy of ``detector`` running ``core``'s (say, slimmed) backbone and head, so the
    pruned network is evaluated with the detector's own post-processing."""
    pruned = copy.deepcopy(detector)
    pruned.backbone, pruned.head = core.backbone, core.head
    return pruned


def input_size(detector: nn.Module) -> tuple[int, int] | None:
    """The (height, width) the detector's transform resizes square images to, when fixed."""
    transform = getattr(detector, "transform", None)
    sizes = getattr(transform, "min_size", None)
    top = getattr(transform, "max_size", None)
    if not sizes or len(sizes) != 1 or sizes[0] != top:
        return None
    return int(top), int(top)


def _unsupported(model: nn.Module) -> str:
    name = type(model).__name__
    if isinstance(model, TWO_STAGE):
        return (f"{name} is a two-stage detector: its region proposals and RoI heads depend on "
                "the image, so HALP prunes its backbone only; pass a module:callable that "
                "returns model.backbone")
    return f"{name} is not one of torchvision's one-stage detectors (SSD, RetinaNet, FCOS)"
