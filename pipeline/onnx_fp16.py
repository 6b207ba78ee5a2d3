"""ONNX graphs in float16 end to end: what a TensorRT fp16 engine is built from.

An fp16 engine of an fp32-typed graph keeps fp32 inputs and outputs, so TensorRT adds a
conversion kernel at each edge. Inside a network those edges are other layers' fp16 tensors and
cost nothing; a single-layer table point would pay them at every point. And TensorRT 11 builds
every network strongly typed: the graph's types *are* the precision (there is no FP16 builder
flag any more). So an fp16 table point, and the fp16 network it predicts, is built from a graph
whose float tensors are all float16: inputs, outputs, initializers, constants, value infos and
``Cast``/``dtype`` targets.

Why not ``onnxconverter_common.float16.convert_float_to_float16`` (the converter polygraphy's
``ConvertToFp16`` wraps, pure Python and installable on a Jetson too): it decides by op name,
not by the ONNX schema. Its default block list (``Resize``, ``Min``, ``Max``, ``TopK``, ...;
chosen for ONNX Runtime's CPU kernels) wraps those ops in fp32 ``Cast`` pairs, which a strongly
typed TensorRT network runs as real conversion layers; with that list emptied it converts
``Resize``'s ``scales`` (``tensor(float)`` only in the schema) and the graph becomes invalid.
It also clamps small weights, and runs shape inference and a topological sort over a full
model, weights included, per call: a packed table point carries tens of MB of weights. Here the
schema decides: a float tensor becomes float16 wherever the op's type constraint admits it, and
a slot that only takes ``tensor(float)`` keeps an fp32 initializer or gets a ``Cast`` to fp32
in front of it. :func:`detached_to_float16` converts a
:class:`~pipeline.onnx_weights.DetachedModel`'s weights in memory, without a protobuf round
trip. Imports neither torch nor TensorRT.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, defs, helper, numpy_helper

from .errors import HalpError
from .onnx_weights import DetachedModel

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
_HALF_TYPE = "tensor(float16)"


def _admits_half(schema: defs.OpSchema, formals: list, index: int) -> bool:
    """Whether input/output ``index`` of ``schema`` (``formals``: its inputs or outputs) may be
    float16; the last formal stands for every variadic position after it."""
    if not formals:
        return True
    formal = formals[min(index, len(formals) - 1)]
    for constraint in schema.type_constraints:
        if constraint.type_param_str == formal.type_str:
            return _HALF_TYPE in constraint.allowed_type_strs
    return formal.type_str == _HALF_TYPE


def _schema(node: onnx.NodeProto, opsets: dict[str, int]) -> defs.OpSchema:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    try:
        return defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except defs.SchemaError as exc:
        raise HalpError(f"cannot convert node {node.name or node.op_type!r} to float16: op "
                        f"{domain or 'ai.onnx'}::{node.op_type} has no ONNX schema at opset "
                        f"{opsets.get(domain)}; build this model at fp32") from exc


def _half_tensor(tensor: TensorProto) -> TensorProto:
    """A float32 tensor (embedded data) as float16, same name."""
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16),
                                   name=tensor.name)


def _convert_attributes(node: onnx.NodeProto) -> None:
    """Float32 constants and type targets carried by the node itself."""
    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_half_tensor(attr.t))
        elif attr.type == AttributeProto.TENSORS:
            for i, t in enumerate(attr.tensors):
                if t.data_type == FLOAT:
                    attr.tensors[i].CopyFrom(_half_tensor(t))
        elif (attr.type == AttributeProto.INT and attr.i == FLOAT
              and (attr.name == "dtype" or (node.op_type == "Cast" and attr.name == "to"))):
            attr.i = HALF
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            values = [attr.f] if attr.name == "value_float" else list(attr.floats)
            array = np.asarray(values, np.float16).reshape(() if attr.name == "value_float"
                                                           else (-1,))
            attr.CopyFrom(helper.make_attribute("value", numpy_helper.from_array(array)))
        if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            raise HalpError(f"cannot convert node {node.name or node.op_type!r} to float16: "
                            "graphs with subgraphs (If/Loop/Scan) are not supported; build "
                            "this model at fp32")


def _to_float(node: onnx.NodeProto) -> bool:
    return any(a.name == "to" and a.i == FLOAT for a in node.attribute)


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name that shape inference (or the graph) can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # an untypable graph: fall back on what the graph declares
        inferred = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in itertools.chain(inferred.input, inferred.output, inferred.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:  # Constants of a float value_float(s): typed here too
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name in ("value_float", "value_floats") or (
                        attr.name == "value" and attr.t.data_type == FLOAT):
                    types[node.output[0]] = FLOAT
    return types


def _convert_graph(model: onnx.ModelProto) -> set[str]:
    """Retype ``model`` (a copy the caller owns) in place, converting the data of its embedded
    initializers; returns the names of the external initializers retyped to float16, whose
    data the caller holds."""
    graph = model.graph
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    types = _float_types(model)
    inits = {t.name: t for t in graph.initializer}
    # the uses (node index, input index) of float32 tensors that must stay float32 (the schema
    # takes tensor(float) only there), and the tensors that some use reads as float16
    pinned: dict[str, set[tuple[int, int]]] = {}
    free: set[str] = set()
    for k, node in enumerate(graph.node):
        schema = _schema(node, opsets)
        for i, name in enumerate(node.input):
            if name and types.get(name) == FLOAT:
                if _admits_half(schema, list(schema.inputs), i):
                    free.add(name)
                else:
                    pinned.setdefault(name, set()).add((k, i))
        for i, name in enumerate(node.output):
            if name and types.get(name) == FLOAT and not _admits_half(
                    schema, list(schema.outputs), i):
                raise HalpError(f"cannot convert node {node.name or node.op_type!r} to float16: "
                                f"{node.op_type} output {i} is float32 only; build this model "
                                "at fp32")
    # float32 initializers: float16 unless an fp32-only slot reads them; one read both ways
    # keeps its fp32 tensor for those slots and gains an fp16 copy for the others
    kept = {n for n in pinned if n in inits and inits[n].data_type == FLOAT}
    for name in sorted(kept & free):
        copy = graph.initializer.add()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}__fp16"
        for k, node in enumerate(graph.node):
            for i, used in enumerate(node.input):
                if used == name and (k, i) not in pinned[name]:
                    node.input[i] = copy.name
    # a Constant (or a Cast to fp32) that only fp32-only slots read stays as it is
    steady = {k for k, node in enumerate(graph.node)
              if (node.op_type == "Constant" or (node.op_type == "Cast" and _to_float(node)))
              and node.output[0] in pinned and node.output[0] not in free}
    kept |= {graph.node[k].output[0] for k in steady}
    # other computed tensors and graph inputs that an fp32-only slot reads: a Cast to fp32
    casts: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for k, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            if name in pinned and name not in kept and (k, i) in pinned[name]:
                if name not in casts:
                    casts[name] = f"{name}__fp32"
                    nodes.append(helper.make_node("Cast", [name], [casts[name]], to=FLOAT,
                                                  name=f"{name}__to_fp32"))
                node.input[i] = casts[name]
        if k not in steady:
            _convert_attributes(node)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for value in itertools.chain(graph.input, graph.output, graph.value_info):
        if value.type.tensor_type.elem_type == FLOAT and value.name not in kept:
            value.type.tensor_type.elem_type = HALF
    external = set()
    for tensor in graph.initializer:
        if tensor.data_type != FLOAT or tensor.name in kept:
            continue
        if tensor.data_location == TensorProto.EXTERNAL:
            tensor.data_type = HALF
            external.add(tensor.name)
        else:
            tensor.CopyFrom(_half_tensor(tensor))
    return external


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` (self-contained): every float32 input, output, initializer,
    constant, value info and cast target is float16, except where the op's ONNX schema takes
    only ``tensor(float)``. A model without float32 tensors comes back unchanged (a copy).
    HalpError for what it cannot convert (subgraphs, ops without a schema, float32-only
    outputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if _convert_graph(out):
        raise HalpError("to_float16 takes a self-contained model; convert a graph with "
                        "external weights with detached_to_float16")
    return out


def detached_to_float16(graph: DetachedModel) -> DetachedModel:
    """:func:`to_float16` for a graph whose weights travel beside it: the external weights are
    cast in memory, never serialized."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    halved = _convert_graph(model)
    weights = {name: value.astype(np.float16) if name in halved else value
               for name, value in graph.weights.items()}
    return DetachedModel(model, weights)


def is_float16(model: onnx.ModelProto) -> bool:
    """Whether the model's graph inputs and outputs hold no float32 tensor (already converted,
    or typed so by its producer)."""
    return not any(v.type.tensor_type.elem_type == FLOAT
                   for v in itertools.chain(model.graph.input, model.graph.output))
