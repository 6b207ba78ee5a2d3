"""The peers HALP is compared with (pipeline.peers, tools/bench_peers.py): Torch-Pruning's own
pruner on a real torchvision resnet18 and real Torch-Pruning graphs, uniform width, the search
for a ratio, and the comparison's --quick run end to end (real training, ONNX Runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from _tables import mac_table
from torch.utils.data import DataLoader, Subset

from pipeline.data import load_data
from pipeline.peers import (
    TorchPruningSchedule,
    macs,
    solve_decreasing,
    taylor_oneshot,
    uniform_counts,
    uniform_model,
)
from pipeline.planner import Planner
from pipeline.structure import trace
from pipeline.train import fit

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(1, 3, 16, 16)


def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture(scope="module")
def batches() -> DataLoader:
    digits = load_data("digits", (1, 3, 16, 16), batch_size=16, seed=0)
    return DataLoader(Subset(digits.val.dataset, range(64)), batch_size=16)


def test_torch_pruning_prunes_on_schedule_while_fit_trains_the_new_parameters(batches):
    model = resnet()
    spec = trace(model, X, ignore_stem=True).spec
    schedule = TorchPruningSchedule(model, X, spec, 0.5, steps=2, interval=3, round_to=16)
    seen: list[int] = []

    def after_backward() -> bool:
        changed = schedule.step()
        seen.append(sum(p.numel() for p in model.parameters()))
        return changed

    history = fit(model, batches, epochs=2, after_backward=after_backward, log=lambda _: None)
    assert schedule.taken == 2 and schedule.done
    # pruned at iterations 3 and 6, then left alone
    assert seen[0] == seen[1] > seen[2] == seen[4] > seen[5] == seen[7]
    assert all(np.isfinite(h["loss"]) for h in history)
    # the optimizer trained the parameters that replaced the pruned ones
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, batches, epochs=1, log=lambda _: None)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()
               if n.startswith("layer4"))
    # what HALP leaves dense stays dense: the stem's channels and the classifier's outputs
    assert model.conv1.out_channels == 64 and model.layer1[0].conv2.out_channels == 64
    assert model.fc.out_features == 10
    def widths(net: torch.nn.Module) -> list[int]:
        return [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]

    assert all(w % 16 == 0 for w in widths(model))
    assert sum(widths(model)) < 0.8 * sum(widths(resnet()))
    assert model(X).shape == (1, 10)


def test_a_larger_ratio_prunes_more(batches):
    model = resnet().eval()
    spec = trace(model, X, ignore_stem=True).spec
    sizes = [macs(taylor_oneshot(model, X, spec, r, list(batches)[:2], 16), X)
             for r in (0.0, 0.3, 0.6)]
    assert sizes[0] == macs(model, X) and sizes[0] > sizes[1] > sizes[2]
    assert sum(p.numel() for p in model.parameters()) == 11_181_642  # the original untouched


def test_solve_decreasing_meets_a_goal_or_returns_the_closest():
    assert solve_decreasing(lambda x: 10 * (1 - x), 4.0, 0.0, 1.0) == pytest.approx(0.6, abs=0.01)
    steps = solve_decreasing(lambda x: float(np.floor(10 * (1 - x))), 4.5, 0.0, 1.0)
    assert np.floor(10 * (1 - steps)) in (4.0, 5.0)


def test_uniform_width_scales_every_group_and_keeps_the_largest_filters():
    model = resnet().eval()
    spec = trace(model, X, ignore_stem=True).spec
    planner = Planner(spec, mac_table(spec, step=16))
    half = uniform_counts(planner, 0.5)
    assert half == {g: spec.group(g).channels // 2 for g in planner.groups}
    tiny = uniform_counts(planner, 0.0)
    assert all(c == 16 for c in tiny.values())  # never below one unit
    assert planner.predict(tiny) < planner.predict(half) < planner.predict()
    slim = uniform_model(model, X, planner, 0.5)
    conv = slim.layer2[0].conv1
    assert conv.out_channels == 64
    norms = model.layer2[0].conv1.weight.detach().abs().flatten(1).sum(1)
    kept = torch.sort(torch.argsort(-norms)[:64]).values
    assert torch.equal(conv.weight, model.layer2[0].conv1.weight[kept])  # its input: the stem


def quick_report(out: Path, *backend: str) -> dict:
    """``bench_peers.py --quick`` run into ``out``; its report, checked for every field."""
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_peers.py"), "--quick",
                          "--out", str(out), *backend], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    runs = {r["method"]: r for r in report["runs"]}
    assert set(runs) == {"halp", "halp-arch", "tp-latency", "tp-macs", "uniform"}
    for r in runs.values():
        assert {"target", "seed", "measured_ms", "match", "predicted_ms", "macs", "params",
                "top1", "knob", "tries", "dense_ms", "search_match"} <= set(r)
        assert 0 < r["measured_ms"] < r["dense_ms"] and 0 <= r["top1"] <= 100
    assert {s["method"] for s in report["summary"]} == set(runs)
    assert (out / "peers.png").stat().st_size > 10_000
    return report


def test_bench_peers_quick_matches_each_method_and_reports_every_field(tmp_path):
    report = quick_report(tmp_path)
    runs = {r["method"]: r for r in report["runs"]}
    # matched by fine-tuned tries: latency as each try measured it beside HALP's, MACs as
    # counted; within a looser bound than the full run's 3%, which the best of a few short
    # tries does not always reach. The final measurement of all six engines together is
    # reported as measured, relative to HALP's in that same measurement, and not bounded: on a
    # shared CI host a network of 0.4 ms has come out at 0.71 of HALP's there after matching
    # within 10% beside it
    halp_ms = runs["halp"]["measured_ms"]
    assert runs["halp"]["match"] == 1.0
    for method in ("tp-latency", "uniform"):
        assert abs(runs[method]["search_match"] - 1) <= 0.10, runs[method]
        assert runs[method]["match"] == pytest.approx(runs[method]["measured_ms"] / halp_ms)
    assert abs(runs["tp-macs"]["macs"] / runs["halp"]["macs"] - 1) <= 0.10, runs["tp-macs"]


def test_bench_peers_runs_on_the_torch_backend(tmp_path):
    """The GPU comparison's path (issue 12, item 4: ``--backend torch --device cuda``) on this
    CPU: the table measured by torch, the folded modules timed in place of engines. One try
    per match and a one-epoch baseline: the matching itself is the test above's."""
    report = quick_report(tmp_path, "--backend", "torch", "--device", "cpu", "--tries", "1",
                          "--baseline-epochs", "1")
    assert report["settings"]["tries"] == 1 and report["settings"]["baseline_epochs"] == 1
    assert report["settings"]["targets"] == [0.3]  # the rest of --quick still holds
    assert report["settings"]["backend"] == "torch"
    (table,) = (tmp_path / "luts").glob("*.json")
    assert json.loads(table.read_text())["meta"]["backend"] == "torch"
    assert not list(tmp_path.glob("*.onnx"))  # no engine path: the modules themselves
