"""Querying a latency table loads no building machinery: torch, onnx, Torch-Pruning, the
slimming of the calibration references and :mod:`pipeline.lut.build` come in only with
``build_lut``.

Checked in a fresh interpreter, since this test process has long imported all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.lut
from pipeline.backends import Measurement
from pipeline.lut import LatencyTable, plan
from pipeline.spec import LayerSpec, NetworkSpec

#: modules that only building a table needs: querying one loads neither torch nor onnx
BUILD_ONLY = ("torch", "onnx", "torch_pruning", "pipeline.slim", "pipeline.structure",
              "pipeline.references", "pipeline.lut.build", "pipeline.lut.measure",
              "pipeline.backends.onnx_base")

CHILD = """
import json, sys
from pipeline.lut import LatencyTable
from pipeline.spec import NetworkSpec

table = LatencyTable.load(sys.argv[1], backend="onnxruntime", precision="fp32")
spec = NetworkSpec.from_json(open(sys.argv[2]).read())
result = {"dense": table.predict(spec), "half": table.predict(spec, {2: 8}),
          "loaded": [m for m in %r if m in sys.modules]}
from pipeline.lut import build_lut
result["build"] = [build_lut.__module__, "torch_pruning" in sys.modules]
print(json.dumps(result))
"""


def _spec() -> NetworkSpec:
    layer = LayerSpec(name="conv", op="conv", kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), groups=1, in_hw=(8, 8), out_hw=(8, 8), cin=3, cout=16,
                      in_group=None, out_group=2, in_sources=[(None, 3)])
    return NetworkSpec(input_shape=(1, 3, 8, 8), layers=[layer], groups=[], total_params=0,
                       total_macs=0)


def test_querying_a_table_imports_no_build_machinery(tmp_path: Path) -> None:
    spec = _spec()
    entries = plan(spec, 8)
    for entry in entries.values():
        entry.points = {k: Measurement(0.1 * k[1], 0.1 * k[1], 0.1 * k[1], 5)
                        for k in entry.points}
    meta = {"backend": "onnxruntime", "precision": "fp32", "device_key": "cpu-test"}
    LatencyTable(meta, entries, constant_ms=0.5).save(tmp_path / "table.json")
    (tmp_path / "spec.json").write_text(spec.to_json())
    run = subprocess.run(
        [sys.executable, "-c", CHILD % (BUILD_ONLY,), str(tmp_path / "table.json"),
         str(tmp_path / "spec.json")],
        capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["loaded"] == []
    assert result["dense"] == pytest.approx(2.1) and result["half"] == pytest.approx(1.3)
    assert result["build"] == ["pipeline.lut.build", True]  # build_lut still at hand


def test_unknown_names_are_still_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'build_table'"):
        pipeline.lut.build_table  # noqa: B018
