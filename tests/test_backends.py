"""Backends: the shared timing protocol, real ONNX Runtime / torch timings, TensorRT's absence."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
from pipeline import engine
from pipeline.backends import (
    Backend,
    EngineBuilder,
    Measurement,
    OnnxTimer,
    TimingSettings,
    available,
    backend_class,
    engine_builders,
    get_backend,
)
from pipeline.backends.device import cpu_key, cuda_key, kind_of, slug
from pipeline.backends.timing import combine, measure
from pipeline.backends.torch import cuda_graph, deployable
from pipeline.errors import BackendUnavailable, HalpError, LutMismatch
from pipeline.export import to_onnx
from pipeline.kinds import DeviceKind, OpKind, Precision, Statistic
from pipeline.lut import LatencyTable, build_lut
from pipeline.onnx_layers import layer_input, layer_model
from pipeline.spec import LayerSpec
from pipeline.structure import analyze

FAST = {"warmup": 1, "repeats": 5, "warmup_ms": 0.0}


@pytest.fixture(scope="module")
def conv() -> LayerSpec:
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    return analyze(model, torch.randn(1, 8, 12, 12)).layers[0]


def assert_sane(m: Measurement, n: int) -> None:
    assert m.n == n and m.inner >= 1
    assert 0 < m.p10_ms <= m.median_ms <= m.p90_ms


# --- the protocol ------------------------------------------------------------------------------

def test_measurement_statistics_and_round_trip() -> None:
    m = Measurement.from_samples([5.0, 1.0, 2.0, 3.0, 4.0, 100.0], inner=3)
    assert m.median_ms == 3.5 and m.n == 6 and m.inner == 3
    assert 1.0 < m.p10_ms < 2.0 and 5.0 < m.p90_ms < 100.0  # the outlier barely moves p90
    assert Measurement.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError):
        Measurement.from_samples([])


def test_repeats_combine_to_the_fastest_window_on_cpu_and_the_median_on_gpu() -> None:
    """Contention only slows a CPU run down, so p10 repeats keep the fastest; GPU repeats
    (median protocol) vary both ways and keep the median."""
    windows = [[3.0, 3.1, 3.2], [2.0, 2.1, 2.3], [4.0, 4.4, 5.0]]
    cpu = combine([Measurement.from_samples(w, statistic="p10") for w in windows])
    assert cpu == replace(Measurement.from_samples(windows[1], statistic="p10"), n=9)
    gpu = combine([Measurement.from_samples(w) for w in windows])
    assert gpu.median_ms == 3.1 and gpu.n == 9 and gpu.statistic == "median"
    with pytest.raises(ValueError):
        combine([])


def test_fast_ops_are_timed_in_batches_sized_to_the_minimum_sample() -> None:
    calls: list[int] = []

    def fake_clock(k: int) -> float:  # a deterministic op of 0.01 ms per run
        calls.append(k)
        return 0.01 * k

    m = measure(fake_clock, TimingSettings(warmup=3, repeats=7, min_sample_ms=0.2, warmup_ms=0))
    assert calls[:3] == [1, 1, 1] and calls[3:] == [20] * 7
    assert m.inner == 20 and m.n == 7 and m.median_ms == pytest.approx(0.01)
    slow = measure(lambda k: 2.0 * k, TimingSettings(warmup=2, repeats=3, warmup_ms=0))
    assert slow.inner == 1 and slow.median_ms == 2.0


def test_invalid_settings_backend_precision_and_options_are_clear_errors() -> None:
    with pytest.raises(HalpError, match="repeats >= 1"):
        TimingSettings(repeats=0)
    with pytest.raises(HalpError, match="onnxruntime, torch, tensorrt"):
        get_backend("openvino")
    with pytest.raises(HalpError, match="fp32, fp16"):
        get_backend("onnxruntime", "int8")
    with pytest.raises(HalpError, match=r"no option thread.*valid options: threads, device"):
        get_backend("onnxruntime", thread=2)


def test_device_slug_is_short_and_stable() -> None:
    assert slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon-cpu-2-20ghz"
    assert slug("NVIDIA Orin (nvgpu)") == "nvidia-orin-nvgpu"


def test_device_keys_and_their_kind() -> None:
    """One builder per kind of key; the kind is read back from a key, e.g. a table's."""
    assert re.fullmatch(r"cpu-[a-z0-9-]+-t3", cpu_key(3)) and kind_of(cpu_key(3)) == "cpu"
    assert cuda_key("NVIDIA H200", (9, 0)) == "cuda-nvidia-h200-sm90"
    assert cuda_key("NVIDIA H200") == "cuda-nvidia-h200"  # ONNX Runtime's keys, as they were
    assert kind_of("cuda-nvidia-orin") is DeviceKind.CUDA
    assert kind_of("cpu-arm-cortex-a78ae-t1") is DeviceKind.CPU


