"""A table build planned on a workstation and measured on a device that has no torch.

``halp lut plan`` writes the job: the network spec, every (signature, cin, cout) point with the
geometry that regenerates its layer graph (:mod:`pipeline.onnx_layers`, numpy and onnx only),
the build settings and protocol, and the calibration's reference networks exported to ONNX
beside it (``<job>.refs/``). ``python -m pipeline.device`` measures it on the device
(:mod:`pipeline.device`), whole or as one shard of several, and ``halp lut merge`` joins the
shards. A Jetson then needs numpy, onnx and its TensorRT, not NVIDIA's torch wheels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LutError
from ..fsio import atomic_write_json
from ..spec import NetworkSpec
from .grid import PROTOCOL, LutEntry
from .measure import Settings

FORMAT = "halp-lut-job"
VERSION = 1


@dataclass(frozen=True)
class JobReference:
    """A calibration reference network: its group counts and its ONNX file (relative to the
    job file), with the name and shape of its one input."""

    name: str
    counts: dict[int, int]
    onnx: str
    input_name: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "counts": {str(g): c for g, c in self.counts.items()},
                "onnx": self.onnx, "input_name": self.input_name}


@dataclass(frozen=True)
class Job:
    """What to measure: the points of ``entries`` for ``spec``, under ``settings``."""

    model: str
    spec: NetworkSpec
    settings: Settings
    entries: dict[str, LutEntry]
    references: list[JobReference]

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "format": FORMAT, "version": VERSION, "model": self.model,
            "spec": self.spec.to_dict(),
            "settings": {"step": s.step, "max_points": s.max_points, "seed": s.seed,
                         "passes": s.passes, "protocol": s.protocol},
            "entries": {sig: {"layer_example": e.layer_example, "layers": e.layers,
                              "points": sorted([ci, co] for ci, co in e.points)}
                        for sig, e in self.entries.items()},
            "references": [r.to_dict() for r in self.references],
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Job:
        """The job at ``path``; LutError when it is not one, or was planned for a protocol
        this installation does not measure."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise LutError(f"cannot read the table job {path}: {exc}; plan one with "
                           "`halp lut plan`") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LutError(f"{path} is not a table job (format {FORMAT!r}); plan one with "
                           "`halp lut plan`")
        if data.get("version") != VERSION:
            raise LutError(f"{path} is a version {data.get('version')} job; this installation "
                           f"reads version {VERSION}: plan it again with this version's "
                           "`halp lut plan`")
        found = data["settings"]["protocol"]["name"]
        if found != PROTOCOL:
            raise LutError(f"{path} was planned for protocol {found!r}, this installation "
                           f"measures {PROTOCOL!r}: install the same halp-pipeline version on "
                           "the workstation and the device, and plan again")
        s = data["settings"]
        settings = Settings(int(s["step"]), s["max_points"], int(s["seed"]), int(s["passes"]),
                            dict(s["protocol"]))
        entries = {sig: LutEntry(dict(e["layer_example"]), list(e["layers"]),
                                 {(int(ci), int(co)): None for ci, co in e["points"]})
                   for sig, e in data["entries"].items()}
        refs = [JobReference(r["name"], {int(g): int(c) for g, c in r["counts"].items()},
                             r["onnx"], r["input_name"]) for r in data["references"]]
        return cls(data["model"], NetworkSpec.from_dict(data["spec"]), settings, entries, refs)
