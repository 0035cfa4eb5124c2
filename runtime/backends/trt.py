"""The TensorRT backend: engine plans from ARTIFACTS/engines, torch CUDA tensors in and out.

One CUDA stream for all engines. Each engine's input and output buffers are torch CUDA tensors
allocated once, from the manifest's declaration, and bound with
`IExecutionContext.set_tensor_address`; a run copies the feeds into the input buffers, enqueues
with `execute_async_v3(stream)` and returns device copies of the outputs, ordered after the
engine by stream events, never by a host synchronisation: the denoising loop never waits for the
GPU. After a warm-up run the transformer's enqueue is captured in a CUDA graph and replayed (the
buffers' addresses never change, which a graph requires). Only `to_host` synchronises.

TensorRT Python API used (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/):
`Runtime.deserialize_cuda_engine`, `ICudaEngine.num_io_tensors / get_tensor_name /
get_tensor_mode / get_tensor_shape / get_tensor_dtype / create_execution_context`,
`IExecutionContext.set_tensor_address / execute_async_v3` (returns False when enqueueing failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.engine_manifest import check_engines_usable, engines_dir, read_engine_manifest
from common.errors import ArtifactsError
from common.specs import ComponentSpec
from common.tensorrt_env import present_platform, trt_status

__all__ = ["TrtBackend", "trt_status"]

# Components run once per denoising step: kernel-launch overhead is worth a CUDA graph there.
CUDA_GRAPH_COMPONENTS = ("transformer",)
# TensorRT DataType member names -> torch dtype names.
TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}


def component_spec(manifest: dict, component: str) -> ComponentSpec:
    entry = manifest["components"][component]
    return ComponentSpec.from_json({"name": component, "inputs": entry["inputs"], "outputs": entry["outputs"]})


def check_engine_io(io: dict[str, tuple[bool, tuple, str]], spec: ComponentSpec, plan: Path) -> None:
    """The engine's tensors are the declared ones: {name: (is_input, shape, torch dtype name)}."""
    declared = {t.name: (True, tuple(t.shape), t.dtype) for t in spec.inputs}
    declared |= {t.name: (False, tuple(t.shape), t.dtype) for t in spec.outputs}
    if io != declared:
        raise ArtifactsError(
            f"engine {plan} has tensors {io}, the artifacts manifest declares {declared}; rebuild it with "
            f"`python -m engines.build --artifacts {plan.parent.parent} --force`"
        )


@dataclass
class _Loaded:
    engine: object
    context: object
    inputs: dict = field(default_factory=dict)  # name -> torch CUDA tensor bound to the context
    outputs: dict = field(default_factory=dict)
    runs: int = 0
    graph: object = None  # torch.cuda.CUDAGraph replaying one enqueue
    graph_error: str | None = None