def test_kinds_are_their_strings_in_json_and_text() -> None:
    for member in (Precision.FP16, DeviceKind.CUDA, Statistic.P10, OpKind.DWCONV):
        assert member == member.value and f"{member}" == str(member) == member.value
        assert json.dumps({"k": member}) == json.dumps({"k": member.value})
        assert {member.value: 1}[member] == 1
    assert TimingSettings().resolved(DeviceKind.CPU).statistic == "p10"
    assert TimingSettings().resolved(DeviceKind.CUDA).statistic == "median"
    assert TimingSettings(statistic="median").resolved(DeviceKind.CPU).statistic == "median"
    with pytest.raises(HalpError, match="median, p10 or auto"):
        TimingSettings(statistic="mean")


# --- ONNX Runtime ------------------------------------------------------------------------------

def test_onnxruntime_times_a_layer_and_describes_itself(conv: LayerSpec) -> None:
    backend = get_backend("onnxruntime", threads=1, **FAST)
    assert isinstance(backend, Backend)
    assert_sane(backend.time_layer(conv, 8, 16), 5)
    info = backend.describe()
    assert info.backend == "onnxruntime" and info.precision == "fp32"
    assert info.threads == 1 and info.device_key.endswith("-t1") and info.kind == "cpu"
    assert info.to_dict()["settings"] == {"warmup": 1, "repeats": 5, "min_sample_ms": 0.2,
                                          "warmup_ms": 0.0, "statistic": "p10"}
    assert {"onnxruntime", "onnx", "numpy"} <= set(info.versions)
    assert info == get_backend("onnxruntime", threads=1, **FAST).describe()


def test_description_is_recorded_as_it_always_was(conv: LayerSpec) -> None:
    """Tables and journal headers hold ``to_dict()``: the same keys in the same order as the
    dict describe() used to return, plain JSON values, so old tables and journals still match."""
    info = get_backend("onnxruntime", threads=1, **FAST).describe()
    recorded = info.to_dict()
    assert list(recorded) == ["backend", "precision", "device", "device_key", "provider",
                              "versions", "threads", "settings"]
    assert json.loads(json.dumps(recorded)) == recorded
    assert type(recorded["precision"]) is str and type(recorded["settings"]["statistic"]) is str
    torch_info = get_backend("torch", threads=1, **FAST).describe().to_dict()
    assert "provider" not in torch_info and torch_info["threads"] == 1


def test_description_round_trips_into_table_meta(tmp_path: Path) -> None:
    """A built table's meta starts with the description as JSON reads it back, and the table
    is accepted for that description and refused for another one."""
    backend = get_backend("onnxruntime", threads=1, **FAST)
    net, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(1, 3, 8, 8)
    build_lut(analyze(net, x), backend, step=8, out=tmp_path / "t.json", progress=False)
    recorded = backend.describe().to_dict()
    meta = json.loads((tmp_path / "t.json").read_text())["meta"]
    assert list(meta)[: len(recorded)] == list(recorded)
    assert {k: meta[k] for k in recorded} == json.loads(json.dumps(recorded))
    table = LatencyTable.load(tmp_path / "t.json", backend=backend)
    table.check_backend(backend.describe())
    with pytest.raises(LutMismatch, match=r"precision='fp32'.*precision='fp16' was requested"):
        table.check_backend(replace(backend.describe(), precision=Precision.FP16))


