"""The whole `halp prune` path in a smoke configuration: real data, training, LUT, engines."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.cli import main
from pipeline.commands.prune import render
from pipeline.errors import HalpError
from pipeline.prune import PruneConfig, prune_interval, run

SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[PruneConfig, dict]:
    out = tmp_path_factory.mktemp("prune")
    cfg = PruneConfig(model="resnet18", data="digits", input_shape=SHAPE, out=out / "run",
                      threads=1, target=0.7, baseline_epochs=1, epochs=1, steps=2,
                      lut_max_points=3, lut_passes=1, lut_cache=out / "luts", train_device="cpu")
    return cfg, run(cfg, log=lambda _msg: None)


def test_report_has_every_field(smoke: tuple[PruneConfig, dict]) -> None:
    cfg, report = smoke
    assert json.loads((cfg.out / "report.json").read_text()) == report
    for side in ("dense", "pruned"):
        assert set(report[side]) == {"params", "macs", "predicted_ms", "measured_ms", "top1"}
        assert report[side]["measured_ms"] > 0 and 0 <= report[side]["top1"] <= 100
    for key in ("target", "speedup_measured", "speedup_predicted", "backend", "wall_seconds"):
        assert key in report
    assert report["pruned"]["params"] < report["dense"]["params"]
    assert (cfg.out / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_renders_the_report(smoke: tuple[PruneConfig, dict]) -> None:
    _, report = smoke
    text = render(report)
    for row in ("parameters", "MACs", "predicted ms", "measured ms", "top-1 %"):
        assert row in text
    assert text.splitlines()[1].startswith(f"{report['model']} on {report['data']} @ 1x3x32x32")


def test_pruned_prediction_meets_target(smoke: tuple[PruneConfig, dict]) -> None:
    _, report = smoke
    assert report["pruned"]["predicted_ms"] <= report["target_ms"] * (1 + 1e-9)
    assert report["target_ms"] == pytest.approx(0.7 * report["dense"]["predicted_ms"])


def test_pruned_onnx_runs_and_matches_the_slim_model(smoke: tuple[PruneConfig, dict]) -> None:
    cfg, _ = smoke
    sess = ort.InferenceSession(str(cfg.out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(*SHAPE)
    slim = torch.load(cfg.out / "pruned.pt", weights_only=False).eval()
    with torch.no_grad():
        expected = slim(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert (cfg.out / "pruned.ort.onnx").is_file() and (cfg.out / "dense.ort.onnx").is_file()


def test_rerun_reuses_baseline_lut_and_finetuning(smoke: tuple[PruneConfig, dict]) -> None:
    cfg, first = smoke
    lines: list[str] = []
    again = run(cfg, log=lines.append)
    assert any("(reused)" in line for line in lines)
    # every stage restored from its checkpoint: no training epoch runs again
    assert not any(line.startswith(("baseline epoch", "halp epoch")) for line in lines)
    assert again["channels"] == first["channels"]


def test_rerun_with_another_target_fine_tunes_afresh(smoke: tuple[PruneConfig, dict]) -> None:
    """Checkpoints are keyed by the settings they depend on: a new target reuses the baseline
    and the table but never the other target's fine-tuning."""
    cfg, first = smoke
    lines: list[str] = []
    other = run(replace(cfg, target=0.85), log=lines.append)
    assert not any(line.startswith("baseline epoch") for line in lines)
    assert any(line.startswith("halp epoch") for line in lines)
    assert not any(line.startswith("resumed from") and "finetune" in line for line in lines)
    assert other["target_ms"] > first["target_ms"]
    assert other["pruned"]["predicted_ms"] <= other["target_ms"] * (1 + 1e-9)


def test_cached_table_measured_another_way_is_rebuilt(smoke: tuple[PruneConfig, dict]) -> None:
    """A cache entry from another protocol (an older version of the tool) is rebuilt, where an
    explicit `halp lut build --out` of the same file would refuse to overwrite it."""
    cfg, _ = smoke
    (cached,) = Path(cfg.lut_cache).glob("*.json")
    data = json.loads(cached.read_text())
    data["meta"]["protocol"]["max_copies"] += 1
    cached.write_text(json.dumps(data))
    lines: list[str] = []
    report = run(cfg, log=lines.append)
    assert any("rebuilding" in line for line in lines)
    assert json.loads(cached.read_text())["meta"]["protocol"] != data["meta"]["protocol"]
    assert report["pruned"]["predicted_ms"] <= report["target_ms"] * (1 + 1e-9)


def test_pruning_steps_end_within_the_span(tmp_path: Path) -> None:
    """The steps are spaced as widely as the span allows, so that the rest of the fine-tuning
    recovers at the final architecture."""
    cfg = PruneConfig(model="resnet18", data="digits", input_shape=SHAPE, out=tmp_path / "o",
                      epochs=4, steps=8, prune_span=0.3)
    interval = prune_interval(cfg, batches=22)
    assert interval * cfg.steps <= 0.3 * 4 * 22 < (interval + 1) * cfg.steps
    assert prune_interval(replace(cfg, prune_span=1.0), batches=22) == 11
    with pytest.raises(HalpError, match="raise --epochs or lower --steps"):
        prune_interval(replace(cfg, epochs=1, steps=30), batches=22)


def test_bad_arguments_fail_clearly(tmp_path: Path, capsys) -> None:
    args = ["prune", "--model", "resnet18", "--data", "digits", "--input", "1x3x32x32",
            "--out", str(tmp_path / "o"), "--lut", str(tmp_path / "missing.json")]
    assert main(args) == 2
    assert "missing.json" in capsys.readouterr().err
    cfg = PruneConfig(model="resnet18", data="digits", input_shape=SHAPE, out=tmp_path / "p",
                      steps=500, epochs=1, baseline_epochs=1, lut_cache=tmp_path / "l")
    with pytest.raises(HalpError, match="do not fit"):
        run(cfg, log=lambda _msg: None)
