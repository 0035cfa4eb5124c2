"""The runtime's trt backend: refusals on the CPU; buffers, stream and CUDA graphs on a GPU with a fake
TensorRT; the real thing against ONNX Runtime where TensorRT is installed."""

import json

import numpy as np
import pytest

from common.engine_manifest import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, engines_dir, write_engine_manifest
from common.errors import ArtifactsError
from common.specs import ComponentSpec, TensorSpec
from common.tensorrt_env import trt_status
from runtime.backends.trt import TrtBackend, check_engine_io, component_spec
from tests.fake_trt import FakeTrt

PLATFORM = {"tensorrt": FakeTrt.__version__, "gpu": "GPU-X", "compute_capability": "9.0"}
SHAPES = {"text_encoder": (1, 8), "transformer": (2, 16, 4), "vae": (1, 4, 4)}


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _fake_artifacts(folder, platform=PLATFORM):
    """An artifacts manifest and fake-TensorRT plans (JSON) with matching engine manifest."""
    engines_dir(folder).mkdir(parents=True)
    components, engines = {}, {}
    for name, shape in SHAPES.items():
        tensor = {"shape": list(shape), "dtype": "float32"}
        components[name] = {
            "file": f"{name}.onnx",
            "sha256": {f"{name}.onnx": name * 3},
            "inputs": [{"name": "x", **tensor}],
            "outputs": [{"name": "y", **tensor}],
        }
        plan = engines_dir(folder) / f"{name}.plan"
        plan.write_text(json.dumps({"inputs": {"x": list(shape)}, "outputs": {"y": list(shape)}}))
        engines[name] = {
            "plan": plan.name,
            "plan_bytes": plan.stat().st_size,
            "onnx_sha256": components[name]["sha256"],
            "platform": platform,
        }
    manifest = {"precision": "fp32", "components": components}
    write_engine_manifest(
        folder, {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, "engines": engines}
    )
    return manifest


def test_refuses_without_tensorrt(tmp_path):
    if trt_status()[0]:
        pytest.skip("TensorRT and a GPU are present here")
    manifest = _fake_artifacts(tmp_path)
    with pytest.raises(ArtifactsError, match="the trt backend cannot run here: .*use the ort backend"):
        TrtBackend(tmp_path, manifest)


def test_refuses_engines_for_another_gpu_or_tensorrt(tmp_path):
    manifest = _fake_artifacts(tmp_path)
    for present, message in (
        ({**PLATFORM, "gpu": "GPU-Y"}, "built for GPU-X .*this node has GPU-Y"),
        (
            {**PLATFORM, "tensorrt": "11.0.0"},
            f"built with TensorRT {FakeTrt.__version__}, this node has TensorRT 11.0.0",
        ),
    ):
        with pytest.raises(ArtifactsError, match=message):
            TrtBackend(tmp_path, manifest, trt_module=FakeTrt(), platform=present)
    with pytest.raises(ArtifactsError, match="has no TensorRT engines"):
        TrtBackend(tmp_path / "nowhere", manifest, trt_module=FakeTrt(), platform=PLATFORM)


def test_engine_io_must_match_the_declaration(tmp_path):
    spec = ComponentSpec("vae", (TensorSpec("x", (1, 4), "float32"),), (TensorSpec("y", (1, 3), "float32"),))
    check_engine_io(
        {"x": (True, (1, 4), "float32"), "y": (False, (1, 3), "float32")}, spec, tmp_path / "engines" / "vae.plan"
    )
    for io in (
        {"x": (True, (1, 4), "float16"), "y": (False, (1, 3), "float32")},
        {"x": (True, (2, 4), "float32"), "y": (False, (1, 3), "float32")},
        {"x": (True, (1, 4), "float32")},
    ):
        with pytest.raises(ArtifactsError, match="declares"):
            check_engine_io(io, spec, tmp_path / "engines" / "vae.plan")
    assert component_spec(_fake_artifacts(tmp_path / "a"), "transformer").inputs[0].shape == SHAPES["transformer"]


