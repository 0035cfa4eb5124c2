"""The thin TensorRT adapter: one ONNX file -> one serialized, strongly typed engine plan.

Both targets go through it: enterprise TensorRT (module `tensorrt`, 10.x/11.x) and TensorRT for
RTX (module `tensorrt_rtx`, 1.7). They share the classes and enums of every call made here; where
they differ, the difference sits in `TrtApi` and nowhere else:

  - the module (passed in: `tensorrt` or `tensorrt_rtx`, or a fake in tests of the GPU parts);
  - the network flag's value (`STRONGLY_TYPED` is 1 in TensorRT 10.x, after EXPLICIT_BATCH = 0;
    0 in TensorRT-RTX; TensorRT 11 ignores it): read from the module's own enum, never written;
  - compute capabilities: TensorRT-RTX builds ahead of time for a list of them
    (`IBuilderConfig.num_compute_capabilities` + `set_compute_capability`); TensorRT builds for
    the GPU it runs on;
  - the timing cache: TensorRT's `create_timing_cache` / `set_timing_cache` / `get_timing_cache`;
    in TensorRT-RTX these are deprecated no-ops (its docstrings say so since 1.2; measured: a
    garbage cache is "loaded" and without a GPU the call logs CUDA errors), so they are not called;
  - weight-stripped plans: `STRIP_PLAN` with `REFIT_IDENTICAL` (TensorRT: refit from the same
    weights) or `REFIT` (TensorRT-RTX's documented weightless workflow);
  - writing the plan: `Builder.build_serialized_network_to_stream(network, config, IStreamWriter)`
    where the module has it (TensorRT-RTX 1.7, TensorRT >= 10.x), so the plan goes to its file as
    the builder serializes it, never held whole in host memory (measured on the full-width 1+1
    slice at fp16, 4.27 GiB of weights: peak anonymous memory 1.41 x the weights, against 2.04 x
    with `build_serialized_network`'s IHostMemory); otherwise the IHostMemory is written.

API pages (TensorRT; TensorRT-RTX's Python API mirrors them):
  Builder            https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  IBuilderConfig     https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
  ITimingCache       https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
  IProgressMonitor   https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ProgressMonitor.html
  OnnxParser         https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
  TensorRT-RTX       https://docs.nvidia.com/deeplearning/tensorrt-rtx/latest/inference-library/cpu-engines.html
                     (compute capabilities, CPU-only ahead-of-time builds, weightless engines)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import ArtifactsError, Flux2TrtError
from common.specs import TensorSpec
from common.tensorrt_env import LABELS


class EngineBuildError(Flux2TrtError):
    """TensorRT refused to parse or build a graph."""

    exit_code = 1


@dataclass
class BuiltPlan:
    plan_bytes: int  # what was written to the sink
    plan_sha256: str
    timing_cache: bytes | None  # the updated timing cache, None where there is none to keep
    timing_cache_discarded: bool = False  # the given cache was unusable; a fresh one was used


class TrtApi:
    """One TensorRT module and its target ("tensorrt" | "rtx"): every call where the two differ."""

    def __init__(self, trt, target: str):
        self.trt, self.target = trt, target
        self.label = LABELS[target]
        self.version = trt.__version__
        self.has_timing_cache = target == "tensorrt"

    def create_network(self, builder):
        """A strongly typed network: every tensor's type comes from the ONNX graph, never from flags.

        `Builder.create_network(flags)` with `1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)`:
        the bit from the module's own enum (1 in TensorRT 10.x, 0 in TensorRT-RTX, where every
        network is strongly typed anyway; TensorRT 11 accepts and ignores it).
        """
        return builder.create_network(1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))

    def set_compute_capabilities(self, config, capabilities: tuple[str, ...] | None) -> None:
        """TensorRT-RTX: `config.num_compute_capabilities = n`, then `set_compute_capability(ComputeCapability.SMxy, i)`
        for each (returns False when refused). None keeps TensorRT-RTX's defaults."""
        if not capabilities:
            return
        config.num_compute_capabilities = len(capabilities)
        for index, capability in enumerate(capabilities):
            member = getattr(self.trt.ComputeCapability, "SM" + capability.replace(".", ""))
            if not config.set_compute_capability(member, index):
                raise EngineBuildError(f"{self.label} {self.version} refused compute capability {capability}")

    def attach_timing_cache(self, config, serialized: bytes) -> bool:
        """TensorRT: `IBuilderConfig.create_timing_cache(bytes)` (b"" makes an empty one), then
        `set_timing_cache(cache, ignore_mismatch=False)`, which returns False for a cache from
        another GPU or TensorRT version. Returns False when `serialized` was not usable; a fresh,
        empty cache is attached instead, so the build goes on."""
        cache = config.create_timing_cache(serialized) if serialized else None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return True
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        return not serialized

    def timing_cache_bytes(self, config) -> bytes | None:
        """`IBuilderConfig.get_timing_cache()` (None when no cache is attached) -> `ITimingCache.serialize()`."""
        cache = config.get_timing_cache()
        return None if cache is None else bytes(cache.serialize())

    def strip_flags(self) -> tuple:
        """Builder flags of a weight-stripped, refittable plan (see the module docstring)."""
        refit = "REFIT_IDENTICAL" if self.target == "tensorrt" else "REFIT"
        return (self.trt.BuilderFlag.STRIP_PLAN, getattr(self.trt.BuilderFlag, refit))

    def serialize(self, builder, network, config, sink: PlanSink) -> bool:
        """Build and write the plan into `sink`; False when the builder failed (its log says why)."""
        base = getattr(self.trt, "IStreamWriter", None)
        if base is not None and hasattr(builder, "build_serialized_network_to_stream"):
            return bool(builder.build_serialized_network_to_stream(network, config, _stream_writer(base, sink)))
        serialized = builder.build_serialized_network(network, config)  # IHostMemory, None on failure
        if serialized is None:
            return False
        sink.write(memoryview(serialized))
        return True


