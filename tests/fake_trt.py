"""A stand-in for the `tensorrt` module, for what needs a GPU: deserialising, enqueueing, CUDA graphs,
and enterprise TensorRT's builder (it needs a GPU to build; its timing cache too).

Builder-side behaviour that needs no GPU is tested against the real `tensorrt_rtx` binding
(tests/test_engines_build.py). This fake offers only what engines/trt_build.py and
runtime/backends/trt.py call, with the real names, signatures and enum values:
tests/test_engines_fake_surface.py holds every class, method, enum member and value here to
`tensorrt_rtx`'s, except the documented TensorRT-only differences in `TENSORRT_ONLY`.

It claims to be TensorRT 10.15: there `STRONGLY_TYPED` is 1 (EXPLICIT_BATCH is 0) and no precision
builder flag is offered (TensorRT 11 removed them and TensorRT-RTX never had them: a regression
that sets one fails here with AttributeError). Its plans are JSON naming every input and output
with shape and DataType; the runtime half "executes" a plan by writing `2 * input + 1` into each
output with torch ops on the given stream (tests map device pointers back to tensors through
`FakeTrt.tensors`). Test instrumentation (`calls`, `tensors`, ...) is listed in `FAKE_ONLY`.
"""

from __future__ import annotations

import enum
import json

# Members the surface test does not hold to tensorrt_rtx, and why.
TENSORRT_ONLY = {
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": "1 in TensorRT 10.x (after EXPLICIT_BATCH = 0); 0 in TensorRT-RTX",
}
# Attributes that exist only to let tests watch or steer the fake.
FAKE_ONLY = {
    "calls", "tensors", "executions", "capturing", "network_inputs", "fail_parse", "fail_build",
    "set_calls", "device_memory", "contexts", "plan", "io", "data", "weights_from", "engine", "strategy",
    "addresses", "refitter", "network", "inputs", "outputs", "dtype",
}  # fmt: skip

TIMING_CACHE_HEADER = b"FAKE-TIMING-CACHE:"  # what a cache "from this GPU" starts with
RUNTIME_CACHE_HEADER = b"FAKE-RUNTIME-CACHE:"


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class BuilderFlag(enum.IntEnum):
    REFIT = 4
    TF32 = 6
    STRIP_PLAN = 18
    REFIT_IDENTICAL = 19


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10
    E8M0 = 11


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


# ONNX element type -> DataType, for the tensors a parsed graph declares.
ONNX_TO_DATATYPE = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 7: DataType.INT64, 6: DataType.INT32}


class Logger:
    WARNING = 2

    def __init__(self, min_severity):
        self.min_severity = min_severity


class IProgressMonitor:
    def __init__(self):
        pass


class ITensor:
    def __init__(self, name, shape, dtype=DataType.FLOAT):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class INetworkDefinition:
    def __init__(self, flags):
        self.flags = flags
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, index):
        return self.inputs[index]


class ITimingCache:
    def __init__(self, data: bytes):
        self.data = bytes(data) or TIMING_CACHE_HEADER

    def serialize(self):
        return self.data + b"+timed"


class IBuilderConfig:
    def __init__(self, calls):
        self.calls = calls
        self._cache = None
        self.progress_monitor = None
        self._level = 3

    @property
    def builder_optimization_level(self):
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level):
        self._level = level
        self.calls.append(("builder_optimization_level", level))

    def set_flag(self, flag):
        self.calls.append(("set_flag", flag))

    def clear_flag(self, flag):
        self.calls.append(("clear_flag", flag))

    def set_memory_pool_limit(self, pool, pool_size):
        self.calls.append(("set_memory_pool_limit", pool, pool_size))

    def create_timing_cache(self, serialized_timing_cache):
        self.calls.append(("create_timing_cache", bytes(serialized_timing_cache)))
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache, ignore_mismatch):
        """False, attaching nothing, for a cache from "another GPU" (not starting with the header)."""
        self.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
        if not cache.data.startswith(TIMING_CACHE_HEADER) and not ignore_mismatch:
            return False
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache  # None when no cache is attached, as the real binding answers


class FakeTrt:
    """The module object: `FakeTrt()` is passed where `import tensorrt as trt` would be."""

    __version__ = "10.15.1.29"
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    MemoryPoolType = MemoryPoolType
    BuilderFlag = BuilderFlag
    DataType = DataType
    TensorIOMode = TensorIOMode
    ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    Logger = Logger
    IProgressMonitor = IProgressMonitor

    def __init__(self, network_inputs=None, fail_parse=False, fail_build=False):
        self.calls: list[tuple] = []
        self.network_inputs = network_inputs  # {name: shape}; None: read them from the ONNX file
        self.fail_parse, self.fail_build = fail_parse, fail_build
        self.tensors = {}  # data_ptr -> torch tensor, filled by tests of the runtime backend
        self.executions = 0
        self.capturing = None  # a list while a stand-in CUDA graph records enqueued work
        self.contexts = []  # every execution context made, for tests of user-managed memory
        trt = self

        class Builder:
            def __init__(self, logger):
                trt.calls.append(("Builder",))

            def create_network(self, flags):
                trt.calls.append(("create_network", flags))
                return INetworkDefinition(flags)

            def create_builder_config(self):
                return IBuilderConfig(trt.calls)

            def build_serialized_network(self, network, config):
                trt.calls.append(("build_serialized_network",))
                monitor = config.progress_monitor
                if monitor is not None:
                    monitor.phase_start("Building engine", None, 1)
                    monitor.step_complete("Building engine", 0)
                    monitor.phase_finish("Building engine")
                if trt.fail_build:
                    return None

                def tensors(items):
                    return {t.name: {"shape": list(t.shape), "dtype": t.dtype.name} for t in items}

                plan = {
                    "inputs": tensors(network.inputs),
                    "outputs": tensors(network.outputs),
                    "level": config.builder_optimization_level,
                }
                return json.dumps(plan).encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, model):
                trt.calls.append(("parse_from_file", model))
                if trt.fail_parse:
                    self.num_errors = 1
                    return False
                import onnx

                graph = onnx.load(model, load_external_data=False).graph

                def tensors(values):
                    return [
                        ITensor(
                            v.name,
                            [d.dim_value or -1 for d in v.type.tensor_type.shape.dim],
                            ONNX_TO_DATATYPE[v.type.tensor_type.elem_type],
                        )
                        for v in values
                    ]

                self.network.inputs = tensors(graph.input)
                self.network.outputs = tensors(graph.output)
                if trt.network_inputs is not None:
                    self.network.inputs = [ITensor(n, s) for n, s in trt.network_inputs.items()]
                return True

            def get_error(self, index):
                return "In node 0 with name: relu0 and operator: Relu (parseGraph): INVALID_NODE: unsupported"

        self.Builder = Builder
        self.OnnxParser = OnnxParser
        self.Runtime = _runtime_class(self)

    def set_calls(self):
        return [c for c in self.calls if c[0] == "set_flag"]


