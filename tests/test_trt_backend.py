"""The runtime's trt backend: refusals on the CPU; buffers, stream and CUDA graphs on a GPU with a fake
TensorRT; the real thing against ONNX Runtime where TensorRT is installed."""

import json
from dataclasses import replace

import numpy as np
import pytest

from common.engine_manifest import EngineManifest, EngineRecord, engines_dir, write_engine_manifest
from common.errors import ArtifactsError
from common.specs import ComponentSpec, TensorSpec
from common.tensorrt_env import Platform, trt_status
from runtime.backends.trt import TORCH_DTYPES, TrtBackend, check_engine_io, component_spec
from tests.fake_trt import RUNTIME_CACHE_HEADER, DataType, ExecutionContextAllocationStrategy, FakeTrt
from tests.support import artifacts_manifest, component_record

PLATFORM = Platform("tensorrt", FakeTrt.__version__, gpu="GPU-X", compute_capability="9.0")
RTX_BUILT = Platform("rtx", "1.7.1.116", compute_capabilities=("8.6", "8.9", "12.0"), compute_capabilities_from="test")
RTX_PRESENT = Platform("rtx", "1.7.1.116", gpu="NVIDIA RTX 4090", compute_capability="8.9")
SHAPES = {"text_encoder": (1, 8), "transformer": (2, 16, 4), "vae": (1, 4, 4)}


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _fake_artifacts(folder, platform=PLATFORM, strip_weights=False):
    """An artifacts manifest and fake-TensorRT plans (JSON) with matching engine manifest. The text
    encoder's input is int64 token ids, as the real one's: the engine's dtype is checked, not assumed."""
    target = platform.target
    engines_dir(folder, target).mkdir(parents=True, exist_ok=True)
    components, engines = {}, {}
    for name, shape in SHAPES.items():
        dtype, trt_dtype = ("int64", "INT64") if name == "text_encoder" else ("float32", "FLOAT")
        inputs, outputs = (TensorSpec("x", shape, dtype),), (TensorSpec("y", shape, "float32"),)
        components[name] = component_record(name, {f"{name}.onnx": name * 3}, inputs, outputs)
        plan = engines_dir(folder, target) / f"{name}.plan"
        plan.write_text(
            json.dumps(
                {
                    "inputs": {"x": {"shape": list(shape), "dtype": trt_dtype}},
                    "outputs": {"y": {"shape": list(shape), "dtype": "FLOAT"}},
                }
            )
        )
        engines[name] = EngineRecord(
            plan=plan.name, onnx=f"{name}.onnx", onnx_sha256=components[name].sha256, platform=platform,
            flags={"strip_weights": strip_weights}, inputs=inputs, outputs=outputs, key=name, plan_bytes=plan.stat().st_size,
            plan_sha256="", build_seconds=0.0, built="",
        )  # fmt: skip
    write_engine_manifest(folder, EngineManifest(target, "fp32", engines))
    return artifacts_manifest(components)


def test_refuses_without_tensorrt(tmp_path):
    if trt_status()[0]:
        pytest.skip("TensorRT and a GPU are present here")
    manifest = _fake_artifacts(tmp_path)
    with pytest.raises(ArtifactsError, match="the trt backend cannot run here: .*use the ort backend"):
        TrtBackend(tmp_path, manifest)


def test_refuses_engines_for_another_gpu_or_tensorrt(tmp_path):
    manifest = _fake_artifacts(tmp_path)
    for present, message in (
        (replace(PLATFORM, gpu="GPU-Y"), "built for GPU-X .*this node has GPU-Y"),
        (
            replace(PLATFORM, tensorrt="11.0.0"),
            f"built with TensorRT {FakeTrt.__version__}, this node has TensorRT 11.0.0",
        ),
    ):
        with pytest.raises(ArtifactsError, match=message):
            TrtBackend(tmp_path, manifest, trt_module=FakeTrt(), platform=present)
    with pytest.raises(ArtifactsError, match="has no TensorRT engines"):
        TrtBackend(tmp_path / "nowhere", manifest, trt_module=FakeTrt(), platform=PLATFORM)


def test_refuses_rtx_engines_on_a_gpu_they_were_not_built_for(tmp_path):
    manifest = _fake_artifacts(tmp_path, platform=RTX_BUILT)
    hopper = replace(RTX_PRESENT, gpu="NVIDIA H200", compute_capability="9.0")
    with pytest.raises(
        ArtifactsError, match=r"NVIDIA H200 is 9.0: Hopper is no TensorRT-RTX target: .*--target tensorrt"
    ):
        TrtBackend(tmp_path, manifest, trt_module=FakeTrt(), platform=hopper)
    turing = replace(RTX_PRESENT, gpu="RTX 2080", compute_capability="7.5")
    with pytest.raises(ArtifactsError, match=r"for compute capability 8.6, 8.9, 12.0; .*7.5: rebuild with .*75"):
        TrtBackend(tmp_path, manifest, trt_module=FakeTrt(), platform=turing)


def test_every_real_datatype_has_a_torch_dtype_or_is_refused_by_the_io_check():
    import torch

    for member in ("FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8"):
        assert hasattr(torch, TORCH_DTYPES[member]) and member in DataType.__members__


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


