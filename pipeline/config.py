"""The settings of a pruning run and the argument checks behind them, free of torch.

A bad argument should cost a fraction of a second, not a trained baseline: `halp` builds its flags
and refuses bad values with this module alone, before torch loads, and the library checks the
same settings whenever a :class:`PruneConfig` is made. Each setting's default, help text, parser
and check live in one place, its field; ``halp prune``'s flags are generated from the fields.
"""

from __future__ import annotations

import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import backends, kinds
from .errors import ConfigError, ShapeError

#: a check takes a parsed value and raises ConfigError saying what is wrong with it; the
#: message reads after the setting's name ("--samples must be at least 2, not 1")
Check = typing.Callable[[Any], None]

BACKENDS = tuple(backends.BACKENDS)
#: the backends with an engine format: :func:`pipeline.backends.engine_builders` imports their
#: modules (and torch) to find them, too slow for argument checks; a test keeps the two in step
DEPLOY_BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = tuple(p.value for p in kinds.Precision)
SOLVERS = tuple(s.value for s in kinds.Solver)
TASKS = ("classification", "detection")


def check_removal(solver: str, block_removal: bool) -> None:
    """ConfigError where block removal is asked of the decoupled solver, which cannot remove a
    block (it keeps a unit a group)."""
    if block_removal and solver == "decoupled":
        raise ConfigError("block removal needs a coupled solver (coupled or highs): the "
                          "decoupled knapsack never removes a block")


