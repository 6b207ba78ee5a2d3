"""User-facing error types.

Every error raised to a user says what was wrong and what to do about it; the CLI prints the
message of any :class:`HalpError` without a traceback and exits non-zero.
"""

from __future__ import annotations


class HalpError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ModelLoadError(HalpError):
    """The model spec names no known model, or the file/callable could not be loaded."""


class ConfigError(HalpError):
    """A setting is out of range, or names a file or folder that is missing or of the wrong kind."""


class ShapeError(HalpError):
    """An input shape string is malformed."""


class StructureError(HalpError):
    """Torch-Pruning could not trace the model, or the traced structure is inconsistent."""


class UnsupportedLayer(HalpError):
    """A layer kind the latency model cannot represent."""


class LutError(HalpError):
    """A latency table is malformed, truncated or of an unknown format."""


class LutMismatch(LutError):
    """A latency table was built for another backend, precision, device or model."""


class InfeasibleBudget(HalpError):
    """No architecture fits the latency budget; ``minimum`` is the cheapest achievable cost."""

    def __init__(self, message: str, minimum: float):
        super().__init__(message)
        self.minimum = minimum


class NotCoupled(HalpError):
    """The network cannot be priced as a coupled knapsack: a layer touches more than two sized
    groups, or the group graph is too densely coupled to eliminate."""


class BackendUnavailable(HalpError):
    """A runtime backend cannot be used on this machine (missing package or device)."""


class DataError(HalpError):
    """A dataset spec or folder is missing or malformed."""


class ExportMismatch(HalpError):
    """An exported model's outputs differ from the PyTorch model's."""
