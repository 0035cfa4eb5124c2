"""The fake TensorRT may not offer what the real binding lacks: every enum member and value, class,
method (with its parameter names) and attribute of tests/fake_trt.py exists in `tensorrt_rtx`, or is
a documented TensorRT-only difference (fake_trt.TENSORRT_ONLY)."""

import enum
import inspect
import re

import pytest

from common.tensorrt_env import module_status
from tests import fake_trt
from tests.fake_trt import FAKE_ONLY, TENSORRT_ONLY, FakeTrt

HAS_RTX, RTX_REASON = module_status("rtx")
pytestmark = pytest.mark.skipif(not HAS_RTX, reason=f"needs tensorrt_rtx: {RTX_REASON}")

ENUMS = (
    "NetworkDefinitionCreationFlag",
    "MemoryPoolType",
    "BuilderFlag",
    "DataType",
    "TensorIOMode",
    "ExecutionContextAllocationStrategy",
)
CLASSES = (
    "Logger",
    "IProgressMonitor",
    "Builder",
    "OnnxParser",
    "Runtime",
    "Refitter",
    "OnnxParserRefitter",
    "ITensor",
    "INetworkDefinition",
    "ITimingCache",
    "IBuilderConfig",
    "ICudaEngine",
    "IExecutionContext",
    "IRuntimeConfig",
    "IRuntimeCache",
)


def enum_differences(name: str, fake_enum, real_module) -> list[str]:
    real_enum = getattr(real_module, name, None)
    if real_enum is None:
        return [f"{name}: no such enum"]
    found = []
    for member in fake_enum:
        label = f"{name}.{member.name}"
        real = getattr(real_enum, member.name, None)
        if real is None:
            found.append(f"{label}: not in the real binding")
        elif int(real) != int(member) and label not in TENSORRT_ONLY:
            found.append(f"{label}: value {int(member)}, the real binding's is {int(real)}")
    return found


def real_parameter_lists(function) -> list[list[str]]:
    """Parameter names (without self) of each overload, from pybind11's signature lines in the docstring."""
    lists = []
    for line in (function.__doc__ or "").splitlines():
        match = re.match(r"\s*(?:\d+\. )?\w+\((.*)\) -> ", line)
        if match:
            names = [part.split(":")[0].strip() for part in re.split(r",\s*(?=\w+:)", match.group(1)) if part.strip()]
            lists.append([n for n in names if n != "self"])
    return lists


def class_differences(name: str, fake_class, real_module) -> list[str]:
    real_class = getattr(real_module, name, None)
    if real_class is None:
        return [f"{name}: no such class"]
    found = []
    for attribute, value in vars(fake_class).items():
        if attribute.startswith("_") and attribute != "__init__" or attribute in FAKE_ONLY:
            continue
        label = f"{name}.{attribute}"
        if not hasattr(real_class, attribute):
            found.append(f"{label}: not in the real binding")
            continue
        if (
            inspect.isfunction(value)
            and attribute != "__init__"
            or (attribute == "__init__" and name != "IProgressMonitor")
        ):
            fake_params = [p for p in inspect.signature(value).parameters if p != "self"]
            real_lists = real_parameter_lists(getattr(real_class, attribute))
            if real_lists and fake_params not in real_lists:
                found.append(f"{label}{tuple(fake_params)}: the real binding takes one of {real_lists}")
        if isinstance(value, property) and not isinstance(getattr(real_class, attribute), property):
            found.append(f"{label}: a property here, not in the real binding")
    return found


def instance_attribute_differences(name: str, instance, real_module) -> list[str]:
    real_class = getattr(real_module, name)
    return [
        f"{name}.{attribute}: not in the real binding"
        for attribute in vars(instance)
        if not attribute.startswith("_") and attribute not in FAKE_ONLY and not hasattr(real_class, attribute)
    ]


def surface_differences(fake_module, trt, real_module) -> list[str]:
    found = []
    for name in ENUMS:
        found += enum_differences(name, getattr(fake_module, name), real_module)
    for name in CLASSES:
        fake_class = getattr(trt, name, None) or getattr(fake_module, name)
        found += class_differences(name, fake_class, real_module)
    # Attributes set in constructors (the real binding exposes them as properties).
    found += instance_attribute_differences("IBuilderConfig", fake_module.IBuilderConfig([]), real_module)
    found += instance_attribute_differences("ITensor", fake_module.ITensor("x", (1,)), real_module)
    found += instance_attribute_differences(
        "OnnxParser", trt.OnnxParser(fake_module.INetworkDefinition(0), None), real_module
    )
    return found


@pytest.fixture(scope="module")
def real():
    import tensorrt_rtx

    return tensorrt_rtx


def test_the_fake_offers_nothing_the_real_binding_lacks(real):
    assert surface_differences(fake_trt, FakeTrt(), real) == []
    assert real_parameter_lists(real.IBuilderConfig.set_timing_cache) == [
        ["cache", "ignore_mismatch"]
    ]  # the parser works


def test_the_surface_check_fails_when_a_removed_precision_flag_comes_back(real):
    members = {m.name: int(m) for m in fake_trt.BuilderFlag}
    for removed in ("FP16", "BF16", "FP8", "INT8", "OBEY_PRECISION_CONSTRAINTS"):
        flags = enum.IntEnum("BuilderFlag", {**members, removed: 0})
        assert enum_differences("BuilderFlag", flags, real) == [f"BuilderFlag.{removed}: not in the real binding"]
    wrong = enum.IntEnum("DataType", {m.name: int(m) for m in fake_trt.DataType} | {"INT64": 13})
    assert enum_differences("DataType", wrong, real) == ["DataType.INT64: value 13, the real binding's is 8"]


def test_the_surface_check_catches_a_wrong_signature_or_method(real):
    class IBuilderConfig(fake_trt.IBuilderConfig):
        def set_timing_cache(self, cache):  # the real one also takes ignore_mismatch
            return True

        def set_precision(self, precision):
            pass

    found = class_differences("IBuilderConfig", IBuilderConfig, real)
    assert any(f.startswith("IBuilderConfig.set_timing_cache('cache',)") for f in found)
    assert "IBuilderConfig.set_precision: not in the real binding" in found