class _RecordingBackend(TrtBackend):
    """Lets the fake engine find the tensors behind the device pointers it is given."""

    on_cpu = False

    def _allocate(self, shape, dtype):
        if self.on_cpu:
            tensor = self._torch.empty(shape, dtype=getattr(self._torch, dtype))
        else:
            tensor = super()._allocate(shape, dtype)
        self._trt.tensors[tensor.data_ptr()] = tensor
        return tensor


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """torch.cuda's stream and graph calls as CPU stand-ins: the backend's logic runs in CI.

    The stand-in graph records the work enqueued while capturing and runs it on replay, which is
    what a CUDA graph does; what only a GPU can show is left to the `gpu` tests below.
    """
    import contextlib

    import torch

    trt = FakeTrt()

    class Stream:
        cuda_stream = 1234

        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    class Graph:
        def __init__(self):
            self.work = []

        def replay(self):
            for work in self.work:
                work()

    @contextlib.contextmanager
    def graph(cuda_graph, stream=None, **kwargs):
        trt.capturing = cuda_graph.work
        try:
            yield
        finally:
            trt.capturing = None

    for name, value in {
        "Stream": Stream,
        "ExternalStream": lambda handle: Stream(),
        "stream": lambda stream: contextlib.nullcontext(),
        "current_stream": lambda device=None: Stream(),
        "current_device": lambda: 0,
        "CUDAGraph": Graph,
        "graph": graph,
        "empty_cache": lambda: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(_RecordingBackend, "on_cpu", True)
    return trt


def _backend(folder, trt, **kwargs):
    import torch

    backend = _RecordingBackend(folder, _fake_artifacts(folder), trt_module=trt, platform=PLATFORM, **kwargs)
    if backend.on_cpu:
        backend._device = torch.device("cpu")
    return backend


def _denoise_loop_then_vae(backend, trt, no_sync):
    """Warm-up, capture, replays of the transformer; then VAE runs that keep their outputs."""
    shape = SHAPES["transformer"]
    x = backend.from_host(np.zeros(shape, np.float32))
    outputs = [backend.run("transformer", {"x": x})["y"]]  # warm-up: an ordinary enqueue
    assert trt.executions == 1 and backend._loaded["transformer"].graph is None
    x = x + 1  # the sampler's update, on the device
    outputs.append(backend.run("transformer", {"x": x})["y"])  # captured (synchronises once), then replayed
    with no_sync():  # from here any implicit host synchronisation would raise
        for _ in range(3):
            x = x + 1
            outputs.append(backend.run("transformer", {"x": x})["y"])
    assert backend._loaded["transformer"].graph is not None
    assert trt.executions == 2  # the warm-up, then the capture; every later step replayed the graph
    for step, output in enumerate(outputs):
        np.testing.assert_array_equal(backend.to_host(output), np.full(shape, 2 * step + 1, np.float32))

    # Outputs are copies: a later run does not change an earlier result.
    kept = backend.run("vae", {"x": backend.from_host(np.ones(SHAPES["vae"], np.float32))})["y"]
    backend.run("vae", {"x": backend.from_host(np.zeros(SHAPES["vae"], np.float32))})
    assert backend.to_host(kept).max() == 3.0
    assert backend._loaded["vae"].graph is None  # only the transformer is captured
    backend.close()
    assert backend._loaded == {}


def _low_vram(backend):
    for component in ("text_encoder", "transformer", "vae"):
        out = backend.run(component, {"x": np.full(SHAPES[component], 2, np.float32)})["y"]
        assert list(backend._loaded) == [component]
        assert backend.to_host(out).min() == 5.0
    with pytest.raises(ArtifactsError, match="the engine is built for"):
        backend.run("vae", {"x": np.zeros((9, 9), np.float32)})
    with pytest.raises(ArtifactsError, match="needs input 'x'"):
        backend.run("vae", {})


def test_buffers_graph_capture_and_copies_with_cuda_stand_ins(tmp_path, cuda_on_cpu):
    import contextlib

    _denoise_loop_then_vae(_backend(tmp_path, cuda_on_cpu), cuda_on_cpu, contextlib.nullcontext)


def test_low_vram_keeps_one_engine_loaded_with_cuda_stand_ins(tmp_path, cuda_on_cpu):
    _low_vram(_backend(tmp_path, cuda_on_cpu, low_vram=True))


def test_no_graph_when_disabled_or_when_capture_fails(tmp_path, cuda_on_cpu, monkeypatch):
    backend = _backend(tmp_path / "a", cuda_on_cpu, cuda_graphs=False)
    for _ in range(3):
        backend.run("transformer", {"x": np.zeros(SHAPES["transformer"], np.float32)})
    assert backend._loaded["transformer"].graph is None and cuda_on_cpu.executions == 3

    import torch

    def broken_capture(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", broken_capture)
    backend = _backend(tmp_path / "b", cuda_on_cpu)
    for _ in range(3):
        out = backend.run("transformer", {"x": np.zeros(SHAPES["transformer"], np.float32)})["y"]
    loaded = backend._loaded["transformer"]
    assert loaded.graph is None and "capture failed" in loaded.graph_error
    assert backend.to_host(out).max() == 1.0  # it kept running, without a graph


def _no_sync():
    import contextlib

    import torch

    @contextlib.contextmanager
    def mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return mode()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_stream_buffers_and_cuda_graph_on_a_gpu(tmp_path):
    trt = FakeTrt()
    _denoise_loop_then_vae(_backend(tmp_path, trt), trt, _no_sync)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_low_vram_keeps_one_engine_loaded_on_a_gpu(tmp_path):
    _low_vram(_backend(tmp_path, FakeTrt(), low_vram=True))


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not trt_status()[0], reason=f"needs TensorRT and a CUDA GPU: {trt_status()[1]}")
def test_real_engines_match_onnx_runtime(export_tiny, tmp_path):
    import shutil

    from common.manifest import read_manifest
    from common.specs import TOLERANCES
    from engines.build import build_engines
    from export.verify.onnx_run import compare, run_graph

    artifacts = tmp_path / "tiny-fp32"
    shutil.copytree(export_tiny("fp32"), artifacts)
    build_engines(artifacts=artifacts)
    manifest = read_manifest(artifacts)
    backend = TrtBackend(artifacts, manifest)
    rng = np.random.default_rng(0)
    for component, entry in manifest["components"].items():
        feeds = {}
        for tensor in entry["inputs"]:
            if tensor["dtype"] == "int64":
                feeds[tensor["name"]] = np.ones(tensor["shape"], np.int64)
            else:
                feeds[tensor["name"]] = rng.standard_normal(tensor["shape"]).astype(np.float32)
        expected = run_graph(artifacts / entry["file"], feeds, "onnxruntime-cpu")
        got = backend.run(component, {k: backend.from_host(v) for k, v in feeds.items()})
        for name, value in expected.items():
            metrics = compare(backend.to_host(got[name]), value)
            assert metrics["rel_l2"] <= TOLERANCES["fp32"].max_rel_l2, (component, metrics)
    backend.close()
