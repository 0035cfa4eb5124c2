"""The thin TensorRT adapter: one ONNX file -> one serialized, strongly typed engine plan.

Every call is TensorRT's documented Python API (10.x; 11.x accepts the same calls):
  Builder            https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  IBuilderConfig     https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
  ITimingCache       https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
  IProgressMonitor   https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ProgressMonitor.html
  OnnxParser         https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
The `trt` module is passed in, so the sequence of calls is unit-tested with a fake module on
machines without TensorRT (tests/test_engines_build.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from common.atomic import atomic_write_bytes
from common.errors import Flux2TrtError


class EngineBuildError(Flux2TrtError):
    """TensorRT refused to parse or build a graph."""

    exit_code = 1


def create_network(trt, builder):
    """A strongly typed network: every tensor's type comes from the ONNX graph, never from flags.

    `Builder.create_network(flags)` with `1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)`;
    TensorRT 11 makes strong typing the only mode and ignores the flag, so setting it fits both.
    """
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


def configure(trt, builder, network, config, build, inputs: list[dict], timing_cache: bytes) -> None:
    """Apply a `BuildConfig` to an IBuilderConfig. Sets no precision flag (FP16/BF16/FP8/INT8...):
    strongly typed networks reject them and TensorRT 11 removed them."""
    # IBuilderConfig.builder_optimization_level: 0 (fastest build) .. 5 (most tactics); TensorRT's default is 3.
    config.builder_optimization_level = build.opt_level
    if build.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, build.workspace_bytes)
    # TF32 is on by default for FP32 math (BuilderFlag.TF32); an fp32 export asks for fp32 numerics.
    if not build.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    # IBuilderConfig.create_timing_cache(b"") creates an empty cache; serialized bytes restore one.
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    _static_shapes(trt, builder, network, config, inputs)


def _static_shapes(trt, builder, network, config, inputs: list[dict]) -> None:
    """Engines are built for the manifest's shapes: check the parsed inputs, pin any dynamic one."""
    declared = {t["name"]: tuple(t["shape"]) for t in inputs}
    profile = None
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        want = declared.get(tensor.name)
        if want is None:
            raise EngineBuildError(f"network input {tensor.name!r} is not in the manifest's inputs {sorted(declared)}")
        if any(d < 0 for d in shape):
            # IOptimizationProfile.set_shape(name, min, opt, max): one point, min = opt = max.
            profile = profile or builder.create_optimization_profile()
            profile.set_shape(tensor.name, want, want, want)
        elif shape != want:
            raise EngineBuildError(f"network input {tensor.name!r} has shape {shape}, the manifest declares {want}")
    if profile is not None:
        config.add_optimization_profile(profile)


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


def build_plan(
    trt, onnx_path: Path, plan_path: Path, build, inputs: list[dict], timing_cache_path: Path | None, log
) -> None:
    """Parse `onnx_path`, build a strongly typed engine, write it atomically to `plan_path`."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = create_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    # OnnxParser.parse_from_file resolves external data relative to the model's folder.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(
            f"TensorRT could not parse {onnx_path}: {errors or 'no error recorded'}; run python -m engines.check"
        )
    config = builder.create_builder_config()
    cached = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else b""
    configure(trt, builder, network, config, build, inputs, cached)
    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)  # IHostMemory, None on failure
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path}; its log above says why")
    atomic_write_bytes(plan_path, serialized)  # IHostMemory exposes the buffer protocol: no copy
    if timing_cache_path is not None:
        # ITimingCache.serialize(): the cache now holds this build's tactic timings too.
        atomic_write_bytes(timing_cache_path, config.get_timing_cache().serialize())
