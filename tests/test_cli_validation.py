"""Bad arguments fail fast and clearly: exit status 2, a message, no traceback, no work done.

Each command runs as a subprocess and is timed from interpreter start: the checks run before
torch loads, so a mistyped target or a missing file costs well under a second, not minutes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import config
from pipeline.cli import build_parser
from pipeline.commands.prune import config_from_args
from pipeline.config import PruneConfig
from pipeline.errors import ConfigError, LutMismatch

ROOT = Path(__file__).resolve().parent.parent
#: interpreter start included; the checks themselves take milliseconds
FAST_S = 5.0


def halp(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
    return done, time.perf_counter() - started


def refused(args: tuple[str, ...], cwd: Path, message: str) -> float:
    done, elapsed = halp(*args, cwd=cwd)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr, done.stderr
    return elapsed


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """An existing file, a folder and a path that does not exist."""
    (tmp_path / "a-file.txt").write_text("not a table")
    (tmp_path / "a-folder").mkdir()
    return {"file": str(tmp_path / "a-file.txt"), "folder": str(tmp_path / "a-folder"),
            "missing": str(tmp_path / "missing.json")}


PRUNE = ("prune", "--model", "resnet18", "--data", "digits", "--input", "1x3x32x32")
MODEL = ("--model", "resnet18", "--input", "1x3x32x32")

CASES = {
    # name: (arguments with {file}/{folder}/{missing} placeholders, expected message)
    "prune target above 1": ((*PRUNE, "--out", "{folder}/o", "--target", "1.5"), "(0, 1]"),
    "prune target 0": ((*PRUNE, "--out", "{folder}/o", "--target", "0"), "(0, 1]"),
    "prune target negative": ((*PRUNE, "--out", "{folder}/o", "--target=-1"), "(0, 1]"),
    "prune target nan": ((*PRUNE, "--out", "{folder}/o", "--target", "nan"), "not nan"),
    "prune target-ms 0": ((*PRUNE, "--out", "{folder}/o", "--target-ms", "0"), "above 0"),
    "prune target-ms inf": ((*PRUNE, "--out", "{folder}/o", "--target-ms", "inf"), "finite"),
    "prune shape": (("prune", "--model", "resnet18", "--data", "digits", "--input", "1x3x32",
                     "--out", "{folder}/o"), "N x C x H x W"),
    "prune lut": ((*PRUNE, "--out", "{folder}/o", "--lut", "{missing}"), "does not exist"),
    "prune checkpoint": ((*PRUNE, "--out", "{folder}/o", "--checkpoint", "{missing}"),
                         "does not exist"),
    "prune data folder": (("prune", "--model", "resnet18", "--data", "imagefolder:{missing}",
                           "--input", "1x3x32x32", "--out", "{folder}/o"), "no 'train'"),
    "prune out is a file": ((*PRUNE, "--out", "{file}"), "is a file"),
    "prune epochs": ((*PRUNE, "--out", "{folder}/o", "--epochs", "0"), "at least 1"),
    "prune span": ((*PRUNE, "--out", "{folder}/o", "--prune-span", "1.5"), "(0, 1]"),
    "prune lr": ((*PRUNE, "--out", "{folder}/o", "--lr", "nan"), "finite"),
    "prune solver": ((*PRUNE, "--out", "{folder}/o", "--solver", "exact"),
                     "must be one of coupled, decoupled, highs, not 'exact'"),
    "prune saved model": (("prune", "--model", "{missing}.pt", "--data", "digits", "--input",
                           "1x3x32x32", "--out", "{folder}/o"), "does not exist"),
    "demo out is a file": (("demo", "--out", "{file}"), "is a file"),
    "analyze shape": (("analyze", "--model", "resnet18", "--input", "1x3xfoo"), "malformed"),
    "analyze checkpoint": (("analyze", *MODEL, "--checkpoint", "{missing}"), "does not exist"),
    "analyze json is a folder": (("analyze", *MODEL, "--json", "{folder}"), "is a folder"),
    "lut build shape": (("lut", "build", "--model", "resnet18", "--input", "0x3x32x32",
                         "--backend", "onnxruntime", "--out", "{missing}"), "zero dimension"),
    "lut build max points": (("lut", "build", *MODEL, "--backend", "onnxruntime", "--out",
                              "{missing}", "--max-points", "1"), "at least 2"),
    "lut build passes": (("lut", "build", *MODEL, "--backend", "onnxruntime", "--out",
                          "{missing}", "--passes", "0"), "at least 1"),
    "lut show": (("lut", "show", "{missing}"), "does not exist"),
    "lut plot": (("lut", "plot", "{missing}", "-o", "{folder}/p.png"), "does not exist"),
    "lut merge": (("lut", "merge", "{file}", "{missing}", "-o", "{folder}/m.json"),
                  "does not exist"),
    "verify lut": (("verify", *MODEL, "--lut", "{missing}"), "does not exist"),
    "verify shape": (("verify", "--model", "resnet18", "--input", "1x", "--lut", "{file}"),
                     "malformed"),
    "verify samples": (("verify", *MODEL, "--lut", "{file}", "--samples", "1"), "at least 2"),
    "verify tolerance": (("verify", *MODEL, "--lut", "{file}", "--tolerance=-0.1"),
                         "at least 0"),
    "engine onnx": (("engine", "--onnx", "{missing}", "--backend", "onnxruntime", "--out",
                     "{folder}"), "does not exist"),
    "engine out is a file": (("engine", "--onnx", "{file}", "--backend", "onnxruntime",
                              "--out", "{file}"), "is a file"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_fails_fast_without_traceback(case: str, files: dict[str, str],
                                                   tmp_path: Path) -> None:
    template, message = CASES[case]
    args = tuple(arg.format(**files) for arg in template)
    elapsed = refused(args, tmp_path, message)
    assert elapsed < FAST_S, f"{case}: refused after {elapsed:.1f} s"
    assert not (Path(files["folder"]) / "o").exists()  # nothing written


def test_parsing_loads_no_torch() -> None:
    """What keeps the checks fast: building the parser imports no torch or runtime."""
    code = ("import sys; from pipeline.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_library_errors_after_loading_are_clean(tmp_path: Path) -> None:
    """Checks that need torch (model names, table contents) still end in status 2, no trace."""
    refused(("analyze", "--model", "resnt18", "--input", "1x3x32x32"), tmp_path,
            "unknown model 'resnt18'")
    (tmp_path / "t.json").write_text('{"format": "halp-lut"')
    refused(("lut", "show", "t.json"), tmp_path, "not valid JSON")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here")
def test_unavailable_backend_refused_before_any_work(tmp_path: Path) -> None:
    refused((*PRUNE, "--out", "o", "--backend", "tensorrt"), tmp_path, "needs TensorRT")
    assert not (tmp_path / "o").exists()


# --- the settings themselves ------------------------------------------------------------------


def test_flags_take_every_default_from_prune_config(tmp_path: Path) -> None:
    args = build_parser().parse_args([*PRUNE, "--out", str(tmp_path)])
    given = {"model": "resnet18", "data": "digits", "input_shape": (1, 3, 32, 32),
             "out": tmp_path}
    assert config_from_args(args) == PruneConfig(**given)
    assert {f.name for f in fields(PruneConfig)} <= set(vars(args))  # every field is a flag


def test_target_ms_replaces_the_fraction(tmp_path: Path) -> None:
    args = build_parser().parse_args([*PRUNE, "--out", str(tmp_path), "--target-ms", "2.5"])
    cfg = config_from_args(args)
    assert (cfg.target, cfg.target_ms) == (None, 2.5)


@pytest.mark.parametrize("bad", [{"target": 1.5}, {"target": 0.0}, {"target": float("nan")},
                                 {"target": None}, {"target_ms": -1.0}, {"steps": 0},
                                 {"input_shape": (1, 3, 32)}, {"checkpoint": "missing.pt"},
                                 {"prune_span": 0.0},
                                 {"backend": "torch"}, {"lut_max_points": 1},
                                 {"solver": "decoupled", "block_removal": True}])
def test_library_config_is_checked_on_creation(bad: dict, tmp_path: Path) -> None:
    settings = {"model": "resnet18", "data": "digits", "input_shape": (1, 3, 32, 32),
                "out": tmp_path / "o", **bad}
    with pytest.raises(ConfigError, match=next(iter(bad))):
        PruneConfig(**settings)


def test_choice_names_match_the_implementations() -> None:
    from pipeline import backends

    assert tuple(backends.BACKENDS) == config.BACKENDS
    assert backends.engine_builders() == config.DEPLOY_BACKENDS
    assert tuple(backends.PRECISIONS) == config.PRECISIONS


def test_foreign_table_refused_before_training_and_the_flag_named(tmp_path: Path) -> None:
    from pipeline.backends import get_backend
    from pipeline.lut import build_lut
    from pipeline.prune import run
    from pipeline.structure import analyze

    net, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 8, 8)
    backend = get_backend("onnxruntime", threads=1, warmup=1, repeats=1, warmup_ms=0)
    table = tmp_path / "tiny.json"
    build_lut(analyze(net, x), backend, step=8, out=table, progress=False)
    data = json.loads(table.read_text())
    data["meta"]["device_key"] = "cpu-arm-cortex-a78ae-t1"  # a Jetson Orin CPU
    table.write_text(json.dumps(data))
    cfg = PruneConfig(model="resnet18", data="digits", input_shape=(1, 3, 32, 32),
                      out=tmp_path / "o", lut=str(table), threads=1, train_device="cpu")
    lines: list[str] = []
    with pytest.raises(LutMismatch, match="--allow-lut-mismatch"):
        run(cfg, log=lines.append)
    cfg.allow_lut_mismatch = True  # then the table is checked against the model
    with pytest.raises(LutMismatch, match="layer"):
        run(cfg, log=lines.append)
    assert not lines and not cfg.out.exists()  # no stage started, nothing written


def test_no_module_outside_commands_imports_them() -> None:
    """Rendering lives in the commands; the library returns data and never reaches back. The
    entry points (`halp`, `python -m pipeline.device`) are the command layer too."""
    for path in (ROOT / "pipeline").rglob("*.py"):
        if "commands" in path.parts or path.relative_to(ROOT).as_posix() in (
                "pipeline/cli.py", "pipeline/device.py"):
            continue
        text = path.read_text(encoding="utf-8")
        assert ".commands" not in text and "pipeline.commands" not in text, path
