"""Device identity: which machine a table was measured on, and what follows from its kind.

A table's ``device_key`` names a device *model* (a CPU model at a thread count, a GPU model at a
compute capability), so tables built on identical boxes merge and a table is refused on another
kind of machine. Every backend builds its key here, so keys of the same device agree.
"""

from __future__ import annotations

import os
import platform
import re

from ..errors import HalpError
from ..kinds import DeviceKind


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def simd_channels() -> int:
    """Channels a CPU convolution kernel processes at once: oneDNN and ONNX Runtime's MLAS
    block channels by 16 with AVX-512 and by 8 otherwise, so latency rises in steps of that."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8


def channel_step(kind: DeviceKind) -> int:
    """A backend's LUT grid step and pruning unit: the CPU kernel's channel block, or the 8
    channels FP16/INT8 tensor-core kernels take at once on a GPU."""
    return simd_channels() if kind == DeviceKind.CPU else 8


def default_threads() -> int:
    """Physical cores this process may use: SMT siblings slow conv kernels more than they help."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            phys = ""
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    cores.add((phys, value.strip()))
    except OSError:
        pass
    return max(1, min(usable or 1, len(cores) or usable or 1))


def thread_count(threads: int | None) -> int:
    """The CPU threads a backend pins: ``threads``, or :func:`default_threads` when None."""
    if threads is not None and threads < 1:
        raise HalpError(f"threads must be >= 1, got {threads}")
    return threads or default_threads()


def slug(text: str, limit: int = 40) -> str:
    """A short lowercase id fragment: ``"Intel(R) Xeon(R) CPU @ 2.20GHz"`` becomes
    ``intel-xeon-cpu-2-20ghz``."""
    cleaned = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", cleaned).strip("-")[:limit].rstrip("-") or "unknown"


def cpu_key(threads: int) -> str:
    """``cpu-<model>-t<threads>``: a CPU's latencies depend on how many cores run a layer."""
    return f"{DeviceKind.CPU}-{slug(cpu_name())}-t{threads}"


def cuda_key(name: str, capability: tuple[int, int] | None = None) -> str:
    """``cuda-<model>-sm<major><minor>``, or ``cuda-<model>`` without a compute capability
    (ONNX Runtime's CUDA tables: it reports none, and their keys must stay what they were)."""
    sm = f"-sm{capability[0]}{capability[1]}" if capability else ""
    return f"{DeviceKind.CUDA}-{slug(name)}{sm}"


def kind_of(device_key: str) -> DeviceKind:
    """The kind of device a key (:func:`cpu_key`, :func:`cuda_key`) names, e.g. a table's."""
    return DeviceKind.CUDA if device_key.startswith(DeviceKind.CUDA) else DeviceKind.CPU
