"""Single-layer ONNX graphs: one LUT point is the latency of one of these on the target.

Each graph is the layer the way a deployed engine runs it: the convolution / linear op with its
bias (a conv bias or a BatchNorm folded into one) and the activation engines fuse into it. The
graphs are built directly with ``onnx.helper`` rather than exported from torch, so building a
LUT of thousands of points costs microseconds per graph. Torch-free (numpy and onnx), so a
device without torch generates them too (:mod:`pipeline.device`); the same layers in eager
torch, with the same weights, are :func:`pipeline.torch_layers.torch_layer`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import context_ops
from .errors import UnsupportedLayer
from .kinds import OpKind
from .onnx_context import NCHWC_DOMAIN, activation_nodes, onnx_nodes
from .onnx_weights import DetachedModel, initializer
from .spec import LayerSpec

ACTIVATIONS = context_ops.ACTIVATIONS
OPS = tuple(OpKind)
#: most copies of one layer in a packed graph (:func:`copies_for`): enough to stream a large
#: network's weights past a small layer, few enough that building the graph stays cheap
MAX_COPIES = 64
#: most parameters in one packed graph: 1 GiB of fp32 weights, well below protobuf's 2 GiB
MAX_PACKED_PARAMS = 1 << 28
#: how far rounding a point's working set up to whole copies may overshoot it before the point
#: is also timed at the whole count below and priced between the two (:func:`copies_span`):
#: vgg11_bn's 411 MB classifier layer is 1.25 copies of its working set, and two copies
#: streamed 1.6x the network's weights through the caches
BRACKET_OVERSHOOT = 0.1
#: multiply-accumulates per weight above which a layer is compute-bound on CPUs and GPUs alike
#: (a 3x3 convolution at 7x7 output does 49; the memory-bound late layers of a small input, 1x1
#: projections and classifier heads do 1 to 16): where its weights come from hardly changes its
#: time, so its copies stop at ``MAX_PACKED_MACS`` and the table stays quick to build
COMPUTE_BOUND = 32
#: most multiply-accumulates in one packed graph of a compute-bound layer (about a millisecond
#: on one CPU core)
MAX_PACKED_MACS = 1 << 26
#: multiply-accumulates per weight below which a compute-bound layer still waits for its
#: weights when they come from memory rather than from a cache. Measured on a Xeon (1 thread,
#: resnet50 at 224x224): streamed as in the network instead of hot, a convolution at 7x7
#: output (49 per weight) took 1.22-1.25x as long, at 14x14 (196) 1.08x, at 28x28 (784) 1.03x
COLD_INTENSITY = 512
#: most multiply-accumulates in the packed graph that measures how much slower such a layer
#: runs with its weights streamed (:mod:`pipeline.lut.cold`)
COLD_MACS = 16 * MAX_PACKED_MACS



def groups_at(layer: LayerSpec, cin: int, cout: int) -> int:
    """Validate the layer at (cin, cout) and return its group count there."""
    if layer.op not in OPS:
        raise UnsupportedLayer(f"{layer.name}: op {layer.op!r} is not one of {', '.join(OPS)}")
    if layer.act is not None and layer.act not in ACTIVATIONS:
        raise UnsupportedLayer(
            f"{layer.name}: activation {layer.act!r} is not one of {', '.join(ACTIVATIONS)}"
        )
    if cin < 1 or cout < 1:
        raise UnsupportedLayer(f"{layer.name}: channel counts must be >= 1, got ({cin}, {cout})")
    if layer.op == "linear":
        return 1
    if len(layer.kernel) not in (1, 2, 3) or len(layer.in_hw) != len(layer.kernel):
        raise UnsupportedLayer(
            f"{layer.name}: only 1-D/2-D/3-D convolutions with matching input sizes are "
            f"supported (kernel {layer.kernel}, input {layer.in_hw})"
        )
    depthwise = layer.op == "dwconv" or (
        layer.groups > 1 and layer.groups == layer.cin == layer.cout
    )
    if depthwise and cin != cout:
        raise UnsupportedLayer(
            f"{layer.name}: a depthwise layer needs cin == cout, got ({cin}, {cout})"
        )
    groups = cout if depthwise else layer.groups
    if cin % groups or cout % groups:
        raise UnsupportedLayer(
            f"{layer.name}: groups={groups} must divide cin={cin} and cout={cout}; "
            "grouped convolutions keep their channel counts"
        )
    return groups


def _weight_shape(layer: LayerSpec, cin: int, cout: int, groups: int) -> tuple[int, ...]:
    """Torch layout: conv (cout, cin/g, *k), deconv (cin, cout/g, *k), linear (cout, cin)."""
    if layer.op == "linear":
        return (cout, cin)
    if layer.op == "deconv":
        return (cin, cout // groups, *layer.kernel)
    return (cout, cin // groups, *layer.kernel)


def layer_weights(layer: LayerSpec, cin: int, cout: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random weights (and bias when ``layer.bias``) in torch layout.

    Unit variance scaled by 1/sqrt(fan-in), so a unit-variance input gives outputs of order
    one: values stay finite in fp16 and comparisons against torch stay meaningful. Uniform, not
    normal: drawing them is a third of a table point's preparation, and uniform draws are three
    times faster.
    """
    groups = groups_at(layer, cin, cout)
    shape = _weight_shape(layer, cin, cout, groups)
    rng = np.random.default_rng(seed)
    fan_in = cin // groups * math.prod(layer.kernel)  # kernel is () for linear
    out = {"weight": _uniform(rng, shape, 1.0 / math.sqrt(fan_in))}
    if layer.bias:
        out["bias"] = _uniform(rng, (cout,), 0.1)
    return out


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """float32 draws of mean 0 and standard deviation ``std``."""
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(std * 12 ** 0.5)