def _runtime_class(trt):
    class ICudaEngine:
        def __init__(self, plan: dict):
            self.plan = plan
            self.io = [(name, t, TensorIOMode.INPUT) for name, t in plan["inputs"].items()]
            self.io += [(name, t, TensorIOMode.OUTPUT) for name, t in plan["outputs"].items()]

        @property
        def num_io_tensors(self):
            return len(self.io)

        @property
        def device_memory_size_v2(self):
            # Scratch memory grows with the engine's tensors: engines differ, the largest decides.
            return 256 * sum(1 for _ in self.io) * max(len(t["shape"]) for _, t, _ in self.io)

        def get_tensor_name(self, index):
            return self.io[index][0]

        def _entry(self, name):
            return next(entry for entry in self.io if entry[0] == name)

        def get_tensor_mode(self, name):
            return self._entry(name)[2]

        def get_tensor_shape(self, name):
            return tuple(self._entry(name)[1]["shape"])

        def get_tensor_dtype(self, name):
            return DataType[self._entry(name)[1]["dtype"]]

        def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
            # The real binding overloads it: a strategy, or an IRuntimeConfig (TensorRT-RTX's way).
            if isinstance(strategy, IRuntimeConfig):
                strategy = strategy.get_execution_context_allocation_strategy()
            context = IExecutionContext(self, strategy)
            trt.contexts.append(context)
            return context

        def create_runtime_config(self):
            return IRuntimeConfig()

    class IRuntimeCache:
        def __init__(self):
            self.data = b""

        def deserialize(self, blob):
            """False, loading nothing, for a cache from "another GPU" (not starting with the header)."""
            if not bytes(blob).startswith(RUNTIME_CACHE_HEADER):
                return False
            self.data = bytes(blob)
            return True

        def serialize(self):
            return (self.data or RUNTIME_CACHE_HEADER) + b"+compiled"

    class IRuntimeConfig:
        def __init__(self):
            self._strategy = ExecutionContextAllocationStrategy.STATIC
            self._cache = None

        def create_runtime_cache(self):
            return IRuntimeCache()

        def set_runtime_cache(self, cache):
            self._cache = cache
            return True

        def get_runtime_cache(self):
            return self._cache

        def set_execution_context_allocation_strategy(self, strategy):
            self._strategy = strategy

        def get_execution_context_allocation_strategy(self):
            return self._strategy

    class IExecutionContext:
        def __init__(self, engine, strategy):
            self.engine = engine
            self.strategy = strategy
            self.addresses = {}
            self.device_memory = None  # (address, size) once set_device_memory is called

        def set_tensor_address(self, name, memory):
            self.addresses[name] = memory
            return True

        def set_device_memory(self, memory, size):
            self.device_memory = (memory, size)

        def execute_async_v3(self, stream_handle):
            import torch

            if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.device_memory is None:
                return False  # TensorRT refuses to enqueue without the scratch memory it was promised
            trt.executions += 1
            inputs = [self.addresses[n] for n, _, mode in self.engine.io if mode is TensorIOMode.INPUT]
            outputs = [self.addresses[n] for n, _, mode in self.engine.io if mode is TensorIOMode.OUTPUT]

            def work():
                source = trt.tensors[inputs[0]]
                with torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
                    for address in outputs:
                        # In place: no allocation, so CUDA-graph capture of this "engine" works.
                        trt.tensors[address].copy_(source).mul_(2).add_(1)

            if trt.capturing is not None:  # a stand-in CUDA graph is recording (tests without a GPU)
                trt.capturing.append(work)
            else:
                work()
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, serialized_engine):
            trt.calls.append(("deserialize_cuda_engine", type(serialized_engine).__name__))
            return ICudaEngine(json.loads(bytes(serialized_engine)))

    class Refitter:
        def __init__(self, engine, logger):
            self.engine = engine
            self.weights_from = None

        def refit_cuda_engine(self):
            trt.calls.append(("refit_cuda_engine", self.weights_from))
            return self.weights_from is not None

    class OnnxParserRefitter:
        def __init__(self, refitter, logger):
            self.refitter = refitter

        def refit_from_file(self, model):
            self.refitter.weights_from = model
            return True

    trt.Refitter, trt.OnnxParserRefitter = Refitter, OnnxParserRefitter
    trt.ICudaEngine, trt.IExecutionContext = ICudaEngine, IExecutionContext
    trt.IRuntimeConfig, trt.IRuntimeCache = IRuntimeConfig, IRuntimeCache
    return Runtime
