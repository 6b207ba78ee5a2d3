"""Model and input-shape loading shared by every command.

A model spec is a torchvision model name (``resnet50``), ``module:callable`` (called with no
arguments), or a path to a whole ``nn.Module`` saved with ``torch.save``. Shapes are parsed in
:mod:`pipeline.config` (torch-free, for the CLI's early checks) and re-exported here.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

import torch
import torchvision
from torch import nn

from .config import parse_shape
from .errors import ModelLoadError

__all__ = ["load_checkpoint", "load_detector", "load_model", "parse_shape", "torchvision_names"]


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models())


def load_model(spec: str, *, num_classes: int | None = None) -> nn.Module:
    """The network HALP prunes for ``spec`` (randomly initialised for torchvision names): the
    model itself, or a detector's deployable core (:mod:`pipeline.detection.core`)."""
    from .detection.core import deployable

    return deployable(_network(spec, num_classes))


def load_detector(spec: str, *, num_classes: int) -> nn.Module:
    """The whole detector named by ``spec``, losses and post-processing included, to train."""
    from .detection.core import check_one_stage

    model = _network(spec, num_classes)
    check_one_stage(model)
    return model


def _network(spec: str, num_classes: int | None) -> nn.Module:
    path = Path(spec)
    if path.suffix in {".pt", ".pth"} or path.is_file():
        return _load_saved(path)
    if ":" in spec:
        return _load_callable(spec)
    names = torchvision_names()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelLoadError(
            f"unknown model {spec!r}: not a torchvision model name, 'module:callable' or a saved "
            f"model file.{hint} List all names with `halp models`."
        )
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if spec in {"googlenet", "inception_v3"}:
        kwargs["init_weights"] = True
    if spec in torchvision.models.list_models(module=torchvision.models.detection):
        kwargs["weights_backbone"] = None  # nothing is downloaded; train it or load weights
    try:
        return torchvision.models.get_model(spec, weights=None, **kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"torchvision model {spec!r} does not accept {kwargs}: {exc}") from exc


def _load_saved(path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"could not load {path} with torch.load: {exc}") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise ModelLoadError(
            f"{path} holds a state_dict, not a model: pass the architecture with --model NAME "
            f"and the weights with --checkpoint {path}"
        )
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


def _load_callable(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import module {module_name!r} from {spec!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by ``halp`` (a dict with ``model``) or a plain state_dict."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"checkpoint {path} does not fit the model (wrong architecture or class count): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model