_SHAPE = re.compile(r"^\d+(x\d+)+$")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` → ``(1, 3, 224, 224)``; anything else is a clear error."""
    cleaned = text.strip().lower().replace("×", "x").replace(",", "x")
    if not _SHAPE.match(cleaned):
        raise ShapeError(
            f"input shape {text!r} is malformed: give positive integers joined by 'x', "
            "batch first, e.g. 1x3x224x224"
        )
    dims = tuple(int(d) for d in cleaned.split("x"))
    if any(d <= 0 for d in dims):
        raise ShapeError(f"input shape {text!r} has a zero dimension; every dimension must be >= 1")
    return dims


def parse_points(text: str) -> int | None:
    """Grid points per channel axis: a count, or ``all`` (None: every multiple of the step)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a whole number or 'all'") from None


# --- checks -------------------------------------------------------------------------------------


def at_least(low: int) -> Check:
    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"must be a whole number of at least {low}, not {value!r}")

    return check


def positive(value: Any) -> None:
    """A finite number above zero (rates, milliseconds)."""
    if not _finite(value) or value <= 0:
        raise ConfigError(f"must be a finite number above 0, not {value!r}")


def non_negative(value: Any) -> None:
    if not _finite(value) or value < 0:
        raise ConfigError(f"must be a finite number of at least 0, not {value!r}")


def fraction(value: Any) -> None:
    """A share (of the dense latency, of the fine-tuning): 0 < value <= 1."""
    if not _finite(value) or not 0 < value <= 1:
        raise ConfigError(f"must be a fraction in (0, 1], not {value!r}")


def image_shape(value: Any) -> None:
    """N x C x H x W: the pipeline trains and prunes image classifiers."""
    if len(value) != 4 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                              for d in value):
        raise ConfigError("must be an image batch shape N x C x H x W of positive whole "
                          f"numbers, e.g. 1x3x224x224, not {'x'.join(map(str, value))}")


def readable_file(value: Any) -> None:
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{str(value)!r} {what}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{str(value)!r} is not readable (permissions)")


def folder_path(value: Any) -> None:
    """An output folder: created when missing, but an existing file there is a mistake."""
    if Path(value).expanduser().is_file():
        raise ConfigError(f"{str(value)!r} is a file; give a folder to write into")


def file_path(value: Any) -> None:
    """An output file: written (atomically) when missing, but not over a folder."""
    if Path(value).expanduser().is_dir():
        raise ConfigError(f"{str(value)!r} is a folder; give a file name to write")


def table_or_auto(value: Any) -> None:
    if value != "auto":
        readable_file(value)


def model_spec(value: Any) -> None:
    """Only what needs no torch: a saved-model path must exist (names are checked on loading)."""
    if Path(str(value)).suffix in {".pt", ".pth"}:
        readable_file(value)


def dataset(value: Any) -> None:
    """An ImageFolder root needs train/ and val/, a COCO root its annotations (the spec's form
    is checked on loading)."""
    kind, _, root = str(value).partition(":")
    folder = Path(root).expanduser()
    if kind == "imagefolder" and root:
        for part in ("train", "val"):
            if not (folder / part).is_dir():
                raise ConfigError(f"{value!r}: dataset folder {root} has no '{part}' "
                                  f"sub-folder; expected {root}/{part}/<class>/<image files>")
    if kind == "coco" and root and not any(
            (folder / sub / "annotations.json").is_file() for sub in ("", "train")):
        raise ConfigError(f"{value!r}: no {root}/annotations.json (or {root}/train/ and "
                          f"{root}/val/annotations.json); give a folder of COCO annotations "
                          "and images")


def choice(*options: str) -> Check:
    def check(value: Any) -> None:
        if value not in options:
            raise ConfigError(f"must be one of {', '.join(options)}, not {value!r}")

    return check


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- the run's settings -------------------------------------------------------------------------


def option(default: Any = MISSING, doc: str = "", *, parse: Callable[[str], Any] | None = None,
           check: Check | None = None, flag: str | None = None, choices: tuple[str, ...] = (),
           group: str | None = None) -> Any:
    """A PruneConfig field with its command-line form: ``parse`` turns the flag's text into the
    value (default: the type of ``default``), ``check`` refuses a bad value (None always passes),
    ``flag`` overrides ``--field-name``, fields sharing a ``group`` are mutually exclusive."""
    if choices:
        check = choice(*choices)
    metadata = {"doc": doc, "parse": parse, "check": check, "flag": flag, "choices": choices,
                "group": group}
    return field(default=default, metadata=metadata)


@dataclass
class PruneConfig:
    """Everything `halp prune` needs; checked on creation (:meth:`validate`)."""

    model: str = option(doc="torchvision name, module:callable or saved nn.Module",
                        check=model_spec)
    data: str = option(doc="classification: digits | imagefolder:PATH (train/ and val/); "
                       "detection: scenes | scenes:N | coco:PATH", check=dataset)
    input_shape: tuple[int, ...] = option(doc="input shape, e.g. 1x3x224x224", parse=parse_shape,
                                          check=image_shape, flag="input")
    out: Path = option(doc="output folder (e.g. engines/<name>)", parse=Path, check=folder_path)
    task: str = option("classification", "what the model does: classification, or detection "
                       "(a torchvision one-stage detector: HALP prunes backbone and heads, "
                       "trains with the detector's losses, scores mAP)", choices=TASKS)
    lut: str = option("auto", "latency table, or auto: build for --backend and cache under "
                      "--lut-cache", check=table_or_auto)
    checkpoint: str | None = option(None, "trained weights (state_dict); without it a baseline "
                                    "is trained first (cached in --out)", check=readable_file)
    backend: str = option("onnxruntime", "runtime to time and deploy with",
                          choices=DEPLOY_BACKENDS)
    precision: str = option("fp32", "engine precision", choices=PRECISIONS)
    threads: int | None = option(None, "CPU threads for onnxruntime", parse=int,
                                 check=at_least(1))
    target: float | None = option(0.5, "latency target as a fraction of the dense model",
                                  parse=float, check=fraction, group="target")
    target_ms: float | None = option(None, "latency target in ms (instead of --target)",
                                     parse=float, check=positive, group="target")
    baseline_epochs: int = option(10, "epochs to train a baseline when no --checkpoint is given",
                                  check=at_least(0))
    epochs: int = option(6, "HALP fine-tuning epochs (pruning steps in their first part, "
                         "recovery in the rest)", check=at_least(1))
    steps: int = option(10, "pruning steps", check=at_least(1))
    prune_span: float = option(0.3, "share of the fine-tuning iterations the pruning steps are "
                               "spread over; the rest recovers at the final architecture",
                               parse=float, check=fraction)
    solver: str = option("coupled", "knapsack solver: coupled (every layer at its true "
                         "cin/cout; never worse than decoupled), decoupled (HALP's), highs "
                         "(the coupled MILP, slow reference)", choices=SOLVERS)
    block_removal: bool = option(False, "let the coupled solver remove whole residual blocks "
                                 "whose skip is the identity (MDP's depth pruning; `halp "
                                 "analyze` lists them): their layers leave the network",
                                 flag="remove-blocks")
    lr: float = option(0.05, "baseline learning rate", check=positive)
    finetune_lr: float = option(0.01, "fine-tuning learning rate", check=positive)
    batch_size: int = option(64, "training batch size", check=at_least(1))
    lut_step: int | None = option(None, "LUT channel step when --lut auto builds one, also the "
                                  "pruning unit (default: the backend's channel block)",
                                  parse=int, check=at_least(1))
    lut_max_points: int | None = option(8, "LUT grid points per channel axis when --lut auto "
                                        "builds one ('all': every multiple of the step)",
                                        parse=parse_points, check=at_least(2))
    lut_passes: int = option(3, "measurements per LUT point, in separately shuffled passes, when "
                             "--lut auto builds one: a noisy point misleads the knapsack",
                             check=at_least(1))
    seed: int = option(0, "random seed (data order, initial weights, sampled inputs)")
    lut_cache: Path = option(Path("luts/cache"), "where --lut auto keeps tables, keyed by device",
                             check=folder_path)
    relax_target: bool = option(False, "raise an infeasible target to the smallest feasible one "
                                "(with a margin) and say so, instead of stopping the run")
    allow_lut_mismatch: bool = option(False, "use a --lut measured with another backend, "
                                      "precision or device (its latencies may not transfer)")
    train_device: str | None = option(None, "device to train on (default: cuda when available, "
                                      "else cpu)", parse=str)

    def __post_init__(self) -> None:
        if self.target_ms is not None:  # milliseconds win: the fraction's default is moot
            self.target = None
        self.input_shape = tuple(self.input_shape)
        self.out, self.lut_cache = Path(self.out), Path(self.lut_cache)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad setting; runs before any training."""
        for f in fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if check is not None and value is not None:
                try:
                    check(value)
                except ConfigError as exc:
                    raise ConfigError(f"{f.name} {exc}") from None
        if self.target is None and self.target_ms is None:
            raise ConfigError("give a latency target: target (a fraction of the dense latency) "
                              "or target_ms")
        check_removal(self.solver, self.block_removal)