def _backend(folder, trt, platform=PLATFORM, built=None, strip_weights=False, **kwargs):

    manifest = _fake_artifacts(folder, built or platform, strip_weights=strip_weights)
    return _recording(folder, manifest, trt, platform=platform, **kwargs)


def _recording(folder, manifest, trt, **kwargs):
    import torch

    backend = _RecordingBackend(folder, manifest, trt_module=trt, **kwargs)
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
        dtype = np.int64 if component == "text_encoder" else np.float32
        out = backend.run(component, {"x": np.full(SHAPES[component], 2, dtype)})["y"]
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


def test_low_vram_contexts_share_one_user_managed_scratch_buffer(tmp_path, cuda_on_cpu):
    backend = _backend(tmp_path, cuda_on_cpu, low_vram=True)
    _low_vram(backend)
    sizes = {c: backend.memory[c]["device_memory_bytes"] for c in SHAPES}
    assert len(set(sizes.values())) > 1  # the engines differ: the largest must decide
    contexts = cuda_on_cpu.contexts
    assert {c.strategy for c in contexts} == {ExecutionContextAllocationStrategy.USER_MANAGED}
    # The first engine's context got a buffer of its own size; once a larger engine came it grew.
    # A second backend on the same engines knows every size from the sidecar: one buffer, one address.
    backend.close()
    cuda_on_cpu.contexts.clear()
    again = _RecordingBackend(
        tmp_path, _fake_artifacts(tmp_path), trt_module=cuda_on_cpu, platform=PLATFORM, low_vram=True
    )
    _low_vram(again)
    assert {c.device_memory for c in cuda_on_cpu.contexts} == {(again._scratch.data_ptr(), max(sizes.values()))}
    assert (
        json.loads((engines_dir(tmp_path, "tensorrt") / "memory.json").read_text())["vae"]["device_memory_bytes"]
        == sizes["vae"]
    )


def test_plans_are_deserialised_from_a_memory_map(tmp_path, cuda_on_cpu):
    backend = _backend(tmp_path, cuda_on_cpu)
    backend.run("vae", {"x": np.zeros(SHAPES["vae"], np.float32)})
    assert [c for c in cuda_on_cpu.calls if c[0] == "deserialize_cuda_engine"] == [("deserialize_cuda_engine", "mmap")]


def test_rtx_engines_keep_their_runtime_cache_beside_the_engines(tmp_path, cuda_on_cpu):
    backend = _backend(tmp_path, cuda_on_cpu, platform=RTX_PRESENT, built=RTX_BUILT)
    backend.run("vae", {"x": np.zeros(SHAPES["vae"], np.float32)})
    backend.close()
    saved = engines_dir(tmp_path, "rtx") / "vae.runtime-cache"
    assert saved.read_bytes() == RUNTIME_CACHE_HEADER + b"+compiled"  # the just-in-time step's kernels, kept
    logs = []
    backend = _RecordingBackend(
        tmp_path, _fake_artifacts(tmp_path, RTX_BUILT), trt_module=cuda_on_cpu, platform=RTX_PRESENT, log=logs.append
    )
    backend.run("vae", {"x": np.zeros(SHAPES["vae"], np.float32)})
    backend.close()
    assert saved.read_bytes() == RUNTIME_CACHE_HEADER + b"+compiled+compiled" and logs == []  # loaded, extended
    saved.write_bytes(b"from another GPU")
    backend = _RecordingBackend(
        tmp_path, _fake_artifacts(tmp_path, RTX_BUILT), trt_module=cuda_on_cpu, platform=RTX_PRESENT, log=logs.append
    )
    backend.run("vae", {"x": np.zeros(SHAPES["vae"], np.float32)})
    assert len(logs) == 1 and "runtime cache from another GPU" in logs[0]


def test_weight_stripped_plans_are_refitted_from_the_onnx(tmp_path, cuda_on_cpu):
    backend = _backend(tmp_path, cuda_on_cpu, strip_weights=True)
    backend.run("vae", {"x": np.zeros(SHAPES["vae"], np.float32)})
    assert [c for c in cuda_on_cpu.calls if c[0] == "refit_cuda_engine"] == [
        ("refit_cuda_engine", str(tmp_path / "vae.onnx"))
    ]


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
    from common.precision import TOLERANCES
    from engines.build import build_engines
    from export.verify.onnx_run import compare, run_graph

    artifacts = tmp_path / "tiny-fp32"
    shutil.copytree(export_tiny("fp32"), artifacts)
    build_engines(artifacts=artifacts)
    manifest = read_manifest(artifacts)
    backend = TrtBackend(artifacts, manifest)
    rng = np.random.default_rng(0)
    for component, entry in manifest.components.items():
        feeds = {}
        for tensor in entry.inputs:
            if tensor.dtype == "int64":
                feeds[tensor.name] = np.ones(tensor.shape, np.int64)
            else:
                feeds[tensor.name] = rng.standard_normal(tensor.shape).astype(np.float32)
        expected = run_graph(artifacts / entry.file, feeds, "onnxruntime-cpu")
        got = backend.run(component, {k: backend.from_host(v) for k, v in feeds.items()})
        for name, value in expected.items():
            metrics = compare(backend.to_host(got[name]), value)
            assert metrics["rel_l2"] <= TOLERANCES["fp32"].max_rel_l2, (component, metrics)
    backend.close()
