"""Which TensorRT is here, and on which GPU? Shared by engines.build, engines.check and the trt backend.

Two build targets with one Python API (TensorRT for RTX is a fork of TensorRT's with the same
classes and enums for every call this project makes):

- `tensorrt`: enterprise TensorRT (module `tensorrt`), builds on and for the GPU it runs on; the
  only route to data-center GPUs (Hopper H100/H200 is compute capability 9.0).
- `rtx`: TensorRT for RTX (module `tensorrt_rtx`, on PyPI), builds ahead of time on any machine,
  GPU or not, for a list of compute capabilities (no 9.0); a GPU is needed only to run the engine.

Imports tensorrt, tensorrt_rtx and torch lazily, inside the functions, and never raises: a machine
without any of them is an ordinary case (CPU nodes, CI), answered with a reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

TARGETS = ("tensorrt", "rtx")
MODULES = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}
LABELS = {"tensorrt": "TensorRT", "rtx": "TensorRT-RTX"}

# TensorRT-RTX's own default targets when none is set (docs: "CPU-Only AOT and TensorRT-RTX
# Engines": compute capability 8.0, 8.6, 8.9, 12.0 and later; 12.1 is GB10 since 1.5). 7.5
# (Turing) only on request. No 9.0: Hopper is not a TensorRT-RTX target.
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
RTX_DEFAULT_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0", "12.1")


def cc_tuple(capability: str) -> tuple[int, int]:
    major, minor = capability.split(".")
    return int(major), int(minor)


def runnable_compute_capabilities(capabilities, precision: str) -> tuple[str, ...]:
    """The GPUs an RTX engine of `precision` built for `capabilities` can run on."""
    from common.precision import precision as declared

    return tuple(c for c in capabilities if declared(precision).runs_on(cc_tuple(c)))


def import_trt(target: str):
    """The module a target builds and runs with: `tensorrt` or `tensorrt_rtx`."""
    return importlib.import_module(MODULES[target])


def module_status(target: str) -> tuple[bool, str]:
    """(importable, reason) for a target's module, without raising."""
    try:
        module = import_trt(target)
    except Exception as exc:  # ImportError, or a broken install whose libraries fail to load
        first = str(exc).splitlines()[0] if str(exc) else "import failed"
        return False, f"{LABELS[target]} is not installed ({type(exc).__name__}: {first})"
    return True, f"{LABELS[target]} {getattr(module, '__version__', 'unknown')}"


def gpu_status() -> tuple[bool, str]:
    """(present, GPU name or why not): a CUDA GPU visible to torch."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "torch sees no CUDA GPU"
        return True, torch.cuda.get_device_name()
    except Exception as exc:
        return False, f"the CUDA GPU could not be queried ({type(exc).__name__}: {exc})"


def trt_status(target: str = "tensorrt") -> tuple[bool, str]:
    """(available, reason): the target's module importable and a CUDA GPU to run engines on."""
    ok, reason = module_status(target)
    if not ok:
        return False, reason
    present, gpu = gpu_status()
    if not present:
        return False, f"{reason} is installed but {gpu}"
    return True, f"{reason} on {gpu}"


@dataclass(frozen=True)
class Platform:
    """What plans are built for, or what a node offers: the target and its version, then the GPU
    (`tensorrt` builds, and every node) or the compute capabilities an `rtx` build targets."""

    target: str
    tensorrt: str  # the target module's version (TensorRT-RTX's for `rtx`)
    gpu: str | None = None
    compute_capability: str | None = None
    compute_capabilities: tuple[str, ...] | None = None
    compute_capabilities_from: str | None = None  # "--compute-capability" or "TensorRT-RTX default"

    def describe(self) -> str:
        """The GPU, or the compute capabilities an ahead-of-time build covers."""
        if self.gpu is not None:
            return f"{self.gpu} (sm {self.compute_capability})"
        return f"compute capabilities {', '.join(self.compute_capabilities or ())} ({self.compute_capabilities_from})"

    def to_json(self) -> dict:
        data = {"target": self.target, "tensorrt": self.tensorrt}
        if self.gpu is not None:
            data.update(gpu=self.gpu, compute_capability=self.compute_capability)
        if self.compute_capabilities is not None:
            data.update(
                compute_capabilities=list(self.compute_capabilities),
                compute_capabilities_from=self.compute_capabilities_from,
            )
        return data

    @classmethod
    def from_json(cls, data: dict) -> Platform:
        capabilities = data.get("compute_capabilities")
        return cls(
            target=str(data.get("target", "tensorrt")),  # engine manifests v1 knew only TensorRT
            tensorrt=str(data["tensorrt"]),
            gpu=data.get("gpu"),
            compute_capability=data.get("compute_capability"),
            compute_capabilities=None if capabilities is None else tuple(str(c) for c in capabilities),
            compute_capabilities_from=data.get("compute_capabilities_from"),
        )


def present_gpu() -> tuple[str, str]:
    """The GPU here: (name, compute capability); call when gpu_status() is true."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def present_platform(target: str = "tensorrt") -> Platform:
    """What a running engine is checked against: target, its version, the GPU and its compute capability."""
    module = import_trt(target)
    gpu, capability = present_gpu()
    return Platform(target, module.__version__, gpu=gpu, compute_capability=capability)


def resolve_build_target(requested: str) -> tuple[str | None, str]:
    """`auto`: tensorrt where it and a GPU are present, else rtx where tensorrt_rtx imports, else None.

    Returns (target or None, what was found), the reason naming what is missing when None.
    """
    if requested != "auto":
        return requested, ""
    trt_ok, trt_reason = trt_status("tensorrt")
    if trt_ok:
        return "tensorrt", trt_reason
    rtx_ok, rtx_reason = module_status("rtx")
    if rtx_ok:
        return "rtx", f"{rtx_reason} (no TensorRT build here: {trt_reason})"
    return None, f"{trt_reason}; {rtx_reason}"