def _input_shape(layer: LayerSpec, cin: int) -> tuple[int, ...]:
    if layer.pre:  # the prologue pools a feature map of this size first
        return (layer.batch, cin, *context_ops.input_hw(layer.pre, layer.in_hw))
    if layer.op == "linear":
        return (layer.batch, *layer.in_hw, cin)
    return (layer.batch, cin, *layer.in_hw)


def _context_inputs(layer: LayerSpec, cout: int) -> dict[str, tuple[int, ...]]:
    """The epilogue's other operands (a residual, a feature map to scale), by input name."""
    return context_ops.extra_inputs(layer.post, layer.batch, cout, _out_hw(layer))


def layer_input(layer: LayerSpec, cin: int, seed: int = 0) -> np.ndarray:
    """A seeded standard-normal input ``x`` of the layer's shape at ``cin`` input channels."""
    rng = np.random.default_rng([seed, 1])  # independent of the weight stream of the same seed
    return rng.standard_normal(_input_shape(layer, cin), dtype=np.float32)


def layer_inputs(layer: LayerSpec, cin: int, cout: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every input of the layer's graph: ``x`` and its epilogue's other operands."""
    rng = np.random.default_rng([seed, 2])
    return {"x": layer_input(layer, cin, seed),
            **{name: rng.standard_normal(shape, dtype=np.float32)
               for name, shape in _context_inputs(layer, cout).items()}}


def _out_hw(layer: LayerSpec) -> tuple[int, ...]:
    """Spatial output size from the geometry (not trusted from ``layer.out_hw``)."""
    if layer.op == "linear":
        return tuple(layer.in_hw)
    dims = []
    for i, size in enumerate(layer.in_hw):
        k, s, p, d = layer.kernel[i], layer.stride[i], layer.padding[i], layer.dilation[i]
        if layer.op == "deconv":
            op = layer.output_padding[i] if layer.output_padding else 0
            dims.append((size - 1) * s - 2 * p + d * (k - 1) + op + 1)
        else:
            dims.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(dims)


def _output_shape(layer: LayerSpec, cout: int) -> tuple[int, ...]:
    if layer.op == "linear":
        return (layer.batch, *layer.in_hw, cout)
    return (layer.batch, cout, *context_ops.output_hw(layer.post, _out_hw(layer)))


def _main_nodes(layer: LayerSpec, groups: int, weights: dict[str, np.ndarray],
                out: str, pre: str = "",
                src: str = "x") -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The conv/linear node(s) reading ``src`` and writing ``out``, and their initializers in
    ONNX layout; every other name starts with ``pre``."""
    has_bias = "bias" in weights
    if layer.op == "linear" and layer.in_hw:  # token dims: Gemm only takes 2-D inputs
        inits = {f"{pre}weight_t": np.ascontiguousarray(weights["weight"].T)}
        nodes = [helper.make_node("MatMul", [src, f"{pre}weight_t"],
                                  [f"{pre}xw" if has_bias else out])]
        if has_bias:
            inits[f"{pre}bias"] = weights["bias"]
            nodes.append(helper.make_node("Add", [f"{pre}xw", f"{pre}bias"], [out]))
        return nodes, inits
    weights = {f"{pre}{k}": v for k, v in weights.items()}
    inputs = [src, *weights]  # weight, then bias when present
    if layer.op == "linear":
        return [helper.make_node("Gemm", inputs, [out], transB=1)], weights
    attrs = dict(
        kernel_shape=list(layer.kernel),
        strides=list(layer.stride),
        pads=list(layer.padding) * 2,
        dilations=list(layer.dilation),
        group=groups,
    )
    if layer.op == "deconv" and any(layer.output_padding):
        attrs["output_padding"] = list(layer.output_padding)
    op_type = "ConvTranspose" if layer.op == "deconv" else "Conv"
    return [helper.make_node(op_type, inputs, [out], **attrs)], weights


def _layer_copy(layer: LayerSpec, cin: int, cout: int, groups: int,
                weights: dict[str, np.ndarray], out: str, pre: str, *,
                blocked: bool = False) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """One instance of the layer reading ``x``: its prologue, the conv/linear with bias and
    activation, its epilogue (:mod:`pipeline.layer_context`); ``blocked``: its products pay
    the runtime's layout conversions (:func:`~pipeline.onnx_context.onnx_nodes`)."""
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {}
    src = "x"
    if layer.pre:
        nodes, inits = onnx_nodes(layer.pre, src, f"{pre}in", f"{pre}pre_")
        src = f"{pre}in"
        if layer.op == "linear":  # pooled (N, C, 1, 1) to the (N, C) a linear layer reads
            nodes.append(helper.make_node("Flatten", [src], [f"{pre}flat"]))
            src = f"{pre}flat"
    core = f"{pre}z" if layer.act or layer.post else out
    more, own = _main_nodes(layer, groups, weights, core, pre, src)
    nodes, inits = nodes + more, {**inits, **own}
    if layer.act:
        act = f"{pre}a" if layer.post else out
        more, own = activation_nodes(layer.act, core, act, pre)
        nodes, inits, core = nodes + more, {**inits, **own}, act
    if layer.post:
        more, own = onnx_nodes(layer.post, core, out, f"{pre}post_",
                               blocked_products=cout if blocked else 0)
        nodes, inits = nodes + more, {**inits, **own}
    return nodes, inits


def _model(layer: LayerSpec, cin: int, cout: int, nodes: list[onnx.NodeProto],
           inits: dict[str, np.ndarray], outputs: list[tuple[str, tuple[int, ...]]],
           opset: int, *, detach: bool = False) -> onnx.ModelProto:
    inputs = {"x": _input_shape(layer, cin), **_context_inputs(layer, cout)}
    graph = helper.make_graph(
        nodes,
        f"halp_{layer.op}",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
         for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
         for name, shape in outputs],
        initializer=[initializer(k, v, detach=detach) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    ir_version = helper.find_min_ir_version_for(opsets)
    if any(n.domain == NCHWC_DOMAIN for n in nodes):  # a runtime's own domain: no IR minimum
        opsets.append(helper.make_opsetid(NCHWC_DOMAIN, 1))
    return helper.make_model(graph, opset_imports=opsets, producer_name="halp-pipeline",
                             ir_version=ir_version)


def layer_model(layer: LayerSpec, cin: int, cout: int, *, seed: int = 0,
                opset: int = 17) -> onnx.ModelProto:
    """The layer at (cin, cout) as a single-layer ONNX model: input ``x`` (and the feature maps
    its epilogue scales, :func:`layer_inputs`), output ``y``.

    Includes the bias when ``layer.bias``, ``layer.act`` fused after it and the context ops
    the engine runs with it (``layer.pre`` / ``layer.post``). The IR version is
    the lowest that carries ``opset``, so older runtimes (JetPack's ONNX Runtime / TensorRT
    parser) load it too.
    """
    groups = groups_at(layer, cin, cout)
    nodes, inits = _layer_copy(layer, cin, cout, groups, layer_weights(layer, cin, cout, seed),
                               "y", "")
    return _model(layer, cin, cout, nodes, inits, [("y", _output_shape(layer, cout))], opset)


def layer_params(layer: LayerSpec, cin: int, cout: int) -> int:
    """Weights and bias of the layer at (cin, cout): the bytes it streams per run, / 4."""
    groups_at(layer, cin, cout)  # refuses a (cin, cout) the layer cannot take
    return layer.params_at(cin, cout)


def intensity(layer: LayerSpec, cin: int, cout: int) -> float:
    """Multiply-accumulates per weight: the same at every (cin, cout) of a layer (its output
    positions times the batch), so it classes a whole table entry."""
    return layer.batch * layer.macs_at(cin, cout) / max(1, layer_params(layer, cin, cout))


def copies_for(layer: LayerSpec, cin: int, cout: int, working_set: int,
               max_copies: int = MAX_COPIES, max_macs: int = MAX_PACKED_MACS) -> int:
    """How many copies of the layer, each with its own weights, hold ``working_set``
    parameters or the least whole number above: :func:`copies_span` rounded up."""
    return math.ceil(copies_span(layer, cin, cout, working_set, max_copies, max_macs))


def copies_span(layer: LayerSpec, cin: int, cout: int, working_set: int,
                max_copies: int = MAX_COPIES, max_macs: int = MAX_PACKED_MACS) -> float:
    """How many copies of the layer, each with its own weights, hold ``working_set``
    parameters (a fraction where the layer does not divide it): the cache state of a layer
    inside a network of that many parameters.

    Inside a network, by the time a layer runs again every other layer's weights have passed
    through the caches; a lone layer timed back to back finds its own still there. Copies
    that together stream as many weights as the whole network reproduce the network's state,
    whatever the device's cache sizes: cold where the network's weights exceed the last-level
    cache, warm where they fit. Never more than ``max_copies`` or ``MAX_PACKED_PARAMS``; a
    compute-bound layer (:data:`COMPUTE_BOUND`) no more than ``max_macs`` allows.
    """
    own = max(1, layer_params(layer, cin, cout))
    macs = max(1, layer.batch * layer.macs_at(cin, cout))
    limit = min(max_copies, MAX_PACKED_PARAMS // own)
    if macs >= COMPUTE_BOUND * own:
        limit = min(limit, max_macs // macs)
    return float(max(1, min(limit, working_set / own)))


def packed_model(layer: LayerSpec, cin: int, cout: int, copies: int, *, seed: int = 0,
                 outputs: str = "one", blocked: bool = False,
                 opset: int = 17) -> onnx.ModelProto:
    """:func:`packed_graph` as one self-contained model."""
    return packed_graph(layer, cin, cout, copies, seed=seed, outputs=outputs, blocked=blocked,
                        opset=opset).embedded()


def packed_graph(layer: LayerSpec, cin: int, cout: int, copies: int, *, seed: int = 0,
                 outputs: str = "one", blocked: bool = False,
                 opset: int = 17) -> DetachedModel:
    """``copies`` instances of the layer at (cin, cout) in one graph, each with its own
    weights, all reading the one input ``x``: one run of it, divided by ``copies``, is what the
    layer costs inside a network (:func:`copies_for`).

    The input stays warm, as when the producing layer just wrote it. ``outputs="one"``: the
    copies' outputs stay in the runtime's own layout, as inside a network (ONNX Runtime runs
    nodes whose outputs nobody reads); the graph's output ``y`` is one value per channel of
    the first copy's (for a convolution; a linear layer's own output), so no run pays a layout
    conversion of a whole feature map that the network does not have. ``"all"``: every copy's
    output ``y``, ``y_1``, ... leaves the graph whole, for runtimes that remove unused layers
    (TensorRT). ``blocked``: the runtime computes feature maps in a blocked layout and
    per-channel products in NCHW, so each copy's product pays the two conversions the network
    pays around it (ONNX Runtime's NCHWc ops; :func:`~pipeline.onnx_context.onnx_nodes`).

    Every copy runs its own prologue on the shared input (a pooling before a squeeze-and-
    excitation layer or a classifier): a runtime that merges identical nodes must be told not
    to (ONNX Runtime: :data:`~pipeline.backends.onnxruntime.PACKED_DISABLED_OPTIMIZERS`), or
    the copies share one pooling that the network runs once per layer.
    """
    if copies < 1 or outputs not in ("one", "all"):
        raise ValueError(f"copies must be >= 1 and outputs 'one' or 'all' "
                         f"(got {copies}, {outputs!r})")
    groups = groups_at(layer, cin, cout)
    base = layer_weights(layer, cin, cout, seed)
    shape = _output_shape(layer, cout)
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {}
    corner = outputs == "one" and layer.op != "linear"
    names = ["y_0" if corner else "y"] + [f"y_{i}" for i in range(1, copies)]
    for i, out in enumerate(names):
        # distinct values: every copy really owns its memory (no runtime may share it)
        weights = {k: v * np.float32(1.0 + 1e-3 * i) if i else v for k, v in base.items()}
        more, own = _layer_copy(layer, cin, cout, groups, weights, out, f"c{i}_",
                                blocked=blocked)
        nodes += more
        inits.update(own)
    kept = [(n, shape) for n in (names if outputs == "all" else names[:1])]
    if corner:
        nodes.append(_corner("y_0", "y", shape[2:]))
        kept = [("y", (*shape[:2], *[1] * len(shape[2:])))]
    model = _model(layer, cin, cout, nodes, inits, kept, opset, detach=True)
    return DetachedModel(model, {t.name: inits[t.name] for t in model.graph.initializer
                                 if t.data_location == TensorProto.EXTERNAL})


def fixed_part(layer: LayerSpec, cin: int, cout: int, *, opset: int = 17) -> onnx.ModelProto:
    """What a run of a packed graph costs besides its copies: the same inputs, converted into
    the runtime's layout as the copies need them (and that only once per run), and one small
    output written, but no copy of the layer. A runtime whose run call and input conversion are
    a noticeable share of a one-copy point (ONNX Runtime: 0.01-0.03 ms against a 0.3 ms
    convolution) subtracts this from the packed graph's time; inside the network neither
    happens per layer (the call once per network, which the calibration constant holds)."""
    groups_at(layer, cin, cout)
    shape = _input_shape(layer, cin)
    if len(shape) > 2:
        node = _corner("x", "y", shape[2:])
        out = (*shape[:2], *[1] * len(shape[2:]))
    else:  # a linear layer's (N, C) input: the run call is all there is
        node, out = helper.make_node("Identity", ["x"], ["y"]), shape
    return _model(layer, cin, cout, [node], {}, [("y", out)], opset)


def _corner(src: str, out: str, spatial: tuple[int, ...]) -> onnx.NodeProto:
    """``out``: one value per channel of ``src`` (a 1-wide max pool striding over the whole
    map), so the graph's output costs nothing and needs no full layout conversion."""
    return helper.make_node("MaxPool", [src], [out], kernel_shape=[1] * len(spatial),
                            strides=[max(1, d) for d in spatial])
