"""Is TensorRT usable here, and on which GPU? Shared by engines.build and the runtime's trt backend.

Imports tensorrt and torch lazily, inside the functions, and never raises: a machine without
either is an ordinary case (CPU nodes, this workplace's CI), answered with a reason.
"""

from __future__ import annotations


def trt_status() -> tuple[bool, str]:
    """(available, reason): TensorRT importable and a CUDA GPU visible to torch."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install whose libraries fail to load
        return (
            False,
            f"TensorRT is not installed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'import failed'})",
        )
    version = getattr(trt, "__version__", "unknown")
    try:
        import torch

        if not torch.cuda.is_available():
            return False, f"TensorRT {version} is installed but torch sees no CUDA GPU"
        name = torch.cuda.get_device_name()
    except Exception as exc:
        return (
            False,
            f"TensorRT {version} is installed but the CUDA GPU could not be queried ({type(exc).__name__}: {exc})",
        )
    return True, f"TensorRT {version} on {name}"


def present_platform() -> dict:
    """What an engine is tied to: TensorRT version, GPU name and compute capability (call when available)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
