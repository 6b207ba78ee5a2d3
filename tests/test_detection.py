"""Detectors: digit scenes, COCO data, the deployable core of torchvision's SSDlite, its loss and
mAP, and HALP's analysis, slimming and export applied to that core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.detection.core import DetectorCore, with_core
from pipeline.detection.data import load_detection_data
from pipeline.detection.scenes import INK, NUM_CLASSES, digit_scenes
from pipeline.detection.task import DETECTION, mean_ap
from pipeline.errors import DataError, ModelLoadError
from pipeline.export import to_onnx
from pipeline.models import load_detector, load_model
from pipeline.slim import slim
from pipeline.structure import analyze

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 3, 320, 320)
SSDLITE = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_detector(SSDLITE, num_classes=NUM_CLASSES).eval()


def test_scenes_are_drawn_from_the_seed_with_boxes_around_the_ink():
    train, val = digit_scenes((3, 96, 128), train=30, val=10)
    again, _ = digit_scenes((3, 96, 128), train=30, val=10)
    assert len(train) == 30 and len(val) == 10
    counts = []
    for i in range(len(train)):
        image, target = train[i]
        image2, target2 = again[i]
        assert torch.equal(image, image2) and torch.equal(target["boxes"], target2["boxes"])
        assert image.shape == (3, 96, 128) and image.min() >= 0 and image.max() <= 1
        boxes, labels = target["boxes"], target["labels"]
        counts.append(len(labels))
        assert len(boxes) == len(labels) and ((labels >= 1) & (labels < NUM_CLASSES)).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, [0, 2]] <= 128).all() and (boxes[:, [1, 3]] <= 96).all()
        for x0, y0, x1, y1 in boxes.long().tolist():  # ink touches every side of its box
            ink = image[0, y0:y1, x0:x1] > INK
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
    assert min(counts) >= 1 and max(counts) >= 3
    assert not torch.equal(train[0][0], val[0][0])


def test_train_and_val_scenes_use_disjoint_scans():
    train, val = digit_scenes((1, 64, 64), train=2, val=2)
    a = {s.numpy().tobytes() for s in train.scans}
    b = {s.numpy().tobytes() for s in val.scans}
    assert len(a) > 1000 and len(b) > 300 and not a & b


def test_coco_folders_load_with_boxes_scaled_and_labels_from_one(tmp_path):
    from PIL import Image

    images, annotations = [], []
    for i in range(5):
        Image.new("RGB", (200, 100), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 200, "height": 100})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 7 if i % 2 else 3,
                            "bbox": [20, 10, 40, 30], "area": 1200, "iscrowd": 0})
    (tmp_path / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    data = load_detection_data(f"coco:{tmp_path}", (1, 3, 50, 100), batch_size=2)
    assert data.num_classes == 3
    assert len(data.train.dataset) == 4 and len(data.val.dataset) == 1
    images_, targets = next(iter(data.val))
    assert images_.shape == (1, 3, 50, 100)
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[10.0, 5.0, 30.0, 20.0]]))
    assert targets[0]["labels"].tolist()[0] in (1, 2)


def test_bad_detection_data_and_models_are_refused_with_the_fix(tmp_path):
    with pytest.raises(DataError, match="scenes:500"):
        load_detection_data("scenes:many", SHAPE)
    with pytest.raises(DataError, match=r"annotations\.json"):
        load_detection_data(f"coco:{tmp_path}", SHAPE)
    with pytest.raises(DataError, match="coco:PATH"):
        load_detection_data("digits", SHAPE)
    with pytest.raises(ModelLoadError, match="one-stage detectors"):
        load_detector("resnet18", num_classes=3)
    with pytest.raises(ModelLoadError, match=r"model\.backbone"):
        load_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)


def test_the_core_returns_the_heads_maps_level_by_level(detector):
    core = DetectorCore(detector)
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        maps = core(x)
        features = list(detector.backbone(x).values())
        expected = detector.head(features)
    assert len(maps) == 2 * len(features)
    regression = torch.cat([_flat(m, 4) for m in maps[0::2]], 1)
    logits = torch.cat([_flat(m, NUM_CLASSES) for m in maps[1::2]], 1)
    assert torch.allclose(regression, expected["bbox_regression"], atol=1e-5)
    assert torch.allclose(logits, expected["cls_logits"], atol=1e-5)


def _flat(m: torch.Tensor, values: int) -> torch.Tensor:
    """torchvision's (N, A * K, H, W) -> (N, HWA, K)."""
    n, _, h, w = m.shape
    return m.view(n, -1, values, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, values)


