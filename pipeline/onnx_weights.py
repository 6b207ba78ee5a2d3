"""ONNX graphs whose large weights travel beside the protobuf instead of inside it.

A packed table point holds as many weights as the whole network (tens of MB, see
:func:`pipeline.onnx_layers.copies_for`). Copying them into a ``ModelProto``, serializing it and
having the runtime parse it back was half of a point's cost on a CPU. A :class:`DetachedModel`
names each weight as external data instead; ONNX Runtime takes the arrays in memory
(``SessionOptions.add_external_initializers``), and :meth:`DetachedModel.embedded` gives the
self-contained model for runtimes that need one (TensorRT's ONNX parser).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: initializers smaller than this stay inside the graph (constants of activations, shapes)
MIN_DETACHED_ELEMENTS = 1024


def initializer(name: str, value: np.ndarray, *, detach: bool) -> TensorProto:
    """``value`` as a graph initializer: embedded, or (``detach`` and large enough) a reference
    to external data named after it, whose bytes a :class:`DetachedModel` carries."""
    if not detach or value.size < MIN_DETACHED_ELEMENTS:
        return numpy_helper.from_array(value, name=name)
    tensor = TensorProto(name=name, dims=value.shape,
                         data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
                         data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=name)
    return tensor


@dataclass(frozen=True)
class DetachedModel:
    """``model`` with its large initializers as external references; ``weights`` holds their
    values by initializer name."""

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]

    def embedded(self) -> onnx.ModelProto:
        """The same model with every weight inside it."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        inits = [numpy_helper.from_array(self.weights[t.name], name=t.name)
                 if t.name in self.weights else t for t in model.graph.initializer]
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
        return model
