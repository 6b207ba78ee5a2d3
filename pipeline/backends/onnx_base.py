"""What backends that deploy ONNX share: a layer is its single-layer graph, a network its export.

Kept out of :mod:`pipeline.backends` itself because the layer graphs need onnx, and the package
root must stay light enough for reading a table. Torch comes in only when a torch network is
timed (:meth:`OnnxBackend.module_timer` exports it), so timing layers and ONNX files needs no
torch (:mod:`pipeline.device`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import HalpError
from ..kinds import Precision
from ..onnx_layers import layer_inputs, packed_graph
from ..onnx_weights import DetachedModel
from ..spec import LayerSpec
from .timing import Measurement, TimingSettings

if TYPE_CHECKING:
    import torch
    from torch import nn


def onnx_bytes(model: onnx.ModelProto | bytes | str | os.PathLike[str]) -> bytes:
    """Serialized ONNX from a proto, bytes or a file path (a missing file is a clear error)."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    path = Path(model)
    if not path.is_file():
        raise HalpError(f"ONNX model {str(path)!r} does not exist; export one with "
                        "pipeline.export.to_onnx or check the path")
    return path.read_bytes()


class OnnxBackend(ABC):
    """A :class:`~pipeline.backends.capabilities.LayerTimer` and
    :class:`~pipeline.backends.capabilities.NetworkTimer` on top of the subclass's
    ``onnx_timer`` (an :class:`~pipeline.backends.capabilities.OnnxTimer`)."""

    name: str
    precision: Precision
    settings: TimingSettings
    #: which outputs a packed layer graph keeps (:func:`~pipeline.onnx_layers.packed_model`)
    packed_outputs = "one"
    #: whether the runtime keeps feature maps in a blocked layout and converts them around
    #: per-channel products (:func:`~pipeline.onnx_layers.packed_graph`'s ``blocked``)
    blocked_layout = False

    @abstractmethod
    def onnx_timer(self, model: onnx.ModelProto | bytes | str | os.PathLike[str],
                   inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """Prepare ``model`` once; each call of the result times one inference on ``inputs``
        (name -> array) again."""

    def time_onnx(self, model: onnx.ModelProto | bytes | str | os.PathLike[str],
                  inputs: dict[str, np.ndarray]) -> Measurement:
        return self.onnx_timer(model, inputs)()

    def time_layer(self, layer: LayerSpec, cin: int, cout: int,
                   copies: int = 1) -> Measurement:
        graph = packed_graph(layer, cin, cout, copies, outputs=self.packed_outputs,
                             blocked=self.blocked_layout)
        inputs = layer_inputs(layer, cin, cout)
        packed = self.detached_timer(graph, inputs)()
        return packed.less(self.fixed_cost(layer, cin, cout, inputs)).per_copy(copies)

    def fixed_cost(self, layer: LayerSpec, cin: int, cout: int,
                   inputs: dict[str, np.ndarray]) -> float:
        """Milliseconds of a packed graph's run that no copy causes
        (:func:`~pipeline.onnx_layers.fixed_part`), subtracted before the run is divided
        among the copies; 0 where the runtime's own overhead is negligible or too costly to
        measure separately (a second engine build per point on TensorRT)."""
        return 0.0

    def detached_timer(self, graph: DetachedModel,
                       inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """:meth:`onnx_timer` for a graph whose weights travel beside it; runtimes that can
        take them from memory override this and skip the protobuf round trip."""
        return self.onnx_timer(graph.embedded(), inputs)

    def time_module(self, model: nn.Module, example_input: torch.Tensor) -> Measurement:
        return self.module_timer(model, example_input)()

    def module_timer(self, model: nn.Module,
                     example_input: torch.Tensor) -> Callable[[], Measurement]:
        """Export and prepare once; each call times the prepared network again."""
        from ..export import to_onnx  # export pulls in torch.onnx: only when a network is timed

        proto = to_onnx(model, example_input, check=False)
        inputs = {proto.graph.input[0].name: example_input.cpu().numpy()}
        return self.onnx_timer(proto, inputs)
