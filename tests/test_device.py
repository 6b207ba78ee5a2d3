"""The device-side table builder: a job planned with the model, measured where torch cannot be
imported, in shards that merge into the table `halp lut build` would have measured.

The device runs in a fresh interpreter with torch, torchvision and Torch-Pruning made
unimportable, on ONNX Runtime, as `python -m pipeline.device`.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.errors import LutError
from pipeline.lut import LatencyTable, build_lut, plan
from pipeline.lut.job import Job
from pipeline.models import load_model
from pipeline.structure import analyze

ROOT = Path(__file__).parents[1]
#: a small job: resnet18 at 32x32, grid step 32, two points per axis, one pass
PLAN = ["--model", "resnet18", "--num-classes", "10", "--input", "1x3x32x32", "--step", "32",
        "--max-points", "2", "--passes", "1"]

#: runs a module (argv[1]) with the torch stack unimportable; prints the pipeline modules loaded
CHILD = """
import json, runpy, sys
for name in ("torch", "torchvision", "torch_pruning"):
    sys.modules[name] = None  # any import of them now raises ImportError
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
print(json.dumps(sorted(m.__file__ for name, m in sys.modules.items()
                        if name.split(".")[0] == "pipeline")))
"""


def _without_torch(module: str, *args: str) -> list[str]:
    """Run ``python -m module args`` without torch; the files of the pipeline modules it
    imported."""
    run = subprocess.run([sys.executable, "-c", CHILD, module, *args],
                         capture_output=True, text=True, check=False, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _device(*args: str) -> list[str]:
    """The device builder on ONNX Runtime, without torch."""
    return _without_torch("pipeline.device", *args, "--backend", "onnxruntime", "--threads",
                          "1", "--no-progress")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("device") / "job.json"
    assert main(["lut", "plan", *PLAN, "--out", str(path)]) == 0
    return path


def test_shards_measured_without_torch_merge_into_the_planned_table(job: Path,
                                                                    tmp_path: Path) -> None:
    loaded = _device(str(job), "--shard", "1/2", "--out", str(tmp_path / "a.json"))
    _device(str(job), "--shard", "2/2", "--out", str(tmp_path / "b.json"))
    a, b = LatencyTable.load(tmp_path / "a.json"), LatencyTable.load(tmp_path / "b.json")
    assert a.meta["shard"] == [1, 2] and a.meta["references"] and not b.meta["references"]
    assert a.constant_ms is None  # a shard cannot price the network: calibrated when merged

    merged_path = tmp_path / "merged.json"
    assert main(["lut", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--job", str(job), "-o", str(merged_path)]) == 0
    merged, planned = LatencyTable.load(merged_path), Job.load(job)
    merged.check_spec(planned.spec)
    assert {s: set(e.points) for s, e in merged.entries.items()} == \
        {s: set(e.points) for s, e in planned.entries.items()}
    assert merged.meta["check"]["additivity"] > 0 and merged.constant_ms is not None
    assert set(merged.meta["calibration"]) == {"dense", "half", "quarter"}
    # the engine of the pruned network is built on the device too, as `python -m pipeline engine`
    loaded = sorted({*loaded, *_without_torch(
        "pipeline", "engine", "--onnx", str(job.parent / "job.json.refs" / "quarter.onnx"),
        "--backend", "onnxruntime", "--threads", "1", "--out", str(tmp_path / "engine"))})
    assert (tmp_path / "engine" / "quarter.ort.onnx").is_file()
    # every module the device imports is linted for Python 3.8 (pyproject's ruff targets) and
    # passes vermin's check of the features it uses
    targets = re.findall(r'^"(pipeline/[\w/]+\.py)" = "py38"$',
                         (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert {str(Path(f).relative_to(ROOT)) for f in loaded} <= set(targets)
    vermin = subprocess.run([str(Path(sys.executable).with_name("vermin")), "-t=3.8-",
                             "--violations", "--no-tips", *loaded],
                            capture_output=True, text=True, check=False)
    assert vermin.returncode == 0, vermin.stdout + vermin.stderr
    assert [hit for f in loaded for hit in _runtime_generics(Path(f))] == []


#: subscripting these at runtime needs Python 3.9 (vermin checks annotations only)
_GENERIC = {"dict", "list", "tuple", "set", "frozenset", "type", "Callable", "Mapping",
            "Sequence", "Iterable", "Iterator"}


def _runtime_generics(path: Path) -> list[str]:
    """``dict[str, int]`` and the like outside annotations (which ``from __future__ import
    annotations`` leaves unevaluated): a type alias spelled so fails to import on 3.8."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        parts = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            parts = [a.annotation for a in (*args.posonlyargs, *args.args, *args.kwonlyargs,
                                             args.vararg, args.kwarg) if a is not None]
            parts.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            parts = [node.annotation]
        skip.update(id(sub) for part in parts if part is not None for sub in ast.walk(part))
    return [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and id(node) not in skip
            and isinstance(node.value, ast.Name) and node.value.id in _GENERIC]


def test_the_device_measures_what_halp_lut_build_measures(job: Path, tmp_path: Path) -> None:
    """Same points, same protocol and settings, calibrated on the same reference networks."""
    _device(str(job), "--out", str(tmp_path / "device.json"))
    device = LatencyTable.load(tmp_path / "device.json")
    model = load_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = analyze(model, x, name="resnet18")
    from pipeline.backends import get_backend

    built = build_lut(spec, get_backend("onnxruntime", threads=1), step=32, max_points=2,
                      passes=1, out=tmp_path / "built.json", model=model, example_input=x,
                      progress=False)
    assert {s: set(e.points) for s, e in device.entries.items()} == \
        {s: set(e.points) for s, e in built.entries.items()} == \
        {s: set(e.points) for s, e in plan(spec, 32, 2).items()}
    for key in ("protocol", "step", "max_points", "passes", "settings", "device_key"):
        assert device.meta[key] == built.meta[key], key
    assert set(device.meta["calibration"]) == set(built.meta["calibration"])
    assert device.meta["check"] and device.constant_ms is not None


def test_bad_jobs_and_shards_are_refused_with_the_fix(job: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from pipeline.device import main as device

    not_a_job = tmp_path / "table.json"
    not_a_job.write_text(json.dumps({"format": "halp-lut"}))
    with pytest.raises(LutError, match=r"not a table job.*halp lut plan"):
        Job.load(not_a_job)
    other = json.loads(job.read_text())
    other["settings"]["protocol"]["name"] = "packed-network-working-set/0"
    (tmp_path / "old.json").write_text(json.dumps(other))
    with pytest.raises(LutError, match=r"planned for protocol.*same halp-pipeline version"):
        Job.load(tmp_path / "old.json")
    assert device([str(job), "--backend", "onnxruntime", "--shard", "3/2",
                   "--out", str(tmp_path / "x.json")]) == 2
    assert "1 <= i <= n" in capsys.readouterr().err
    assert main(["lut", "merge", str(job), "-o", str(tmp_path / "m.json")]) == 2
