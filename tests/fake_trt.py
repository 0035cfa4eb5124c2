"""A stand-in for the `tensorrt` module: records every call the adapter makes, builds JSON "plans".

Only what engines/trt_build.py and runtime/backends/trt.py call exists here, with TensorRT's
names and signatures, so a call the real API lacks fails in these tests too. The runtime half
"executes" a plan by writing `2 * input + 1` into the output with torch ops on the given stream
(tests map device pointers back to tensors through `FakeTrt.tensors`).
"""

from __future__ import annotations

import enum
import json


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class BuilderFlag(enum.Enum):
    FP16 = 0
    BF16 = 1
    INT8 = 2
    FP8 = 3
    TF32 = 4
    OBEY_PRECISION_CONSTRAINTS = 5


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 4
    BOOL = 5
    BF16 = 7


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Logger:
    WARNING = 2

    def __init__(self, severity):
        self.severity = severity


class IProgressMonitor:
    def __init__(self):
        pass


class Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class Network:
    def __init__(self, flags):
        self.flags = flags
        self.inputs: list[Tensor] = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, index):
        return self.inputs[index]


class TimingCache:
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def serialize(self):
        return self.data + b"+timed"


class OptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keyword names
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class BuilderConfig:
    def __init__(self, calls):
        self.calls = calls
        self._cache = None
        self.profiles = []
        self.progress_monitor = None

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
        return TimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        self.calls.append(("add_optimization_profile", profile.shapes))
        return 0


class FakeTrt:
    """The module object: `FakeTrt()` is passed where `import tensorrt as trt` would be."""

    __version__ = "10.15.1.29"
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    MemoryPoolType = MemoryPoolType
    BuilderFlag = BuilderFlag
    DataType = DataType
    TensorIOMode = TensorIOMode
    Logger = Logger
    IProgressMonitor = IProgressMonitor

    def __init__(self, network_inputs=None, fail_parse=False, fail_build=False):
        self.calls: list[tuple] = []
        self.network_inputs = network_inputs  # {name: shape}; None: read them from the ONNX file
        self.fail_parse, self.fail_build = fail_parse, fail_build
        self.tensors = {}  # data_ptr -> torch tensor, filled by tests of the runtime backend
        self.executions = 0
        self.capturing = None  # a list while a stand-in CUDA graph records enqueued work
        trt = self

        class Builder:
            def __init__(self, logger):
                trt.calls.append(("Builder",))

            def create_network(self, flags):
                trt.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                return BuilderConfig(trt.calls)

            def create_optimization_profile(self):
                return OptimizationProfile()

            def build_serialized_network(self, network, config):
                trt.calls.append(("build_serialized_network",))
                if trt.fail_build:
                    return None
                plan = {
                    "inputs": {t.name: list(t.shape) for t in network.inputs},
                    "level": config.builder_optimization_level,
                }
                return json.dumps(plan).encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path):
                trt.calls.append(("parse_from_file", path))
                if trt.fail_parse:
                    self.num_errors = 1
                    return False
                inputs = trt.network_inputs
                if inputs is None:
                    import onnx

                    graph = onnx.load(path, load_external_data=False).graph
                    inputs = {v.name: [d.dim_value or -1 for d in v.type.tensor_type.shape.dim] for v in graph.input}
                self.network.inputs = [Tensor(name, shape) for name, shape in inputs.items()]
                return True

            def get_error(self, index):
                return "In node 0 (parseGraph): INVALID_NODE: unsupported operator"

        self.Builder = Builder
        self.OnnxParser = OnnxParser
        self.Runtime = _runtime_class(self)

    def set_calls(self):
        return [c for c in self.calls if c[0] == "set_flag"]


def _runtime_class(trt):
    class Engine:
        def __init__(self, plan: dict):
            self.io = [(name, shape, TensorIOMode.INPUT) for name, shape in plan["inputs"].items()]
            self.io += [(name, shape, TensorIOMode.OUTPUT) for name, shape in plan["outputs"].items()]

        @property
        def num_io_tensors(self):
            return len(self.io)

        def get_tensor_name(self, index):
            return self.io[index][0]

        def _entry(self, name):
            return next(entry for entry in self.io if entry[0] == name)

        def get_tensor_mode(self, name):
            return self._entry(name)[2]

        def get_tensor_shape(self, name):
            return tuple(self._entry(name)[1])

        def get_tensor_dtype(self, name):
            return DataType.FLOAT

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine = engine
            self.addresses = {}

        def set_tensor_address(self, name, memory):
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            import torch

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
            return Engine(json.loads(bytes(serialized_engine)))

    return Runtime
