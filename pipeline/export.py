"""ONNX export of a (slim) network, checked against torch in ONNX Runtime.

The exported graph is what gets deployed and what the LUT's prediction is verified against, so a
graph that computes something else must fail loudly, not ship.
"""

from __future__ import annotations

import copy
import inspect
import io
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .errors import ExportMismatch, HalpError
from .fsio import atomic_write_bytes


def output_tensors(out: object) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, or nested tuples/lists/dicts of them), in the
    order export flattens them: what ONNX and slimmed outputs are compared against."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


@contextmanager
def _quiet_legacy_exporter() -> Iterator[None]:
    """Hide only the legacy exporter's deprecation notices; tracer warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message="The feature will be removed", module=r"torch\.onnx")
        yield


class _AdaptiveAvgPoolAsMatmul(nn.Module):
    """``adaptive_avg_pool2d`` from one fixed size to another as two matrix products.

    The TorchScript exporter refuses adaptive average pooling whose output size does not divide
    the input size (torchvision's VGG pools 2x2 to 7x7 at 64x64 input); the same average, as
    constant pooling matrices, exports as MatMul and computes the identical result.
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", _pool_matrix(in_hw[0], out_hw[0]))
        self.register_buffer("cols", _pool_matrix(in_hw[1], out_hw[1]).T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


def _pool_matrix(size: int, out: int) -> torch.Tensor:
    """(out, size): row i averages the window adaptive pooling uses for output i."""
    matrix = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -(-(i + 1) * size // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _run_exportable(model: nn.Module, example_input: torch.Tensor) -> list[torch.Tensor]:
    """Run ``model`` once (its outputs are returned) and swap each 2-D adaptive average pool
    the exporter cannot express for :class:`_AdaptiveAvgPoolAsMatmul`."""
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    pools = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.AdaptiveAvgPool2d)}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            shapes.setdefault(name, (args[0].shape, out.shape))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in pools.items()]
    try:
        expected = output_tensors(model(example_input))
    finally:
        for h in handles:
            h.remove()
    for name, (shape_in, shape_out) in shapes.items():
        in_hw, out_hw = tuple(shape_in[-2:]), tuple(shape_out[-2:])
        if all(i % o == 0 for i, o in zip(in_hw, out_hw, strict=True)):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                _AdaptiveAvgPoolAsMatmul(in_hw, out_hw))
    return expected


def _export_kwargs() -> dict:
    # torch < 2.5 (older JetPack builds) has only the TorchScript exporter and no `dynamo` flag
    params = inspect.signature(torch.onnx.export).parameters
    return {"dynamo": False} if "dynamo" in params else {}


def compare_outputs(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], *,
                    rtol: float = 1e-3, atol: float = 1e-4,
                    names: Sequence[str] | None = None) -> None:
    """Raise :class:`ExportMismatch` unless every ``actual`` output is close to ``expected``."""
    if len(expected) != len(actual):
        raise ExportMismatch(
            f"the ONNX model has {len(actual)} outputs but torch returns {len(expected)}"
        )
    names = list(names or [f"output {i}" for i in range(len(expected))])
    for name, want, got in zip(names, expected, actual, strict=True):
        want, got = np.asarray(want), np.asarray(got)
        if want.shape != got.shape:
            raise ExportMismatch(f"ONNX {name} has shape {got.shape}, torch {want.shape}")
        if np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        bad = ~np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        raise ExportMismatch(
            f"ONNX {name} differs from torch: max abs error {float(np.nanmax(diff)):.3g} "
            f"(rtol={rtol}, atol={atol}; {int(bad.sum())} of {bad.size} values off). The model "
            "may behave differently when traced (data-dependent control flow, Python numbers "
            "computed from tensors): check the tracer warnings; loosen rtol/atol only if the "
            "difference is rounding"
        )


def _check(proto: onnx.ModelProto, expected: list[torch.Tensor], example_input: torch.Tensor,
           rtol: float, atol: float) -> None:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: example_input.detach().cpu().numpy()}
    got = sess.run(None, feed)
    compare_outputs([t.detach().float().cpu().numpy() for t in expected], got, rtol=rtol,
                    atol=atol, names=[o.name for o in sess.get_outputs()])


def to_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike | None = None,
            *, opset: int = 17, check: bool = True, rtol: float = 1e-3,
            atol: float = 1e-4) -> onnx.ModelProto:
    """Export ``model`` (eval mode, static shapes of ``example_input``) to ONNX.

    Uses the TorchScript (``dynamo=False``) exporter on purpose: it exports resnet18 in about
    0.4 s against about 4 s for the torch.export-based default, `halp verify` exports dozens of
    slimmed networks per run, and it is the exporter the older torch builds on Jetson have. The
    caller's model is not touched (a deep copy is exported). With ``check`` the ONNX model is run
    in ONNX Runtime and compared with torch; a mismatch raises :class:`ExportMismatch`. With
    ``path`` the file is written atomically.
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = _run_exportable(model, example_input)
        names = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
        buffer = io.BytesIO()
        try:
            with _quiet_legacy_exporter():
                torch.onnx.export(model, (example_input,), buffer, opset_version=opset,
                                  input_names=["input"], output_names=names,
                                  do_constant_folding=True, **_export_kwargs())
        except Exception as exc:  # the exporter raises many types for unsupported constructs
            raise HalpError(
                f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}: {exc}"
            ) from exc
    proto = onnx.load_from_string(buffer.getvalue())
    if check:
        _check(proto, expected, example_input, rtol, atol)
    if path is not None:
        atomic_write_bytes(path, proto.SerializeToString())
    return proto
