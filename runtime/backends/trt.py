"""The TensorRT backend: engine plans from ARTIFACTS/engines, torch CUDA tensors in and out.

One CUDA stream for all engines. Each engine's input and output buffers are torch CUDA tensors
allocated once, from the manifest's declaration, and bound with
`IExecutionContext.set_tensor_address`; a run copies the feeds into the input buffers, enqueues
with `execute_async_v3(stream)` and returns device copies of the outputs, ordered after the
engine by stream events, never by a host synchronisation: the denoising loop never waits for the
GPU. After a warm-up run the transformer's enqueue is captured in a CUDA graph and replayed (the
buffers' addresses never change, which a graph requires). Only `to_host` synchronises.

Engines come from ARTIFACTS/engines/<target>/: `tensorrt` engines through the `tensorrt` module,
TensorRT-RTX engines (built ahead of time, anywhere) through `tensorrt_rtx`, whose just-in-time
step compiles kernels for this GPU on first load: its runtime cache is kept beside the engines
(`<graph>.runtime-cache`), so a node pays that once. Plans are deserialised from a read-only
memory map, not read into host memory first. With `low_vram`, one engine is loaded at a time and
every execution context uses TensorRT's user-managed device memory: one scratch buffer, sized to the
largest engine's `device_memory_size_v2` (sizes kept in `memory.json` beside the engines once seen),
at one address, shared by all. (That mode is tested with a fake TensorRT only; unverified on a GPU.)

TensorRT Python API used (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/;
TensorRT-RTX's mirrors it): `Runtime.deserialize_cuda_engine(buffer)`, `ICudaEngine.num_io_tensors /
get_tensor_name / get_tensor_mode / get_tensor_shape / get_tensor_dtype / device_memory_size_v2 /
create_execution_context(strategy | runtime_config)`, `IExecutionContext.set_tensor_address /
set_device_memory / execute_async_v3` (returns False when enqueueing failed), TensorRT-RTX's
`ICudaEngine.create_runtime_config`, `IRuntimeConfig.create_runtime_cache / set_runtime_cache /
set_execution_context_allocation_strategy`, `IRuntimeCache.deserialize / serialize`, and for
weight-stripped plans `Refitter(engine, logger)`, `OnnxParserRefitter(refitter, logger).refit_from_file`,
`Refitter.refit_cuda_engine`.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_bytes, atomic_write_json
from common.engine_manifest import (
    check_engines_usable,
    engines_dir,
    read_engine_manifest,
    targets_with_engines,
)
from common.errors import ArtifactsError
from common.manifest import ArtifactsManifest
from common.specs import STEP_CACHE_COMPONENTS, ComponentSpec
from common.tensorrt_env import TARGETS, Platform, present_platform
from common.tensorrt_env import trt_status as target_status

__all__ = ["TrtBackend", "runtime_target"]
MEMORY_SIDECAR = "memory.json"

# Components run once per denoising step: kernel-launch overhead is worth a CUDA graph there (the step
# cache's graphs each get their own: runtime/step_cache.py).
CUDA_GRAPH_COMPONENTS = ("transformer", *STEP_CACHE_COMPONENTS)
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
    "FP8": "float8_e4m3fn",
}


def runtime_target(artifacts: Path) -> tuple[str | None, str]:
    """(target, reason): the first of tensorrt, rtx whose module and a GPU are here and whose engines
    `artifacts` holds; (None, why not) otherwise, with the build command when a target is here but
    its engines are not. Probes the modules and the GPU: call once (runtime.backends.select does)."""
    artifacts = Path(artifacts)
    built = targets_with_engines(artifacts)
    reasons, runnable = [], False
    for target in TARGETS:
        ok, reason = target_status(target)
        if ok and target in built:
            return target, reason
        runnable |= ok
        reasons.append(reason if not ok else f"no {target} engines in {engines_dir(artifacts, target)}")
    reason = "; ".join(reasons)
    if runnable:
        reason += f" (run `python -m engines.build --artifacts {artifacts}`)"
    return None, reason


def component_spec(manifest: ArtifactsManifest, component: str) -> ComponentSpec:
    entry = manifest.components[component]
    return ComponentSpec(component, entry.inputs, entry.outputs)


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
    runtime_cache: object = None  # TensorRT-RTX's IRuntimeCache, saved when the engine is unloaded
    inputs: dict = field(default_factory=dict)  # name -> torch CUDA tensor bound to the context
    outputs: dict = field(default_factory=dict)
    runs: int = 0
    graph: object = None  # torch.cuda.CUDAGraph replaying one enqueue
    graph_error: str | None = None


class TrtBackend:
    """`TrtBackend(artifacts_dir, manifest, low_vram=False)`: the `Backend` protocol on TensorRT engines.

    Uses the engines of the first target (tensorrt, then rtx) whose module and a GPU are present.
    Refuses (ArtifactsError) when none is, or when the engines were built for another GPU (an RTX
    engine: for other compute capabilities), another TensorRT version or other ONNX files.
    `low_vram=True` keeps one engine loaded at a time, all sharing one user-managed scratch buffer.
    `cuda_graphs=False` disables graph capture. `trt_module` and `platform` name the target to run:
    runtime.backends.select passes the one it probed, tests a fake TensorRT (the platform's "target"
    says which engines it stands for); without them the target is probed here.
    """

    name = "trt"

    def __init__(
        self,
        artifacts_dir,
        manifest: ArtifactsManifest,
        *,
        low_vram: bool = False,
        cuda_graphs: bool = True,
        trt_module=None,
        platform: Platform | None = None,
        log=None,
    ):
        self.artifacts = Path(artifacts_dir)
        self.manifest = manifest
        self.precision = manifest.precision
        self.low_vram = low_vram
        self.cuda_graphs = cuda_graphs
        self._log = log or (lambda message: None)
        if trt_module is None:
            target, reason = runtime_target(self.artifacts)
            if target is None:
                raise ArtifactsError(f"the trt backend cannot run here: {reason}; use the ort backend")
            from common.tensorrt_env import import_trt

            trt_module = import_trt(target)
            platform = present_platform(target)
        self.target = platform.target
        import torch

        self._engines = read_engine_manifest(self.artifacts, self.target)
        check_engines_usable(self._engines, manifest, platform, self.artifacts)
        self._folder = engines_dir(self.artifacts, self.target)
        self._trt = trt_module
        self._torch = torch
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self._device)
        self._logger = trt_module.Logger(trt_module.Logger.WARNING)
        self._runtime = trt_module.Runtime(self._logger)
        self._loaded: dict[str, _Loaded] = {}
        self._scratch = None  # low_vram: the one device buffer every context computes in
        self.memory = self._read_memory_sidecar()  # component -> {"device_memory_bytes", "plan_bytes"}

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
        self._save_runtime_cache(component, loaded)
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
        self._scratch = None
        self._runtime = None

    # -- loading -----------------------------------------------------------------------------------

    def _deserialize(self, plan: Path):
        """`Runtime.deserialize_cuda_engine` from a read-only memory map: the OS pages the plan in as
        TensorRT reads it, and a 32 GB plan never becomes a 32 GB bytes object in host memory."""
        with open(plan, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return self._runtime.deserialize_cuda_engine(mapped)

    def _load(self, component: str) -> _Loaded:
        if component not in self.manifest.components:
            raise ArtifactsError(
                f"{self.artifacts} has no {component}; choose from {', '.join(self.manifest.components)}"
            )
        if self.low_vram:
            for other in list(self._loaded):
                self.unload(other)
        entry = self._engines.engines[self._graph(component)]  # the size's plan in a --resolutions view
        plan = self._folder / entry.plan
        engine = self._deserialize(plan)
        if engine is None:
            raise ArtifactsError(
                f"TensorRT could not deserialize {plan}; rebuild it with `python -m engines.build --artifacts "
                f"{self.artifacts} --target {self.target} --force`"
            )
        if entry.strip_weights:
            self._refit_from_onnx(engine, component, plan)
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
        self._record_memory(component, engine, plan)
        loaded = self._create_context(component, engine)
        with self._torch.cuda.stream(self._stream):  # allocated for, and freed after, work on this stream
            for name, (is_input, shape, dtype) in io.items():
                buffer = self._allocate(shape, dtype)
                if not loaded.context.set_tensor_address(name, buffer.data_ptr()):
                    raise ArtifactsError(f"TensorRT refused the buffer for {name} of {plan}")
                (loaded.inputs if is_input else loaded.outputs)[name] = buffer
        self._loaded[component] = loaded
        return loaded

    def _create_context(self, component: str, engine) -> _Loaded:
        """An execution context: TensorRT-RTX's with its runtime cache; with low_vram, on the shared scratch."""
        trt = self._trt
        strategy = trt.ExecutionContextAllocationStrategy
        mode = strategy.USER_MANAGED if self.low_vram else strategy.STATIC
        cache = None
        if self.target == "rtx":
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(mode)
            cache = config.create_runtime_cache()
            saved = self._folder / f"{self._graph(component)}.runtime-cache"
            if saved.is_file() and not cache.deserialize(saved.read_bytes()):
                self._log(f"{saved}: runtime cache from another GPU, driver or TensorRT-RTX version; compiling afresh")
            config.set_runtime_cache(cache)
            context = engine.create_execution_context(config)
        else:
            context = engine.create_execution_context(mode)
        if context is None:
            raise ArtifactsError(f"TensorRT could not create an execution context for {component} (out of GPU memory?)")
        if self.low_vram:
            scratch = self._scratch_for(engine.device_memory_size_v2)
            context.set_device_memory(scratch.data_ptr(), scratch.numel())
        return _Loaded(engine=engine, context=context, runtime_cache=cache)

    def _scratch_for(self, needed: int):
        """The shared scratch buffer, sized to the largest engine's needs known so far (the sidecar
        remembers every engine's, so after a node's first run it is allocated once, at one address)."""
        largest = max([needed] + [m["device_memory_bytes"] for m in self.memory.values()])
        if self._scratch is None or self._scratch.numel() < largest:
            self._scratch = None
            self._scratch = self._allocate((largest,), "uint8")
        return self._scratch

    def _refit_from_onnx(self, engine, component: str, plan: Path) -> None:
        """A weight-stripped plan takes its weights from the ONNX external data it was built from."""
        trt = self._trt
        onnx_path = self.artifacts / self.manifest.components[component].file
        refitter = trt.Refitter(engine, self._logger)
        if not trt.OnnxParserRefitter(refitter, self._logger).refit_from_file(str(onnx_path)) or not (
            refitter.refit_cuda_engine()
        ):
            raise ArtifactsError(
                f"TensorRT could not refit the weight-stripped {plan} from {onnx_path}; rebuild with `python -m "
                f"engines.build --artifacts {self.artifacts} --target {self.target} --force`"
            )

    def _save_runtime_cache(self, component: str, loaded: _Loaded) -> None:
        if loaded.runtime_cache is None:
            return
        try:
            atomic_write_bytes(
                self._folder / f"{self._graph(component)}.runtime-cache", loaded.runtime_cache.serialize()
            )
        except OSError as exc:  # a read-only engines folder: the next process compiles again, nothing worse
            self._log(f"runtime cache for {component} not saved: {exc}")

    def _graph(self, component: str) -> str:
        """The graph `component` names here, by its file: `transformer_96x160` in one size's view of a
        --resolutions folder (runtime.artifacts.at_size), so that each size keeps its own runtime cache and memory
        record beside its own plan."""
        return Path(self.manifest.components[component].file).stem

    def _read_memory_sidecar(self) -> dict:
        path = self._folder / MEMORY_SIDECAR
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    def _record_memory(self, component: str, engine, plan: Path) -> None:
        """The resident-memory budget per engine: its weights (the plan's size) and scratch activations."""
        record = {"device_memory_bytes": int(engine.device_memory_size_v2), "plan_bytes": plan.stat().st_size}
        graph = self._graph(component)
        if self.memory.get(graph) == record:
            return
        self.memory[graph] = record
        try:
            atomic_write_json(self._folder / MEMORY_SIDECAR, self.memory)
        except OSError as exc:
            self._log(f"{self._folder / MEMORY_SIDECAR} not written: {exc}")

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