def test_onnxruntime_times_files_and_modules(conv: LayerSpec, tmp_path) -> None:
    backend = get_backend("onnxruntime", threads=1, **FAST)
    path = tmp_path / "layer.onnx"
    path.write_bytes(layer_model(conv, 8, 4).SerializeToString())
    assert_sane(backend.time_onnx(str(path), {"x": layer_input(conv, 8)}), 5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    net.train()
    assert_sane(backend.time_module(net, torch.randn(1, 3, 8, 8)), 5)
    assert net.training  # the caller's model is untouched


def test_onnxruntime_refuses_what_it_cannot_time(conv: LayerSpec, tmp_path) -> None:
    backend = get_backend("onnxruntime", threads=1, **FAST)
    with pytest.raises(HalpError, match="takes inputs"):
        backend.time_onnx(layer_model(conv, 8, 16), {"input": layer_input(conv, 8)})
    with pytest.raises(HalpError, match="does not exist"):
        backend.time_onnx(tmp_path / "missing.onnx", {})
    with pytest.raises(HalpError, match="fp32 models only"):
        get_backend("onnxruntime", "fp16")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
            get_backend("onnxruntime", device="cuda")


# --- torch -------------------------------------------------------------------------------------

def test_torch_cpu_times_layers_and_modules_and_restores_threads(conv: LayerSpec) -> None:
    before = torch.get_num_threads()
    backend = get_backend("torch", threads=1, **FAST)
    assert_sane(backend.time_layer(conv, 8, 16), 5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    assert_sane(backend.time_module(net, torch.randn(1, 3, 16, 16)), 5)
    assert net.training and torch.get_num_threads() == before
    info = backend.describe()
    assert info.backend == "torch" and info.threads == 1 and "torch" in info.versions


def test_capabilities_are_declared_not_refused(tmp_path: Path) -> None:
    """Eager torch times layers and networks but has no ONNX timer and no engine format: it
    does not carry methods that only raise, and engine building names the backends that can."""
    torch_backend = get_backend("torch", threads=1, **FAST)
    ort_backend = get_backend("onnxruntime", threads=1, **FAST)
    assert isinstance(torch_backend, Backend) and isinstance(ort_backend, Backend)
    assert not isinstance(torch_backend, (OnnxTimer, EngineBuilder))
    assert isinstance(ort_backend, OnnxTimer) and isinstance(ort_backend, EngineBuilder)
    assert engine_builders() == ("onnxruntime", "tensorrt")
    net = tmp_path / "net.onnx"
    to_onnx(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8), net)
    with pytest.raises(HalpError, match=r"torch backend has no engine format; build engines "
                                        r"with --backend onnxruntime or tensorrt"):
        engine.build(net, torch_backend, tmp_path)
    built = engine.build(net, ort_backend, tmp_path, name="net")
    with pytest.raises(HalpError, match="no engine format"):
        engine.measure(replace(built, backend="torch"), torch_backend)


def test_torch_refuses_cpu_fp16_and_a_missing_gpu() -> None:
    with pytest.raises(HalpError, match="fp16 on CUDA only"):
        get_backend("torch", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA GPU"):
            get_backend("torch", device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_event_timing(conv: LayerSpec, precision: str) -> None:
    backend = get_backend("torch", precision, device="cuda", **FAST)
    assert_sane(backend.time_layer(conv, 8, 16), 5)
    info = backend.describe()
    assert info.kind == "cuda" and re.search(r"-sm\d+$", info.device_key)
    assert "cudnn" in info.versions
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    assert_sane(backend.time_module(net, torch.randn(2, 3, 32, 32)), 5)
    assert next(net.parameters()).device.type == "cpu"  # the caller's copy stays put


def test_networks_are_timed_with_batchnorm_folded_as_engines_deploy_them(caplog) -> None:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    folded = deployable(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # caller's untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)

    class Branchy(nn.Module):  # data-dependent control flow: fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(t)) if t.sum() > 0 else t

    with caplog.at_level("WARNING"):
        kept = deployable(Branchy())
    assert isinstance(kept, Branchy) and "without folding BatchNorm" in caplog.text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_the_module_on_new_input() -> None:
    """What the GPU timer replays is the real network: new input in, the eager result out."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).cuda().eval()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.inference_mode():
        replay, out = cuda_graph(net, x)
        x.copy_(torch.randn_like(x))
        replay()
        torch.cuda.synchronize()
        assert torch.allclose(out, net(x), atol=1e-5)


# --- TensorRT ----------------------------------------------------------------------------------

def test_tensorrt_absent_is_a_clear_backend_unavailable(monkeypatch) -> None:
    # the class is importable without tensorrt/pycuda, and declares an engine format
    assert issubclass(backend_class("tensorrt"), EngineBuilder)
    for name in ("tensorrt", "pycuda", "pycuda.driver", "pycuda.autoprimaryctx"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail, as if absent
    with pytest.raises(BackendUnavailable) as err:
        get_backend("tensorrt", "fp16")
    assert "pip install '.[tensorrt]'" in str(err.value) and "NVIDIA GPU" in str(err.value)
    reason = available("tensorrt", "fp16")
    assert reason is not None and "TensorRT 10" in reason
    assert available("onnxruntime", threads=1) is None
    with pytest.raises(HalpError, match="unknown backend"):
        available("openvino")


def test_only_the_tensorrt_backend_mentions_tensorrt_or_pycuda() -> None:
    """The package must import on machines without them (CI, CPU-only hosts); cuda-python
    (CUDA graphs for TensorRT timing) likewise."""
    root = Path(pipeline.__file__).parent
    allowed = root / "backends" / "tensorrt.py"
    pattern = re.compile(
        r"^\s*(import|from)\s+(tensorrt|pycuda|cuda)\b"
        r"|import_module\(\s*[\"'](tensorrt|pycuda|cuda)\b", re.M
    )
    assert pattern.search("x = 1\n    import pycuda.driver as cuda\n")
    assert pattern.search('rt = importlib.import_module("cuda.bindings.runtime")')
    assert not pattern.search("import torch.cuda\n")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p != allowed and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_tensorrt_versions_the_backend_was_not_written_for_are_refused_clearly() -> None:
    """10.x and 11.x from pip (the extra's bound agrees), JetPack's 8.5 and 8.6 (the first with
    name-based I/O and execute_async_v3); anything else is named as unsupported."""
    import tomllib

    from pipeline.backends.tensorrt import SUPPORTED_MAJORS, check_version

    assert check_version("10.3.0.30") == 10 and check_version("11.1.0.7") == 11
    assert check_version("8.5.2.2") == 8 and check_version("8.6.2.3") == 8  # JetPack 5, 6.0
    for version in ("8.4.1.5", "9.3.0.1", "12.0.0", "dev"):
        with pytest.raises(BackendUnavailable, match=rf"TensorRT {version} is not supported.*"
                                                     r"10\.x and 11\.x.*tensorrt>=10,<12.*8\.5"):
            check_version(version)
    pyproject = Path(pipeline.__file__).parents[1] / "pyproject.toml"
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["tensorrt"]
    assert f"tensorrt>={min(SUPPORTED_MAJORS)},<{max(SUPPORTED_MAJORS) + 1}" in extra


TENSORRT_REASON = ("set HALP_TENSORRT=1 on a machine with TensorRT 10, 11 or 8.5/8.6, pycuda, "
                   "cuda-python and a GPU")


@pytest.mark.tensorrt
@pytest.mark.skipif(os.environ.get("HALP_TENSORRT") != "1", reason=TENSORRT_REASON)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_times_a_layer_and_a_plan(conv: LayerSpec, precision: str,
                                          tmp_path: Path) -> None:
    backend = get_backend("tensorrt", precision, **FAST)
    assert isinstance(backend, EngineBuilder) and isinstance(backend, OnnxTimer)
    assert_sane(backend.time_layer(conv, 8, 16), 5)
    plan = backend.build_engine(layer_model(conv, 8, 4), tmp_path, "layer")
    assert plan == tmp_path / "layer.plan" and plan.stat().st_size > 0
    assert_sane(backend.engine_timer(plan, {"x": layer_input(conv, 8)})(), 5)
    info = backend.describe()
    assert info.kind == "cuda" and re.search(r"-sm\d+$", info.device_key)
    assert "tensorrt" in info.versions and info.threads is None
    assert info.provider.startswith("TensorRT builder, TF32 on")  # TensorRT's, not polygraphy's
    assert ("float16 graphs" in info.provider) == (precision == "fp16")
    assert info.provider.endswith("timed as CUDA graphs") == ("cuda_python" in info.versions)
    assert np.isfinite(backend.time_module(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 16, 16))
                       .median_ms)
    # a plan TensorRT cannot load (another version's, or not a plan) is a clear error
    foreign = tmp_path / "foreign.plan"
    foreign.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    with pytest.raises(HalpError, match="rebuild it with `halp engine`"):
        backend.engine_timer(foreign, {"x": layer_input(conv, 8)})


@pytest.mark.tensorrt
@pytest.mark.skipif(os.environ.get("HALP_TENSORRT") != "1", reason=TENSORRT_REASON)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engines_take_the_graph_types_and_time_as_cuda_graphs(
        conv: LayerSpec, precision: str, tmp_path: Path) -> None:
    """fp16 engines have float16 inputs and outputs (no conversion at their edges, on 10.x as
    on 11.x); a CUDA graph of k enqueues is captured once per k and computes what direct
    enqueues compute, which compute the layer."""
    import onnxruntime as ort
    import tensorrt as trt

    from pipeline.backends.tensorrt import _Bindings, _cuda, _cudart

    backend = get_backend("tensorrt", precision, **FAST)
    model = layer_model(conv, 8, 16)
    engine = backend.loaders.engine_from_bytes(
        backend.build_engine(model, tmp_path, "layer").read_bytes())
    dtype = trt.DataType.HALF if precision == "fp16" else trt.DataType.FLOAT
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert {engine.get_tensor_dtype(n) for n in names} == {dtype}
    x = layer_input(conv, 8)
    bindings = _Bindings(engine, {"x": x})

    def output() -> np.ndarray:
        bindings.stream.synchronize()
        host = np.empty(tuple(engine.get_tensor_shape("y")), trt.nptype(dtype))
        _cuda().memcpy_dtoh(host, bindings.buffers[names.index("y")])
        return host

    graphed = bindings.timer()
    assert all(graphed(k) > 0 for k in (1, 4, 1, 4))
    if _cudart() is not None:
        assert bindings.graphs is not None and sorted(bindings.graphs.execs) == [1, 4]
    out_graph = output()
    plain = bindings.timer(graphs=False)
    assert plain(3) > 0 and bindings.graphs is None
    out_plain = output()
    np.testing.assert_allclose(out_graph, out_plain, rtol=1e-3, atol=1e-3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(["y"], {"x": x})[0]
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(out_plain.astype(np.float32), want, rtol=2e-2, atol=1e-2 * scale)


@pytest.mark.tensorrt
@pytest.mark.skipif(os.environ.get("HALP_TENSORRT") != "1", reason=TENSORRT_REASON)
def test_tensorrt_builds_a_network_engine_once_for_all_its_rounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A network timed round after round (verify's samples, the table's references) is one
    engine build, not one per round (minutes each on a Jetson, and free to pick other tactics)."""
    backend = get_backend("tensorrt", "fp32", **FAST)
    builds = []
    plan = backend._plan
    monkeypatch.setattr(backend, "_plan", lambda typed: builds.append(1) or plan(typed))
    timer = backend.module_timer(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 16, 16))
    assert all(np.isfinite(timer().median_ms) for _ in range(3))
    assert len(builds) == 1
