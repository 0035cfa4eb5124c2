"""Pick a backend by name; `auto` prefers TensorRT, then ONNX Runtime on CUDA, then on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

from common.errors import UsageError
from common.manifest import ArtifactsManifest
from runtime.backends import Backend

BACKENDS = ("auto", "trt", "ort", "torch")
# What a Triton model may run: the server's Python-backend environment carries no torch/diffusers.
SERVED_BACKENDS = ("auto", "trt", "ort")


def _trt_status(artifacts: Path) -> tuple[bool, str]:
    try:
        from runtime.backends.trt import trt_status
    except ImportError as exc:  # the module itself is missing from this install
        return False, f"TensorRT backend unavailable ({exc})"
    ok, reason = trt_status(artifacts)  # a TensorRT target with a GPU here, and its engines in artifacts
    if not ok and trt_status()[0]:
        return False, f"{reason} (run `python -m engines.build --artifacts {artifacts}`)"
    return ok, reason


def select_backend(
    name: str,
    artifacts: Path,
    manifest: ArtifactsManifest,
    *,
    low_vram: bool = False,
    checkpoint: Path | None = None,
    log=None,
) -> Backend:
    """`checkpoint` overrides the manifest's source checkpoint for the torch backend (artifacts moved)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "trt" or name == "auto":
        ok, reason = _trt_status(artifacts)
        if ok:
            from runtime.backends.trt import TrtBackend

            backend = TrtBackend(Path(artifacts), manifest, low_vram=low_vram)
            if name == "auto":
                log(f"backend: auto picked trt ({reason})")
            return backend
        if name == "trt":
            raise UsageError(f"backend trt is not available: {reason}; use --backend ort or torch")
        log(f"backend: TensorRT not used: {reason}")
    if name == "torch":
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            raise UsageError(
                f"backend torch needs torch and diffusers ({exc}); install flux2-trt's dependencies"
            ) from None
        from runtime.backends.torch_backend import TorchBackend

        return TorchBackend(Path(artifacts), manifest, low_vram=low_vram, checkpoint=checkpoint)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UsageError(
            "backend ort needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu on GPU nodes)"
        ) from None
    from runtime.backends.ort import OrtBackend

    try:
        backend = OrtBackend(Path(artifacts), manifest, low_vram=low_vram)
    except UsageError as exc:
        if name != "auto":
            raise
        # bf16/fp8 graphs on a machine with neither TensorRT nor onnxruntime-gpu: the PyTorch
        # modules are the only way to an image here, and the log says that is what ran.
        log(f"backend: auto picked torch ({exc})")
        return select_backend("torch", artifacts, manifest, low_vram=low_vram, checkpoint=checkpoint, log=log)
    if name == "auto":
        log(f"backend: auto picked {backend.name}")
    return backend
