"""HalpPruner on real torchvision models with LUTs measured by ONNX Runtime."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.multiprocessing as mp
import torch_pruning as tp
from _pruner_support import INPUT, batch, ddp_worker, lut_path, make_model, sgd, train
from _tables import mac_table
from torch import nn

from pipeline.errors import HalpError, InfeasibleBudget
from pipeline.export import to_onnx
from pipeline.lut import LatencyTable
from pipeline.planner import Planner
from pipeline.pruner import HalpPruner
from pipeline.slim import check_equivalent
from pipeline.spec import NetworkSpec
from pipeline.structure import analyze, trace


def _lut(name: str) -> LatencyTable:
    return LatencyTable.load(lut_path(name))


def _target_ms(name: str, lut: LatencyTable, x: torch.Tensor, share: float) -> float:
    """Milliseconds ``share`` of the way from the smallest network to the dense one.

    Derived from what this LUT says (the pruner's view: its stem stays dense), because the
    measured ratio between them depends on the machine and its load.
    """
    planner = Planner(trace(make_model(name), x, ignore_stem=True).spec, lut)
    # a negative calibration constant can put the smallest network at <= 0 ms
    minimum = max(planner.minimum_ms, 0.0)
    return minimum + share * (planner.dense_ms - minimum)


def _masked_entries_are_zero(model: nn.Module, spec: NetworkSpec,
                             keep: dict[int, list[int]]) -> None:
    """Producers' filters and biases, BN γ/β and consumers' input weights of every dropped
    channel are exactly zero (checked from the spec, independently of the mask plan)."""
    modules = dict(model.named_modules())
    for gid, kept in keep.items():
        group = spec.group(gid)
        dropped = torch.tensor(sorted(set(range(group.channels)) - set(kept)), dtype=torch.long)
        if not len(dropped):
            continue
        for name in group.producers + group.norms:
            for p in (modules[name].weight, modules[name].bias):
                if p is not None:
                    assert p.detach()[dropped].abs().max() == 0, name
        for name in group.consumers:
            layer = spec.layer(name)
            if layer.op != "dwconv" and layer.in_sources == [(gid, group.channels)]:
                assert modules[name].weight.detach()[:, dropped].abs().max() == 0, name


#: model, unit, (stem, classifier)
CASES = [("resnet18", None, ("conv1", "fc")),
         ("mobilenet_v2", 16, ("features.0.0", "classifier.1"))]


@pytest.mark.parametrize(("name", "unit", "ends"), CASES)
def test_schedule_reaches_target_masks_hold_and_slim_matches(
        name: str, unit: int | None, ends: tuple[str, str]) -> None:
    lut = _lut(name)
    model = make_model(name)
    x = torch.randn(*INPUT)
    optimizer = sgd(model)
    logs: list[str] = []
    target_ms = _target_ms(name, lut, x, 0.3)
    pruner = HalpPruner(model, x, lut, target_ms=target_ms, steps=3, interval=2, unit=unit,
                        optimizer=optimizer, log=logs.append)
    spec = pruner.spec
    assert all(spec.layer(end).out_group is None for end in ends)  # neither is pruned
    train(model, pruner, optimizer, range(6))

    assert pruner.done and len(pruner.history) == 3
    budgets = [h["budget_ms"] for h in pruner.history]
    assert budgets == pruner.budgets and budgets == sorted(budgets, reverse=True)
    assert budgets[-1] == pruner.target_ms == target_ms
    assert all(h["predicted_ms"] <= h["budget_ms"] for h in pruner.history)
    assert pruner.predicted_ms <= pruner.target_ms
    assert sum(1 for m in logs if "HALP step" in m) == 3 and "step 3/3" in logs[-1]
    size = unit or 8
    for gid, count in pruner.counts.items():
        channels = spec.group(gid).channels
        assert 1 <= count <= channels and (count % min(size, channels) == 0 or count == channels)
    assert sum(pruner.counts.values()) < sum(spec.group(g).channels for g in pruner.counts)

    train(model, pruner, optimizer, range(6, 9))  # momentum and weight decay keep pushing
    _masked_entries_are_zero(model, spec, pruner.keep)

    slim = pruner.finalize()
    assert check_equivalent(model, slim, x) <= 1e-4
    assert lut.predict(analyze(slim, x)) == pytest.approx(pruner.predicted_ms, rel=1e-9)
    # ORT folds BatchNorm and picks its own kernels per CPU: over mobilenet_v2's 50 layers the
    # trained logits differ from torch by rounding of about 1e-3 here and up to 0.0093 on logits
    # of magnitude 5.8 on a CI runner, so the bound scales with the logits (a wrong channel
    # order or a dropped layer is off by their own size)
    with torch.no_grad():
        want = slim.eval()(x).numpy()
    atol = 5e-3 * float(np.abs(want).max())
    proto = to_onnx(slim, x, atol=atol)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=atol)


def test_resume_continues_the_schedule_exactly() -> None:
    lut = _lut("resnet18")
    x = torch.randn(*INPUT)
    kwargs = dict(target_ms=_target_ms("resnet18", lut, x, 0.3), steps=3, interval=2,
                  log=lambda _m: None)

    model_a = make_model("resnet18")
    opt_a = sgd(model_a)
    pruner_a = HalpPruner(model_a, x, lut, optimizer=opt_a, **kwargs)
    train(model_a, pruner_a, opt_a, range(7))

    model_b = make_model("resnet18")
    opt_b = sgd(model_b)
    pruner_b = HalpPruner(model_b, x, lut, optimizer=opt_b, **kwargs)
    train(model_b, pruner_b, opt_b, range(3))  # one step done, one iteration into the next
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(),
                "pruner": pruner_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model_c = make_model("resnet18", seed=1)
    model_c.load_state_dict(saved["model"])
    opt_c = sgd(model_c)
    opt_c.load_state_dict(saved["opt"])
    pruner_c = HalpPruner(model_c, x, lut, optimizer=opt_c, **kwargs)
    pruner_c.load_state_dict(saved["pruner"])
    assert pruner_c.history == pruner_b.history and pruner_c.keep == pruner_b.keep
    train(model_c, pruner_c, opt_c, range(3, 7))

    assert pruner_c.done and pruner_c.history == pruner_a.history
    assert pruner_c.keep == pruner_a.keep
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_c.state_dict()[key]), key

    other = HalpPruner(make_model("resnet18"), x, lut, **{**kwargs, "target_ms": 0.9 * kwargs[
        "target_ms"]})
    with pytest.raises(HalpError, match="another target or latency table"):
        other.load_state_dict(saved["pruner"])


def test_nonfinite_iterations_are_skipped_and_the_step_waits() -> None:
    model = make_model("resnet18")
    x = torch.randn(*INPUT)
    logs: list[str] = []
    lut = _lut("resnet18")
    pruner = HalpPruner(nn.DataParallel(model), x, lut, target_ms=_target_ms("resnet18", lut, x,
                        0.5), steps=1, interval=1, log=logs.append)  # the wrapper is looked into
    assert pruner.spec.layer("layer1.0.conv1").out_group is not None
    model.train()
    xb, yb = batch(0)
    nn.functional.cross_entropy(model(xb), yb).backward()
    model.layer1[0].bn1.weight.grad[0] = float("inf")
    pruner.step()
    assert pruner.skipped == 1 and not pruner.done and "postponed" in logs[-1]
    model.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    pruner.step()
    assert pruner.done and pruner.predicted_ms <= pruner.target_ms


def test_infeasible_target_names_the_minimum() -> None:
    model = make_model("resnet18")
    lut = _lut("resnet18")
    lut.constant_ms = None  # layers only: a noisy negative constant cannot lower the minimum
    with pytest.raises(InfeasibleBudget) as info:
        HalpPruner(model, torch.randn(*INPUT), lut, target=0.01)
    assert info.value.minimum > 0
    assert f"{info.value.minimum:.4g} ms" in str(info.value)


def test_pruner_traces_once_and_decides_through_its_planner(monkeypatch) -> None:
    builds = []
    build = tp.DependencyGraph.build_dependency
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency",
                        lambda self, *a, **k: builds.append(1) or build(self, *a, **k))
    x = torch.randn(*INPUT)
    lut = _lut("resnet18")
    pruner = HalpPruner(make_model("resnet18"), x, lut, target=0.9, steps=4,
                        log=lambda _m: None)
    assert len(builds) == 1
    planner = pruner.planner
    assert planner.spec is pruner.spec and planner.groups == list(pruner.counts)
    assert pruner.dense_ms == planner.dense_ms
    assert pruner.budgets == planner.schedule(pruner.target_ms, 4)
    rng = np.random.default_rng(0)
    saliency = {g: rng.random(c[-1]) for g, c in planner.choices.items()}
    for g, c in planner.choices.items():
        assert c[0] == 0 and c[-1] == pruner.spec.group(g).channels
    budget = (planner.minimum_ms + planner.dense_ms) / 2
    plan = planner.solve(saliency, budget, keep=pruner.keep)
    assert lut.predict(pruner.spec, plan.counts) == plan.predicted_ms <= budget < pruner.dense_ms
    assert all(plan.counts[g] in planner.choices[g] for g in plan.counts)
    assert planner.solve(saliency, planner.dense_ms).counts == pruner.counts  # dense fits


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "exactly one of target"),
    ({"target": 0.5, "target_ms": 1.0}, "exactly one of target"),
    ({"target": 1.5}, r"fraction in \(0, 1\]"),
    ({"target": 0.5, "steps": 0}, "steps=0"),
    ({"target": 0.5, "unit": {999: 8}}, "not prunable"),
    ({"target": 0.5, "unit": 0}, "positive int"),
    ({"target": 0.5, "solver": "decoupled", "block_removal": True}, "needs a coupled solver"),
])
def test_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(HalpError, match=match):
        HalpPruner(make_model("resnet18"), torch.randn(*INPUT), _lut("resnet18"), **kwargs)


@pytest.mark.parametrize("solver", ["coupled", "decoupled"])
def test_either_solver_prunes_within_each_budget_on_a_priced_table(solver: str) -> None:
    """The pruner's steps through each solver, on a table priced by formula (nothing timed)."""
    model = make_model("resnet18")
    x = torch.randn(*INPUT)
    lut = mac_table(analyze(model, x))
    optimizer = sgd(model)
    pruner = HalpPruner(model, x, lut, target=0.6, steps=2, interval=2, solver=solver,
                        optimizer=optimizer, log=lambda _m: None)
    train(model, pruner, optimizer, range(4))
    assert pruner.done and all(h["predicted_ms"] <= h["budget_ms"] for h in pruner.history)
    assert pruner.predicted_ms <= pruner.target_ms
    slim = pruner.finalize()
    assert check_equivalent(model, slim, x) <= 1e-4
    assert lut.predict(analyze(slim, x)) == pytest.approx(pruner.predicted_ms, rel=1e-9)


def test_unknown_solver_is_refused_before_any_work() -> None:
    with pytest.raises(HalpError, match="solver 'exact' is not one of coupled, decoupled"):
        HalpPruner(make_model("small"), torch.randn(*INPUT), LatencyTable({}, {}), target=0.5,
                   solver="exact")


@pytest.mark.slow
def test_distributed_ranks_end_with_identical_masks(tmp_path) -> None:
    path = lut_path("small")
    target_ms = _target_ms("small", LatencyTable.load(path), torch.randn(*INPUT), 0.3)
    mp.spawn(ddp_worker, nprocs=2, join=True,
             args=(2, f"file://{tmp_path}/rendezvous", str(path), target_ms, str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["history"]) == 2 and r0["history"] == r1["history"]
    assert r0["keep"] == r1["keep"]
    assert sum(map(len, r0["keep"].values())) < 64 + 64 + 128  # something was pruned
    assert any(not torch.equal(v, r1["state"][k]) for k, v in r0["state"].items())  # own data
    for result in (r0, r1):
        model = make_model("small")
        model.load_state_dict(result["state"])
        spec = analyze(model, torch.randn(*INPUT))
        _masked_entries_are_zero(model, spec, result["keep"])


def test_pruner_removes_blocks_and_slims_to_what_it_priced() -> None:
    """A target below the narrowest network of full depth: the pruner removes blocks, trains
    them masked to the identity, and the slim network is priced as predicted."""
    model = make_model("resnet18")
    x = torch.randn(*INPUT)
    lut = mac_table(analyze(model, x))
    spec = trace(model, x, ignore_stem=True).spec
    narrow = Planner(spec, lut).minimum_ms
    deep = Planner(spec, lut, block_removal=True).minimum_ms
    optimizer = sgd(model)
    pruner = HalpPruner(model, x, lut, target_ms=0.5 * (narrow + deep), steps=2, interval=2,
                        block_removal=True, optimizer=optimizer, log=lambda _m: None)
    train(model, pruner, optimizer, range(4))
    assert pruner.predicted_ms <= pruner.target_ms
    removed = spec.removed_blocks(pruner.counts)
    assert removed
    slim = pruner.finalize()
    assert all(isinstance(slim.get_submodule(b.name), nn.Identity) for b in removed)
    assert check_equivalent(model, slim, x) <= 1e-4
    assert lut.predict(analyze(slim, x)) == pytest.approx(pruner.predicted_ms, rel=1e-9)


def test_a_backbone_with_frozen_batchnorm_is_pruned_trained_and_slimmed() -> None:
    """A pretrained detector backbone's norms are FrozenBatchNorm2d: saliency falls back to
    the producers' weights, the frozen statistics are masked once and sliced by slim."""
    from torchvision.models import resnet18
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = resnet18(norm_layer=FrozenBatchNorm2d, num_classes=10)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.bias.uniform_(-1, 1)
    x = torch.randn(*INPUT)
    spec = trace(model, x, ignore_stem=True).spec
    opt = sgd(model)
    pruner = HalpPruner(model, x, mac_table(spec), target=0.7, steps=2, interval=2,
                        optimizer=opt, log=lambda _m: None)
    train(model, pruner, opt, range(4))
    assert pruner.done and pruner.predicted_ms < pruner.dense_ms
    group = spec.layer("layer1.0.conv1").out_group
    dropped = sorted(set(range(64)) - set(pruner.keep[group]))
    assert dropped and not model.layer1[0].bn1.bias[dropped].any()
    assert not model.layer1[0].conv1.weight[dropped].any()
    slimmed = pruner.finalize()  # checked equal to the masked model
    assert slimmed.layer1[0].bn1.weight.numel() == len(pruner.keep[group])
