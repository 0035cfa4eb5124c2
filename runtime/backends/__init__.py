"""Backends run one component's graph: feed named arrays, get named arrays.

Arrays are the backend's own type (`numpy.ndarray` for ONNX Runtime on the CPU, `torch.Tensor`
for torch and TensorRT), so a GPU backend keeps latents on the device across the denoising loop:
the runtime only calls `from_host` once for the initial noise and `to_host` once for the image.
The sampler's Euler update (`x + dt * v`) is written so that it works on either type.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Array = Any  # numpy.ndarray | torch.Tensor, whichever the backend works in


class Backend(Protocol):
    name: str  # "ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda", "trt"
    precision: str

    def run(self, component: str, feeds: dict[str, Array]) -> dict[str, Array]:
        """Run `component` (loading it on first use) on named inputs; return named outputs."""

    def from_host(self, array: np.ndarray) -> Array:
        """Move a host array to where this backend computes (no-op on the CPU)."""

    def to_host(self, array: Array) -> np.ndarray:
        """Bring an array back as numpy float32/int64 (synchronises a GPU backend)."""

    def unload(self, component: str) -> None:
        """Free a component's memory (used between stages with --low-vram)."""

    def close(self) -> None:
        """Free everything."""
