"""Latency lookup tables: what each layer costs on the target at each (cin, cout).

The parts, from what to measure to a table on disk:

- :mod:`~pipeline.lut.grid`: which (cin, cout) points each layer signature needs, and the
  packed protocol they are timed under;
- :mod:`~pipeline.lut.interpolate`: queries between the measured points;
- :mod:`~pipeline.lut.table`: :class:`LatencyTable`, what the pruner queries, merges and saves;
- :mod:`~pipeline.lut.schema`: the file format and the validation of a table read back;
- :mod:`~pipeline.lut.journal`: the record that lets an interrupted build resume;
- :mod:`~pipeline.lut.build`: :func:`build_lut`, measuring on a backend.

Building needs torch, the ONNX layer graphs and Torch-Pruning (to slim the calibration
references); loading and querying a table needs none of them, so :func:`build_lut` is imported
on first use (see :func:`__getattr__`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .grid import PROTOCOL, LutEntry, Point, layer_points, plan, working_set
from .journal import journal_path
from .schema import FORMAT, VERSION
from .table import LatencyTable

if TYPE_CHECKING:
    from .build import build_lut

__all__ = ["FORMAT", "PROTOCOL", "VERSION", "LatencyTable", "LutEntry", "Point", "build_lut",
           "journal_path", "layer_points", "plan", "working_set"]

def __getattr__(name: str) -> Any:
    """``build_lut`` from :mod:`.build` on first use (PEP 562).

    Building imports torch, the ONNX layer graphs and Torch-Pruning; loading and querying a
    table (the planner, ``halp lut show``, ``halp verify``'s prediction) must not pay for them.
    This hook is the one place the package defers an import.
    """
    if name != "build_lut":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    build_lut = importlib.import_module(".build", __name__).build_lut
    globals()[name] = build_lut
    return build_lut


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
