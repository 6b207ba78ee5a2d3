"""Deployable engines: build them from ONNX where they will run, time them like the LUT was timed.

Any backend with an engine format builds and times them (an
:class:`~pipeline.backends.EngineBuilder`: a TensorRT plan, an ONNX Runtime model saved after
ORT's graph optimisations), with its own timing protocol, so "measured" here means the same
thing as in the latency table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .backends import Backend, EngineBuilder, Measurement, engine_builders
from .errors import HalpError
from .fsio import atomic_write_json
from .kinds import Precision


@dataclass(frozen=True)
class Engine:
    path: Path
    backend: str
    precision: Precision
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
    builder = _builder(backend)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = builder.build_engine(proto, out_dir, name)
    return Engine(path, backend.name, backend.precision, input_shapes(proto))


def _builder(backend: Backend) -> EngineBuilder:
    """``backend`` as an engine builder, or an error naming the backends that are."""
    if not isinstance(backend, EngineBuilder):
        raise HalpError(f"the {backend.name} backend has no engine format; build engines with "
                        f"--backend {' or '.join(engine_builders())}")
    return backend


def timer(engine: Engine, backend: Backend, seed: int = 0) -> Callable[[], Measurement]:
    """Load ``engine`` once; each call times it with the backend's timing protocol on random
    inputs of its shape (to interleave several engines, see
    :func:`~pipeline.backends.timing.interleaved`)."""
    if engine.backend != backend.name:
        raise HalpError(f"{engine.path} is a {engine.backend} engine; measure it with that backend")
    return _builder(backend).engine_timer(engine.path, random_inputs(engine.inputs, seed))


def measure(engine: Engine, backend: Backend, seed: int = 0) -> Measurement:
    """Time ``engine`` once with the backend's timing protocol."""
    return timer(engine, backend, seed)()


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
