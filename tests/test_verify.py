"""`halp verify` end to end on a small model with real ONNX Runtime sessions and a real LUT."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from _pruner_support import INPUT, lut_path, make_model
from _tables import mac_table

from pipeline.backends import get_backend
from pipeline.cli import main
from pipeline.commands.verify import render
from pipeline.errors import LutMismatch
from pipeline.lut import LatencyTable
from pipeline.planner import Planner
from pipeline.structure import trace
from pipeline.verify import (
    KNAPSACK_TARGETS,
    _architectures,
    random_counts,
    spearman,
    speed_change,
    verify,
)


def test_planned_samples_include_coupled_and_decoupled_solutions() -> None:
    """Each feasible target gets a one-step coupled plan and a multi-step decoupled one, both
    within the target by the table's own prediction (a MAC-priced table: nothing is timed)."""
    model = make_model("resnet18")
    spec = trace(model, torch.randn(*INPUT), ignore_stem=True).spec
    planner = Planner(spec, mac_table(spec))
    chosen = _architectures(model, planner, 12, seed=0)
    planned = [(kind, counts) for kind, counts in chosen if kind != "random"]
    feasible = [t for t in KNAPSACK_TARGETS if t * planner.dense_ms >= planner.minimum_ms]
    assert [kind for kind, _ in planned] == [f"{s}@{t}" for t in feasible
                                             for s in ("coupled", "decoupled")][:4]
    for kind, counts in planned:
        assert planner.predict(counts) <= float(kind.split("@")[1]) * planner.dense_ms
    assert len(chosen) == 12


def test_random_samples_cover_the_range_evenly() -> None:
    """Eight random samples, one per slice of the width range: their predictions rise with the
    slice, from heavily pruned to nearly dense, so no two crowd where noise decides ranks."""
    model = make_model("resnet18")
    spec = trace(model, torch.randn(*INPUT), ignore_stem=True).spec
    planner = Planner(spec, mac_table(spec))
    rng = np.random.default_rng(3)
    predicted = [planner.predict(random_counts(planner, rng, (i, 8))) for i in range(8)]
    assert spearman(list(range(8)), predicted) >= 0.9
    assert predicted[0] < 0.75 * predicted[-1]


def test_spearman_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 6, 12).astype(float)  # ties included
        b = a + rng.normal(0, 2, 12)
        assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic)


def _args(lut: Path, *extra: str) -> list[str]:
    return ["verify", "--model", "resnet18", "--num-classes", "10",
            "--input", "x".join(map(str, INPUT)), "--lut", str(lut), "--samples", "4",
            "--rounds", "2", *extra]


def test_verify_report_table_json_and_plot(tmp_path: Path, capsys) -> None:
    model = make_model("resnet18")
    backend = get_backend("onnxruntime", threads=1, warmup=1, repeats=3, warmup_ms=0)
    lut = LatencyTable.load(lut_path("resnet18"), backend=backend)
    assert lut.dense_ms and lut.meta["input_shape"] == list(INPUT)
    lut.dense_ms = 1e-3  # as if the build had run on a machine far faster than this one
    said: list[str] = []
    report = verify(model, torch.randn(*INPUT), lut, backend, samples=4, rounds=1,
                    progress=False, log=said.append)
    assert len(report.samples) == 4
    # the slower machine is named before the table check that would blame the table
    assert said[0].startswith("note: this run measured the dense network at")
    assert "the table's build at 0.001 ms" in said[0]
    assert report.to_dict()["build_dense_ms"] == 1e-3
    kinds = [s.kind.split("@")[0] for s in report.samples]  # a third of 4: one plan
    assert kinds == ["coupled", "random", "random", "random"]
    data = report.to_dict()
    for key in ("mape", "max_abs_pct_error", "spearman", "samples"):
        assert key in data
    for sample in data["samples"]:
        assert sample["predicted_ms"] > 0 and sample["measured_ms"] > 0 and sample["counts"]
    assert data["mape"] == pytest.approx(np.mean([abs(s["error_pct"]) for s in data["samples"]]))
    # a sample whose slow rounds took 3x its fast ones was measured on a busy machine: said,
    # with what to do; quiet samples say nothing
    report.samples = [replace(s, p90_ms=s.p10_ms) for s in report.samples]
    assert not report.busy and "warning" not in render(report)
    report.samples[1] = replace(report.samples[1], p90_ms=3 * report.samples[1].p10_ms)
    text = render(report)
    assert "1 of 4 samples were measured while the machine was busy" in text
    assert "up to 3.0x" in text and "--threads" in text
    assert report.to_dict()["busy_samples"] == 1

    rc = main(_args(lut_path("resnet18"), "--tolerance", "1000", "--report",
                    str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")))
    out = capsys.readouterr().out
    assert rc == 0 and "mean abs error" in out and "PASS" in out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_speed_change_named_beyond_ten_percent() -> None:
    assert speed_change(None, 5.0) is None  # no build measurement for this input
    assert speed_change(5.0, 5.4) is None
    assert "(+14%)" in speed_change(7.962, 9.054)
    assert "(-20%)" in speed_change(10.0, 8.0)


def test_exit_code_follows_tolerance(capsys) -> None:
    assert main(_args(lut_path("resnet18"), "--tolerance", "0")) == 1
    assert "FAIL" in capsys.readouterr().out


def test_broken_or_foreign_lut_refused_before_measuring(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(lut_path("resnet18").read_text()[:200])
    assert main(_args(broken)) == 2
    assert "halp verify: error" in capsys.readouterr().err

    foreign = tmp_path / "foreign.json"
    data = json.loads(lut_path("resnet18").read_text())
    data["meta"]["device_key"] = "cpu-arm-cortex-a78ae-t1"  # a Jetson Orin CPU
    foreign.write_text(json.dumps(data))
    assert main(_args(foreign)) == 2
    err = capsys.readouterr().err
    assert "device_key" in err and "--allow-lut-mismatch" in err  # names the way out

    other_model = tmp_path / "other.json"
    shutil.copy(lut_path("small"), other_model)
    assert main(_args(other_model)) == 2
    assert "has no entry" in capsys.readouterr().err


def test_lut_for_another_backend_is_refused() -> None:
    lut = LatencyTable.load(lut_path("resnet18"))
    with pytest.raises(LutMismatch, match="precision"):
        lut.check_backend({"backend": "onnxruntime", "precision": "fp16"})


@pytest.mark.tensorrt
@pytest.mark.skipif(os.environ.get("HALP_TENSORRT") != "1",
                    reason="set HALP_TENSORRT=1 on a machine with TensorRT and an NVIDIA GPU")
def test_verify_on_tensorrt(tmp_path: Path) -> None:
    """Hardware regression: the same check on a TensorRT LUT built here."""
    from pipeline.lut import build_lut
    from pipeline.structure import analyze

    model, x = make_model("resnet18"), torch.randn(*INPUT)
    backend = get_backend("tensorrt", os.environ.get("HALP_PRECISION", "fp16"))
    lut = build_lut(analyze(model, x), backend, max_points=4, out=tmp_path / "trt.json",
                    model=model, example_input=x, progress=False)
    report = verify(model, x, lut, backend, samples=12, progress=False)
    assert report.mape <= 10.0 and report.spearman >= 0.9, report.to_dict()
