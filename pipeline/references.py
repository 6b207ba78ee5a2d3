"""The calibration's reference networks: the dense model and copies slimmed to half and a
quarter of every sizable group's width (:mod:`pipeline.calibration` fits the table on them).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .calibration import REFERENCES, scaled_counts
from .errors import StructureError
from .slim import slim
from .spec import NetworkSpec

log = logging.getLogger(__name__)


def references(model: nn.Module, example_input: torch.Tensor, spec: NetworkSpec,
               step: int = 8) -> list[tuple[str, dict[int, int], nn.Module]]:
    """The networks to calibrate on: ("dense", counts, model) and, where the model can be
    slimmed, copies with every sizable group at half and at a quarter of its width."""
    refs = [("dense", spec.dense_counts(), model)]
    for name, fraction in REFERENCES.items():
        counts = scaled_counts(spec, fraction, step)
        keep = {g: c for g, c in counts.items() if c < spec.group(g).channels}
        if not keep:
            continue
        try:
            refs.append((name, {**spec.dense_counts(), **counts},
                         slim(model, example_input, keep, spec=spec)))
        except StructureError as exc:
            log.warning("no %s-width calibration reference (%s)", name, exc)
    return refs
