"""Taylor saliency checked against values computed by hand (NumPy, no autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.errors import HalpError
from pipeline.importance import TaylorSaliency, _per_out_channel
from pipeline.structure import analyze

EPS = 1e-5


class TwoBranch(nn.Module):
    """x → conv_a → bn_a ┐
       x → conv_b → bn_b ┴ add → conv_c: one group of 2 channels with two batch norms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 1, bias=False)
        self.conv_b = nn.Conv2d(1, 2, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(2, eps=EPS)
        self.bn_b = nn.BatchNorm2d(2, eps=EPS)
        self.conv_c = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.conv_a.weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
            self.conv_b.weight.copy_(torch.tensor([0.5, 3.0]).view(2, 1, 1, 1))
            self.bn_a.weight.copy_(torch.tensor([1.5, -0.5]))
            self.bn_a.bias.copy_(torch.tensor([0.2, 0.7]))
            self.bn_b.weight.copy_(torch.tensor([0.8, 2.0]))
            self.bn_b.bias.copy_(torch.tensor([-0.9, 0.1]))
            self.conv_c.weight.copy_(torch.tensor([2.0, -1.0]).view(1, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_c(self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x)))


def _bn_hand(model: TwoBranch, x: np.ndarray) -> np.ndarray:
    """|Σ_bn γ·∂L/∂γ + β·∂L/∂β| per channel for L = ½ Σ out², in training-mode batch norm."""
    v = model.conv_c.weight.detach().numpy().reshape(2)
    total = np.zeros(2)
    branches = []
    for conv, bn in ((model.conv_a, model.bn_a), (model.conv_b, model.bn_b)):
        z = conv.weight.detach().numpy().reshape(1, 2, 1, 1) * x  # (N, 2, H, W)
        mean, var = z.mean(axis=(0, 2, 3), keepdims=True), z.var(axis=(0, 2, 3), keepdims=True)
        xhat = (z - mean) / np.sqrt(var + EPS)
        branches.append((xhat, bn.weight.detach().numpy(), bn.bias.detach().numpy()))
    s = sum(g.reshape(1, 2, 1, 1) * xh + b.reshape(1, 2, 1, 1) for xh, g, b in branches)
    out = (v.reshape(1, 2, 1, 1) * s).sum(1, keepdims=True)
    dl_ds = out * v.reshape(1, 2, 1, 1)  # ∂L/∂s for L = ½ Σ out²
    for xhat, gamma, beta in branches:
        total += gamma * (dl_ds * xhat).sum(axis=(0, 2, 3)) + beta * dl_ds.sum(axis=(0, 2, 3))
    return np.abs(total)


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    (0.5 * model(x).pow(2).sum()).backward()


def test_bn_saliency_matches_hand_computation_and_averages() -> None:
    torch.manual_seed(0)
    model = TwoBranch().train()
    spec = analyze(model, torch.randn(1, 1, 3, 3))
    (gid,) = [g.id for g in spec.groups if set(g.norms) == {"bn_a", "bn_b"}]
    sal = TaylorSaliency(model, spec, [gid])
    inputs = [torch.randn(4, 1, 3, 3) for _ in range(2)]
    expected = []
    for x in inputs:
        _backward(model, x)
        expected.append(_bn_hand(model, x.numpy().astype(np.float64)))
        np.testing.assert_allclose(sal.scores()[gid].numpy(), expected[-1], rtol=1e-4)
        assert sal.accumulate()
    mean, n = sal.average()
    assert n == 2
    np.testing.assert_allclose(mean[gid].numpy(), np.mean(expected, axis=0), rtol=1e-4)
    # the two batch norms are summed before the absolute value, not after
    assert not np.allclose(expected[-1], _bn_abs_per_layer(model, inputs[-1]), rtol=1e-3)


def _bn_abs_per_layer(model: TwoBranch, x: torch.Tensor) -> np.ndarray:
    _backward(model, x)
    return sum((bn.weight * bn.weight.grad + bn.bias * bn.bias.grad).abs().detach().numpy()
               for bn in (model.bn_a, model.bn_b))


def test_fallback_without_bn_and_nonfinite_iterations_skipped() -> None:
    """Linear(2→3) → Linear(3→1), L = out: saliency of hidden unit c is |w2[c]·h[c]|."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    spec = analyze(model, torch.randn(1, 2))
    (gid,) = [g.id for g in spec.groups if g.producers == ["0"]]
    sal = TaylorSaliency(model, spec, [gid])
    w1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    w2 = model[1].weight.detach().numpy().reshape(3)
    expected = []
    for x in (torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 4.0]])):
        model.zero_grad()
        model(x).sum().backward()
        expected.append(np.abs(w2 * (w1 @ x.numpy()[0] + b1)))
        assert sal.accumulate()
    model[0].bias.grad[1] = float("nan")
    assert not sal.accumulate()
    assert sal.skipped == 1 and sal.iterations == 2
    mean, n = sal.average()
    assert n == 2
    np.testing.assert_allclose(mean[gid].numpy(), np.mean(expected, axis=0), rtol=1e-5)
    state = sal.state_dict()
    sal.reset()
    assert sal.average()[1] == 0
    sal.load_state_dict(state)
    np.testing.assert_array_equal(sal.average()[0][gid].numpy(), mean[gid].numpy())


def test_no_gradients_is_a_usage_error() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    spec = analyze(model, torch.randn(1, 2))
    sal = TaylorSaliency(model, spec, [g.id for g in spec.prunable_groups])
    with pytest.raises(HalpError, match=r"after loss\.backward\(\)"):
        sal.accumulate()


def test_transposed_conv_sums_per_output_channel() -> None:
    deconv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    t = torch.randn_like(deconv.weight)  # (in=4, out/groups=3, 3, 3)
    expected = torch.stack([t[(o // 3) * 2:(o // 3) * 2 + 2, o % 3].sum() for o in range(6)])
    torch.testing.assert_close(_per_out_channel(deconv, t), expected)
