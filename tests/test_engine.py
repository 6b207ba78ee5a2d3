"""Engines built from real ONNX exports and timed with real ONNX Runtime sessions."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from pipeline import engine
from pipeline.backends import get_backend
from pipeline.cli import main
from pipeline.errors import HalpError
from pipeline.export import to_onnx

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("engine") / "r18.onnx"
    to_onnx(torchvision.models.resnet18(num_classes=10).eval(), X, path)
    return path


def _backend():
    return get_backend("onnxruntime", threads=1, warmup=1, repeats=3, warmup_ms=0)


def test_ort_engine_builds_runs_and_is_timed(onnx_file: Path, tmp_path: Path) -> None:
    built = engine.build(onnx_file, _backend(), tmp_path, name="r18")
    assert built.path == tmp_path / "r18.ort.onnx" and built.inputs == {"input": (1, 3, 32, 32)}
    sess = ort.InferenceSession(str(built.path), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = {"input": X.numpy()}
    assert abs(sess.run(None, x)[0] - reference.run(None, x)[0]).max() < 1e-4
    m = engine.measure(built, _backend())
    assert m.n == 3 and 0 < m.p10_ms <= m.median_ms <= m.p90_ms


def test_channel_counts_read_from_weights(onnx_file: Path) -> None:
    counts = engine.channel_counts(onnx.load(onnx_file))
    assert sorted(set(counts.values())) == [10, 64, 128, 256, 512]
    assert len(counts) == 21


def test_halp_engine_writes_report(onnx_file: Path, tmp_path: Path, capsys) -> None:
    rc = main(["engine", "--onnx", str(onnx_file), "--backend", "onnxruntime", "--threads", "1",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("model", "input_shape", "channel_counts", "backend", "precision",
                "predicted_ms", "measured_ms", "versions"):
        assert key in report
    assert report["measured_ms"] > 0 and report["backend"] == "onnxruntime"
    assert "median ms" in capsys.readouterr().out


def test_bad_inputs_are_clear_errors(onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(HalpError, match="does not exist"):
        engine.build(tmp_path / "missing.onnx", _backend(), tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(HalpError, match="not a readable ONNX model"):
        engine.build(tmp_path / "junk.onnx", _backend(), tmp_path)
    with pytest.raises(HalpError, match="no engine format"):
        engine.build(onnx_file, get_backend("torch", threads=1), tmp_path)
    dynamic = onnx.load(onnx_file)
    dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(HalpError, match="dynamic dimension"):
        engine.input_shapes(dynamic)