class TrtBackend:
    """`TrtBackend(artifacts_dir, manifest, low_vram=False)`: the `Backend` protocol on TensorRT engines.

    Refuses (ArtifactsError) when TensorRT or a GPU is missing, or when the engines were built
    for another GPU, another TensorRT version or other ONNX files. `low_vram=True` keeps one
    engine loaded at a time. `cuda_graphs=False` disables graph capture. `trt_module` and
    `platform` are for tests, which pass a fake TensorRT.
    """

    name = "trt"

    def __init__(
        self,
        artifacts_dir,
        manifest: dict,
        *,
        low_vram: bool = False,
        cuda_graphs: bool = True,
        trt_module=None,
        platform=None,
    ):
        self.artifacts = Path(artifacts_dir)
        self.manifest = manifest
        self.precision = manifest["precision"]
        self.low_vram = low_vram
        self.cuda_graphs = cuda_graphs
        if trt_module is None:
            available, reason = trt_status()
            if not available:
                raise ArtifactsError(f"the trt backend cannot run here: {reason}; use the ort backend")
            import tensorrt as trt_module

            platform = present_platform()
        import torch

        self._engines = read_engine_manifest(self.artifacts)
        check_engines_usable(self._engines, manifest, platform, self.artifacts)
        self._trt = trt_module
        self._torch = torch
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self._device)
        self._runtime = trt_module.Runtime(trt_module.Logger(trt_module.Logger.WARNING))
        self._loaded: dict[str, _Loaded] = {}

    # -- the Backend protocol --------------------------------------------------------------------

    def run(self, component: str, feeds: dict) -> dict:
        torch = self._torch
        loaded = self._loaded.get(component) or self._load(component)
        caller = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(caller)  # the feeds were written on the caller's stream
        with torch.cuda.stream(self._stream):
            for name, buffer in loaded.inputs.items():
                feed = self._as_tensor(component, name, feeds, buffer)
                buffer.copy_(feed, non_blocking=True)
                if feed.is_cuda:
                    feed.record_stream(self._stream)  # the caller may free it before the copy has run
            self._enqueue(component, loaded)
        caller.wait_stream(self._stream)
        # Copies on the caller's stream: the next run may overwrite the buffers while these live on.
        return {name: buffer.clone() for name, buffer in loaded.outputs.items()}

    def from_host(self, array: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(array)).to(self._device)

    def to_host(self, array) -> np.ndarray:
        array = array.detach()
        if array.dtype in (self._torch.float16, self._torch.bfloat16):
            array = array.float()
        return array.cpu().numpy()  # synchronises: the one place this backend waits for the GPU

    def unload(self, component: str) -> None:
        loaded = self._loaded.pop(component, None)
        if loaded is None:
            return
        self._stream.synchronize()  # its buffers may still be in use by queued work
        # TensorRT wants the execution context gone before its engine; the graph holds the context's work.
        loaded.graph = None
        loaded.context = None
        loaded.engine = None
        loaded.inputs.clear()
        loaded.outputs.clear()
        self._torch.cuda.empty_cache()

    def close(self) -> None:
        for component in list(self._loaded):
            self.unload(component)
        self._runtime = None

    # -- loading -----------------------------------------------------------------------------------

    def _load(self, component: str) -> _Loaded:
        if component not in self.manifest["components"]:
            raise ArtifactsError(
                f"{self.artifacts} has no {component}; choose from {', '.join(self.manifest['components'])}"
            )
        if self.low_vram:
            for other in list(self._loaded):
                self.unload(other)
        plan = engines_dir(self.artifacts) / self._engines["engines"][component]["plan"]
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise ArtifactsError(
                f"TensorRT could not deserialize {plan}; rebuild it with `python -m engines.build --artifacts {self.artifacts} --force`"
            )
        io = {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = engine.get_tensor_dtype(name)
            io[name] = (
                engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT,
                tuple(engine.get_tensor_shape(name)),
                TORCH_DTYPES.get(getattr(dtype, "name", str(dtype)), str(dtype)),
            )
        check_engine_io(io, component_spec(self.manifest, component), plan)
        loaded = _Loaded(engine=engine, context=engine.create_execution_context())
        with self._torch.cuda.stream(self._stream):  # allocated for, and freed after, work on this stream
            for name, (is_input, shape, dtype) in io.items():
                buffer = self._allocate(shape, dtype)
                if not loaded.context.set_tensor_address(name, buffer.data_ptr()):
                    raise ArtifactsError(f"TensorRT refused the buffer for {name} of {plan}")
                (loaded.inputs if is_input else loaded.outputs)[name] = buffer
        self._loaded[component] = loaded
        return loaded

    def _allocate(self, shape: tuple, dtype: str):
        return self._torch.empty(shape, dtype=getattr(self._torch, dtype), device=self._device)

    def _as_tensor(self, component: str, name: str, feeds: dict, buffer):
        if name not in feeds:
            raise ArtifactsError(f"{component} needs input {name!r}; got {sorted(feeds)}")
        feed = feeds[name]
        if isinstance(feed, np.ndarray):
            feed = self._torch.from_numpy(feed)
        if tuple(feed.shape) != tuple(buffer.shape):
            raise ArtifactsError(
                f"{component} input {name} has shape {tuple(feed.shape)}, the engine is built for {tuple(buffer.shape)}; "
                f"export and build again for that size"
            )
        return feed

    # -- execution ---------------------------------------------------------------------------------

    def _enqueue(self, component: str, loaded: _Loaded) -> None:
        if loaded.graph is None and self._wants_graph(component, loaded):
            self._capture(loaded)
        if loaded.graph is not None:
            loaded.graph.replay()
        elif not loaded.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {component} (execute_async_v3 returned False); see its log")
        loaded.runs += 1

    def _wants_graph(self, component: str, loaded: _Loaded) -> bool:
        # After one ordinary run: TensorRT may allocate or initialise lazily in its first enqueue.
        return (
            self.cuda_graphs and component in CUDA_GRAPH_COMPONENTS and loaded.runs >= 1 and loaded.graph_error is None
        )

    def _capture(self, loaded: _Loaded) -> None:
        """Record one enqueue into a CUDA graph; on any failure keep enqueueing normally."""
        torch = self._torch
        graph = torch.cuda.CUDAGraph()
        try:
            # torch.cuda.graph synchronises once before capturing: a one-time cost, not per step.
            with torch.cuda.graph(graph, stream=self._stream):
                enqueued = loaded.context.execute_async_v3(self._stream.cuda_stream)
        except RuntimeError as exc:
            loaded.graph_error = f"capture failed: {exc}"
            return
        if not enqueued:
            loaded.graph_error = "execute_async_v3 returned False during capture"
            return
        loaded.graph = graph
