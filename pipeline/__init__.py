"""HALP: latency-aware structural pruning for TensorRT / ONNX Runtime deployment."""

__version__ = "0.1.0"