def test_the_core_is_analysed_slimmed_and_exported_like_a_classifier(detector, tmp_path):
    core = load_model(SSDLITE, num_classes=NUM_CLASSES).eval()
    core.load_state_dict(DetectorCore(detector).state_dict())
    x = torch.randn(*SHAPE)
    spec = analyze(core, x)
    prunable = [g for g in spec.groups if g.prunable]
    assert len(prunable) >= 30
    outputs = [g for g in spec.groups if not g.prunable]
    assert all(g.reason == "channels reach the network output" for g in outputs)
    assert {p.rsplit(".", 2)[0] for g in outputs for p in g.producers} == {
        "head.classification_head.module_list", "head.regression_head.module_list"}
    keep = {g.id: max(1, g.channels // 2) for g in prunable}
    slim_core = slim(core, x, keep, spec=spec)  # checked equal to the masked core
    assert analyze(slim_core, x).total_macs < 0.6 * spec.total_macs
    to_onnx(slim_core, x, tmp_path / "core.onnx")  # checked against torch in ONNX Runtime
    pruned = with_core(detector, slim_core).eval()
    with torch.no_grad():
        found = pruned([torch.rand(3, 320, 320)])
    assert set(found[0]) == {"boxes", "scores", "labels"}
    assert detector.backbone is not pruned.backbone


@pytest.mark.slow
def test_the_detection_task_trains_the_whole_detector_and_scores_map(detector):
    data = load_detection_data("scenes:8", SHAPE, batch_size=4)
    model = load_detector(SSDLITE, num_classes=NUM_CLASSES)
    model.load_state_dict(detector.state_dict())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = next(iter(data.train))
    losses = []
    for _ in range(4):
        loss, samples = DETECTION.loss(model, batch, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert samples == 4 and losses[-1] < losses[0]
    scores = DETECTION.scores(model, data.val, torch.device("cpu"))
    assert set(scores) == {"map50", "map"} and 0 <= scores["map"] <= scores["map50"] <= 100


class _Oracle(torch.nn.Module):
    """Returns each image's true boxes as detections, looked up by the image itself."""

    def __init__(self, dataset):
        super().__init__()
        self.answers = {dataset[i][0].numpy().tobytes(): dataset[i][1]
                        for i in range(len(dataset))}

    def forward(self, images):
        out = []
        for image in images:
            t = self.answers[image.numpy().tobytes()]
            out.append({**t, "scores": torch.ones(len(t["labels"]))})
        return out


def test_map_is_100_for_the_true_boxes_and_drops_for_shifted_ones():
    data = load_detection_data("scenes:20", (1, 3, 96, 96), batch_size=3)
    oracle = _Oracle(data.val.dataset)
    assert mean_ap(oracle, data.val) == {"map50": 100.0, "map": 100.0}
    for t in oracle.answers.values():
        t["boxes"] = t["boxes"] + torch.tensor([3.0, 3.0, 3.0, 3.0])
    shifted = mean_ap(oracle, data.val)
    assert shifted["map"] < 90 and np.isfinite(shifted["map50"])


@pytest.mark.slow
def test_bench_detector_quick_prunes_ssdlite_end_to_end_and_reports_every_field(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_detector.py"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mAP@0.5 %" in run.stdout
    bench = json.loads((tmp_path / "bench.json").read_text())
    report = bench["prune"]
    for side in ("dense", "pruned"):
        assert set(report[side]) == {"params", "macs", "predicted_ms", "measured_ms", "map50",
                                     "map"}
        assert report[side]["measured_ms"] > 0 and 0 <= report[side]["map50"] <= 100
    assert report["task"] == "detection" and report["input_shape"] == list(SHAPE)
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    assert report["pruned"]["predicted_ms"] < report["dense"]["predicted_ms"]
    assert bench["verify"]["samples"] and np.isfinite(bench["verify"]["mape"])
    assert bench["wall_seconds"] > 0


def test_retinanets_shared_head_is_priced_per_level_and_slimmed_once(tmp_path):
    core = load_model("retinanet_resnet50_fpn", num_classes=NUM_CLASSES).eval()
    x = torch.randn(1, 3, 128, 128)
    spec = analyze(core, x)
    calls = [layer for layer in spec.layers
             if layer.name.split("#")[0] == "head.classification_head.conv.0.0"]
    assert [layer.in_hw for layer in calls] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert len({(layer.in_group, layer.out_group) for layer in calls}) == 1
    group = calls[0].out_group
    assert group is not None
    slim_core = slim(core, x, {group: 128}, spec=spec)
    assert slim_core.head.classification_head.conv[0][0].out_channels == 128
    to_onnx(slim_core, x, tmp_path / "retinanet.onnx")


@pytest.mark.slow
def test_the_detector_example_runs_the_users_loop_to_a_report(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "prune_detector.py"),
                          "--data", "scenes:32", "--baseline-epochs", "1", "--epochs", "1",
                          "--threads", "1", "--max-points", "2", "--passes", "1",
                          "--target", "0.7", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    assert {"measured_ms", "predicted_ms", "map50", "map"} <= set(report["pruned"])
    assert (tmp_path / "pruned.onnx").is_file()


def test_a_detector_pruned_as_a_classifier_is_refused_with_the_fix(tmp_path):
    from pipeline.config import PruneConfig
    from pipeline.errors import HalpError
    from pipeline.prune import load_job

    cfg = PruneConfig(model=SSDLITE, data="digits", input_shape=SHAPE, out=tmp_path)
    with pytest.raises(HalpError, match="--task detection"):
        load_job(cfg)
    cfg = PruneConfig(model=SSDLITE, task="detection", data="scenes:8", input_shape=(1, 3, 64, 64),
                      out=tmp_path)
    with pytest.raises(HalpError, match="--input 1x3x320x320"):
        load_job(cfg)