class PlanSink:
    """Where a plan's bytes go as TensorRT produces them: a file, hashed and counted on the way."""

    def __init__(self, file):
        import hashlib

        self.file, self.bytes, self._hash = file, 0, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.file.write(view)
        self._hash.update(view)
        self.bytes += view.nbytes
        return view.nbytes

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def _stream_writer(base, sink: PlanSink):
    """An IStreamWriter (TensorRT's `write(data) -> bytes written`) that passes every block to `sink`."""

    class Writer(base):
        def __init__(self):
            base.__init__(self)

        def write(self, data):
            return sink.write(data)

    return Writer()


def configure(api: TrtApi, builder, network, config, build, inputs: tuple[TensorSpec, ...], onnx_path: Path) -> None:
    """Apply a `BuildConfig` to an IBuilderConfig. Sets no precision flag: TensorRT 11 and
    TensorRT-RTX have none (strongly typed networks take precision from the graph)."""
    trt = api.trt
    # IBuilderConfig.builder_optimization_level: 0 (fastest build) .. 5 (most tactics); TensorRT's default is 3.
    config.builder_optimization_level = build.opt_level
    if build.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build.workspace_bytes)
    # TF32 is on by default for FP32 math (BuilderFlag.TF32); an fp32 export asks for fp32 numerics.
    if not build.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if build.strip_weights:
        for flag in api.strip_flags():
            config.set_flag(flag)
    api.set_compute_capabilities(config, build.compute_capabilities)
    check_static_inputs(network, inputs, onnx_path)


def check_static_inputs(network, inputs: tuple[TensorSpec, ...], onnx_path: Path) -> None:
    """Engines are built for the manifest's static shapes. A dynamic input is refused: pinned with a
    profile, the engine would still report -1 for it (`ICudaEngine.get_tensor_shape`) and the
    runtime, which never calls `set_input_shape`, would refuse the engine it was just given."""
    declared = {t.name: tuple(t.shape) for t in inputs}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        want = declared.get(tensor.name)
        if want is None:
            raise EngineBuildError(f"network input {tensor.name!r} is not in the manifest's inputs {sorted(declared)}")
        if any(d < 0 for d in shape):
            raise ArtifactsError(
                f"{onnx_path}: input {tensor.name!r} has a dynamic shape {shape} (the manifest declares {want}); "
                f"engines are built for static shapes only: re-export with python -m export"
            )
        if shape != want:
            raise EngineBuildError(f"network input {tensor.name!r} has shape {shape}, the manifest declares {want}")


def _progress_monitor(trt, log):
    """An IProgressMonitor that logs TensorRT's top-level build phases (None where the API lacks it)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self._lock = threading.Lock()  # TensorRT calls it from several threads
            self._started = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                with self._lock:
                    self._started[phase_name] = time.perf_counter()
                    log(f"    {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                started = self._started.pop(phase_name, None)
            if started is not None:
                log(f"    {phase_name} done in {time.perf_counter() - started:.1f} s")

    return Monitor()


def parse_onnx(api: TrtApi, builder, logger, onnx_path: Path):
    """`OnnxParser(network, logger).parse_from_file(path)` (external data resolved beside the model).
    Returns (network, parser); raises EngineBuildError naming the ONNX node and TensorRT's message."""
    network = api.create_network(builder)
    parser = api.trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser_error_text(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(
            f"{api.label} could not parse {onnx_path}: {errors or 'no error recorded'}; run python -m engines.check"
        )
    return network, parser


def parser_error_text(error) -> str:
    """A ParserError on one line. Its str() names the ONNX node and operator, then TensorRT's message:
    `In node 1 with name: unique_node and operator: Unique (checkUnique): UNSUPPORTED_NODE: ...`."""
    return " ".join(str(error).split())


def build_plan(
    api: TrtApi, onnx_path: Path, build, inputs: tuple[TensorSpec, ...], timing_cache: bytes | None, log, sink
) -> BuiltPlan:
    """Parse `onnx_path`, build a strongly typed engine and write its plan into `sink` (an open binary file).

    The caller gives a temporary file and renames it only once this returns (`common.atomic`).
    `timing_cache` None: no timing cache (TensorRT-RTX, or none asked for); b"" starts an empty one.
    """
    trt = api.trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(api, builder, logger, onnx_path)
    config = builder.create_builder_config()
    configure(api, builder, network, config, build, inputs, onnx_path)
    discarded = False
    if timing_cache is not None and api.has_timing_cache:
        discarded = not api.attach_timing_cache(config, timing_cache)
    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    plan = PlanSink(sink)
    if not api.serialize(builder, network, config, plan):
        raise EngineBuildError(f"{api.label} failed to build an engine from {onnx_path}; its log above says why")
    cache = api.timing_cache_bytes(config) if timing_cache is not None and api.has_timing_cache else None
    return BuiltPlan(plan.bytes, plan.sha256, timing_cache=cache, timing_cache_discarded=discarded)
