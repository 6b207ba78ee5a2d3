"""Deployable engines: build them from ONNX where they will run, time them like the LUT was timed.

A TensorRT plan (polygraphy loaders, see :mod:`pipeline.backends.tensorrt`) or an ONNX Runtime
model saved after ORT's graph optimisations. Both are measured with the backend's own timing
protocol, so "measured" here means the same thing as in the latency table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .backends import Backend, Measurement
from .errors import HalpError
from .fsio import atomic_write_bytes, atomic_write_json

ENGINE_SUFFIX = {"onnxruntime": ".ort.onnx", "tensorrt": ".plan"}


@dataclass(frozen=True)
class Engine:
    path: Path
    backend: str
    precision: str
    inputs: dict[str, tuple[int, ...]]  # input name -> static shape


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static input shapes of an ONNX graph (initializers listed as inputs are skipped)."""
    initializers = {i.name for i in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise HalpError(f"input {inp.name!r} has a dynamic dimension; engines here are built "
                            "for the static shape the LUT was measured at: re-export with static "
                            "shapes (pipeline.export.to_onnx)")
        shapes[inp.name] = tuple(d.dim_value for d in dims)
    return shapes


def random_inputs(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def build(onnx_path: str | Path, backend: Backend, out_dir: str | Path, *,
          name: str = "model") -> Engine:
    """Build ``onnx_path`` into ``out_dir/<name><suffix>`` for ``backend``."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise HalpError(f"ONNX file {onnx_path} does not exist")
    try:
        proto = onnx.load(str(onnx_path))
    except Exception as exc:
        raise HalpError(f"{onnx_path} is not a readable ONNX model: {exc}") from exc
    if backend.name not in ENGINE_SUFFIX:
        raise HalpError(f"the {backend.name} backend has no engine format; build engines with "
                        f"--backend {' or '.join(ENGINE_SUFFIX)}")
    out = Path(out_dir) / f"{name}{ENGINE_SUFFIX[backend.name]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if backend.name == "tensorrt":
        from .backends.tensorrt import build_engine  # tensorrt is imported only on this path

        atomic_write_bytes(out, build_engine(proto, backend.precision))
    else:
        atomic_write_bytes(out, _ort_optimized(proto.SerializeToString(), out))
    return Engine(out, backend.name, backend.precision, input_shapes(proto))


def _ort_optimized(data: bytes, out: Path) -> bytes:
    """The model after ONNX Runtime's full graph optimisation (fusions, constant folding).

    The result can contain CPU-specific fused ops: it is an engine for this kind of machine, like
    a TensorRT plan is for one GPU.
    """
    import onnxruntime as ort

    tmp = out.with_name(out.name + ".partial")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        return tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)


def measure(engine: Engine, backend: Backend, seed: int = 0) -> Measurement:
    """Time ``engine`` with the backend's timing protocol on random inputs of its shape."""
    if engine.backend != backend.name:
        raise HalpError(f"{engine.path} is a {engine.backend} engine; measure it with that backend")
    inputs = random_inputs(engine.inputs, seed)
    if backend.name == "tensorrt":
        return backend.time_plan(engine.path.read_bytes(), inputs)  # type: ignore[attr-defined]
    return backend.time_onnx(engine.path, inputs)


def channel_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every Conv/Gemm/ConvTranspose, read from the weights (for reports)."""
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    counts = {}
    for node in model.graph.node:
        if node.op_type in {"Conv", "Gemm", "ConvTranspose", "MatMul"} and len(node.input) > 1:
            dims = weights.get(node.input[1])
            if not dims:
                continue
            if node.op_type == "Gemm":
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                counts[node.name] = dims[0] if trans_b else dims[-1]
            elif node.op_type == "MatMul":
                counts[node.name] = dims[-1]
            elif node.op_type == "ConvTranspose":
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                counts[node.name] = dims[1] * group
            else:
                counts[node.name] = dims[0]
    return counts


def write_report(out_dir: str | Path, report: dict[str, Any]) -> Path:
    return atomic_write_json(Path(out_dir) / "report.json", report)
