"""Choosing a backend: probe what this machine offers once, choose by a pure function, then open it.

`probe` asks each candidate once (TensorRT: a target module, a GPU and that target's engines in
the artifacts; ONNX Runtime: its providers; torch: torch and diffusers installed) and returns a
frozen `Availability`. `choose_backend(requested, precision, availability, policy)` reads only its
arguments: `auto` is trt, else ort where ONNX Runtime runs the artifacts' precision here, else
torch; a named backend is that backend or a UsageError saying why not and what to use instead.
`select_backend` is the three in a row, and what every command line and the Triton model call.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError
from common.manifest import ArtifactsManifest
from common.precision import Precision
from common.precision import precision as declared
from runtime.backends import Backend

BACKENDS = ("auto", "trt", "ort", "torch")
# What a Triton model may run: the server's Python-backend environment carries no torch/diffusers.
SERVED_BACKENDS = ("auto", "trt", "ort")
AUTO_ORDER = ("trt", "ort", "torch")  # what `auto` tries, first runnable wins


@dataclass(frozen=True)
class Policy:
    """What a caller lets the choice do: the backends it may run, and what an `ort` request runs
    where ONNX Runtime cannot run the artifacts' precision (None: refuse)."""

    allowed: tuple[str, ...] = BACKENDS
    ort_stand_in: str | None = None


COMMAND_LINE = Policy()
SERVED = Policy(allowed=SERVED_BACKENDS)
# runtime.check measures what can run: bf16/fp8 on a CPU node runs diffusers' modules, and its report says so.
CHECK = Policy(ort_stand_in="torch")


@dataclass(frozen=True)
class Availability:
    """What `probe` found for one artifacts folder; a backend that was not a candidate was not probed."""

    artifacts: Path
    probed: tuple[str, ...] = ()
    trt_target: str | None = None  # "tensorrt" | "rtx": its module, a GPU and its engines are here
    trt_reason: str = ""  # the target and GPU found, or why none runs
    ort_providers: tuple[str, ...] = ()  # onnxruntime's, CUDA first; () when onnxruntime is not installed
    torch_missing: str | None = None  # why torch + diffusers cannot be imported; None when they can


def candidates(requested: str, policy: Policy = COMMAND_LINE) -> tuple[str, ...]:
    """The backends `requested` may end on, in the order they are tried."""
    if requested == "auto":
        return tuple(name for name in AUTO_ORDER if name in policy.allowed)
    if requested == "ort" and policy.ort_stand_in is not None:
        return ("ort", policy.ort_stand_in)
    return (requested,)


def probe(artifacts: Path, backends: tuple[str, ...] = AUTO_ORDER) -> Availability:
    """Ask the machine, once, about each of `backends`: the only function here that looks outside its arguments."""
    found: dict = {}
    if "trt" in backends:
        found["trt_target"], found["trt_reason"] = _probe_trt(Path(artifacts))
    if "ort" in backends:
        try:
            from runtime.backends.ort import ort_providers

            found["ort_providers"] = tuple(ort_providers())
        except ImportError:
            found["ort_providers"] = ()
    if "torch" in backends:
        # Found, not imported: importing diffusers costs seconds, and only the torch backend needs it.
        missing = [name for name in ("torch", "diffusers") if importlib.util.find_spec(name) is None]
        found["torch_missing"] = f"No module named {missing[0]!r}" if missing else None
    return Availability(Path(artifacts), probed=tuple(backends), **found)


def _probe_trt(artifacts: Path) -> tuple[str | None, str]:
    try:
        from runtime.backends.trt import runtime_target
    except ImportError as exc:  # the module itself is missing from this install
        return None, f"TensorRT backend unavailable ({exc})"
    return runtime_target(artifacts)


def refusal(name: str, precision: Precision, available: Availability) -> str | None:
    """Why backend `name` cannot run artifacts of `precision` on the probed machine; None when it can."""
    assert name in available.probed, f"backend {name} was not probed"
    if name == "trt":
        if available.trt_target is None:
            return f"backend trt is not available: {available.trt_reason}; use --backend ort or torch"
        return None
    if name == "ort":
        if not available.ort_providers:
            return "backend ort needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu on GPU nodes)"
        from runtime.backends.ort import cannot_run

        return cannot_run(available.ort_providers, precision.name, available.artifacts)
    assert name == "torch", name
    if available.torch_missing is not None:
        return f"backend torch needs torch and diffusers ({available.torch_missing}); install flux2-trt's dependencies"
    return None


def check_name(requested: str, policy: Policy = COMMAND_LINE) -> None:
    if requested not in policy.allowed:
        raise UsageError(f"unknown backend {requested!r}; choose one of {', '.join(policy.allowed)}")


def choose_backend(requested: str, precision: Precision, available: Availability, policy: Policy = COMMAND_LINE) -> str:
    """The backend to open ("trt", "ort" or "torch"): a pure function of its arguments, or a UsageError."""
    check_name(requested, policy)
    tried = candidates(requested, policy)
    reasons = {name: refusal(name, precision, available) for name in tried}
    for name in tried:
        if reasons[name] is None:
            return name
    if len(tried) == 1:
        raise UsageError(reasons[requested])
    raise UsageError(f"no backend here runs these {precision} artifacts: {'; '.join(reasons.values())}")


def open_backend(
    name: str,
    available: Availability,
    manifest: ArtifactsManifest,
    *,
    low_vram: bool = False,
    checkpoint: Path | None = None,
) -> Backend:
    """The chosen backend over the probed artifacts (TensorRT on the probed target: no second probe)."""
    if name == "trt":
        from common.tensorrt_env import import_trt, present_platform
        from runtime.backends.trt import TrtBackend

        target = available.trt_target
        return TrtBackend(
            available.artifacts,
            manifest,
            low_vram=low_vram,
            trt_module=import_trt(target),
            platform=present_platform(target),
        )
    if name == "ort":
        from runtime.backends.ort import OrtBackend

        return OrtBackend(available.artifacts, manifest, low_vram=low_vram, providers=list(available.ort_providers))
    from runtime.backends.torch_backend import TorchBackend

    return TorchBackend(available.artifacts, manifest, low_vram=low_vram, checkpoint=checkpoint)


def select_backend(
    name: str,
    artifacts: Path,
    manifest: ArtifactsManifest,
    *,
    low_vram: bool = False,
    checkpoint: Path | None = None,
    log=None,
    policy: Policy = COMMAND_LINE,
) -> Backend:
    """Probe, choose, open; log what `auto` (or a policy's stand-in) picked and why.

    `checkpoint` overrides the manifest's source checkpoint for the torch backend (artifacts moved).
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    check_name(name, policy)
    precision = declared(manifest.precision)
    available = probe(artifacts, candidates(name, policy))
    chosen = choose_backend(name, precision, available, policy)
    if name == "auto" and chosen != "trt":
        log(f"backend: TensorRT not used: {available.trt_reason}")
    backend = open_backend(chosen, available, manifest, low_vram=low_vram, checkpoint=checkpoint)
    if name == "auto":
        picked = backend.name if chosen == "ort" else chosen
        why = {"trt": available.trt_reason, "torch": refusal("ort", precision, available)}.get(chosen)
        log(f"backend: auto picked {picked}" + (f" ({why})" if why else ""))
    elif chosen != name:
        log(f"backend: {name} cannot run here ({refusal(name, precision, available)}); running {backend.name}")
    return backend
