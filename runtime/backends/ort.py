"""ONNX Runtime backend: the CPU provider here, the CUDA provider where onnxruntime-gpu is installed.

Arrays are numpy on the host. With the CUDA provider each call copies inputs to the device and
outputs back; keeping latents on the device across steps (IOBinding with OrtValues) is a
follow-up for GPU nodes without TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import ArtifactsError, UsageError
from common.manifest import ArtifactsManifest
from common.precision import precision as declared


def ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available
        else ["CPUExecutionProvider"]
    )


def backend_name(providers) -> str:
    return "ort-cuda" if providers[0] == "CUDAExecutionProvider" else "ort-cpu"


def cannot_run(providers, precision: str, artifacts: Path) -> str | None:
    """Why ONNX Runtime with `providers` cannot run the graphs of `artifacts` at `precision`; None when it can.

    An nvfp4 folder runs on the CPU provider through float32 twins of its graphs (`common.cpu_twin`,
    `Precision.ort_cpu_twin`), made when a session opens: slow and memory-hungry, for checking on a CPU.
    """
    if backend_name(providers) == "ort-cpu" and not _runs_on_cpu(precision):
        return (
            f"ONNX Runtime's CPU provider cannot run {precision} graphs ({artifacts}); "
            "use --backend torch here (PyTorch modules at bf16; it has no FP8), or --backend trt on a GPU node"
        )
    return None


def _runs_on_cpu(precision: str) -> bool:
    return declared(precision).ort_cpu_runs or declared(precision).ort_cpu_twin


class OrtBackend:
    def __init__(
        self,
        artifacts: Path,
        manifest: ArtifactsManifest,
        *,
        low_vram: bool = False,
        providers: list[str] | None = None,
    ):
        self.artifacts = Path(artifacts)
        self.manifest = manifest
        self.precision = manifest.precision
        self.providers = providers or ort_providers()
        self.name = backend_name(self.providers)
        self.low_vram = low_vram
        refusal = cannot_run(self.providers, self.precision, self.artifacts)
        if refusal is not None:
            raise UsageError(refusal)
        self._sessions: dict = {}
        self._twins = None  # a temporary folder of float32 twins, made on first need

    def _session(self, component: str):
        if component not in self._sessions:
            import onnxruntime as ort

            if self.low_vram:
                self._sessions.clear()
            entry = self.manifest.components.get(component)
            if entry is None:
                raise ArtifactsError(
                    f"{self.artifacts} has no {component} graph; re-run export with --components including {component}"
                )
            if self.name == "ort-cpu" and not declared(entry.precision).ort_cpu_runs:
                self._sessions[component] = self._twin_session(entry)
                return self._sessions[component]
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._sessions[component] = ort.InferenceSession(
                str(self.artifacts / entry.file), options, providers=self.providers
            )
        return self._sessions[component]

    def _twin_session(self, entry):
        """The float32 twin of a graph the CPU provider cannot run (bf16, FP8 in a bf16 graph, NVFP4)."""
        import tempfile

        from common.cpu_twin import fp32_twin, ort_session

        if self._twins is None:
            self._twins = tempfile.TemporaryDirectory(prefix="flux2-ort-twins-")
        twin = Path(self._twins.name) / entry.file
        if not twin.exists():
            fp32_twin(self.artifacts / entry.file, twin)
        return ort_session(twin)

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session(component)
        # A twin takes float32 where the graph took bf16.
        wanted = {i.name: i.type for i in session.get_inputs()}
        feeds = {
            name: (
                value.astype(np.float32) if wanted.get(name) == "tensor(float)" and value.dtype != np.float32 else value
            )
            for name, value in feeds.items()
        }
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def unload(self, component: str) -> None:
        self._sessions.pop(component, None)

    def close(self) -> None:
        self._sessions.clear()
        if self._twins is not None:
            self._twins.cleanup()
            self._twins = None
