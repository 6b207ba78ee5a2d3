"""ONNX export: real torchvision models round-trip through ONNX Runtime and match torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import ExportMismatch
from pipeline.export import compare_outputs, to_onnx


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_export_and_match(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).train()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "out" / f"{name}.onnx"
    proto = to_onnx(model, x, path)  # check=True: ORT vs torch inside
    assert model.training  # the caller's mode is untouched
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert shape == [1, 3, 64, 64]  # static
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert onnx.load(path) == proto
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_multiple_outputs_are_all_checked() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.body(x)
            return y.relu(), y.mean(dim=(2, 3))

    proto = to_onnx(TwoHeads(), torch.randn(2, 3, 9, 9))
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]


def test_comparison_names_the_max_abs_error() -> None:
    rng = np.random.default_rng(0)
    want = [rng.standard_normal((2, 5)).astype(np.float32), np.ones(3, np.float32)]
    compare_outputs(want, [want[0] + 1e-6, want[1]])  # rounding noise passes
    off = [want[0].copy(), want[1]]
    off[0][1, 3] += 0.25
    with pytest.raises(ExportMismatch, match=r"output 0 differs.*max abs error 0\.25.*1 of 10"):
        compare_outputs(want, off)
    with pytest.raises(ExportMismatch, match=r"shape \(5, 2\), torch \(2, 5\)"):
        compare_outputs(want, [want[0].T, want[1]])
    with pytest.raises(ExportMismatch, match="1 outputs but torch returns 2"):
        compare_outputs(want, want[:1])
