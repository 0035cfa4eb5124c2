"""The engine manifest, `ARTIFACTS/engines/<target>/manifest.json`: what each TensorRT plan was built from.

Written by `engines.build`, read by the runtime's trt backend. One folder per build target
(`tensorrt`, `rtx`: common.tensorrt_env). Per component it records the plan file, its size and
sha256, the ONNX files' sha256 it was built from, the platform (target, TensorRT version, and the
GPU and compute capability for `tensorrt` or the compute capabilities for `rtx`), the build flags
and the cache key over all of these. A plan is used only when all of them match what is present.
Read into `EngineManifest` (typed records): a manifest missing a field is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_json
from common.errors import ArtifactsError
from common.manifest import (
    ArtifactsManifest,
    parse_manifest,
    parse_records,
    read_versioned_json,
    tensors_from_json,
    tensors_to_json,
)
from common.specs import TensorSpec
from common.tensorrt_env import LABELS, TARGETS, Platform, runnable_compute_capabilities

ENGINES_DIR = "engines"
ENGINE_MANIFEST_NAME = "manifest.json"
ENGINE_FORMAT = "flux2-trt-engines"
ENGINE_FORMAT_VERSION = 2  # 2: one folder per target, the target in each platform


@dataclass(frozen=True)
class EngineRecord:
    """One plan: its file, what it was built from and for, with which flags, and its size and sha256."""

    plan: str  # file name in engines/<target>/
    onnx: str
    onnx_sha256: dict[str, str]  # the ONNX files' sha256 it was built from (graph and external data)
    platform: Platform
    flags: dict  # engines.build's BuildConfig.flags(): compared and keyed as a whole
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    key: str  # over onnx_sha256, platform, flags and the build code: a plan is reused only under it
    plan_bytes: int
    plan_sha256: str
    build_seconds: float
    built: str
    timing_cache: dict | None = None

    @property
    def strip_weights(self) -> bool:
        """A weight-stripped plan: the runtime refits it from the ONNX external data."""
        return bool(self.flags.get("strip_weights"))

    def to_json(self) -> dict:
        return {
            "plan": self.plan,
            "onnx": self.onnx,
            "onnx_sha256": dict(self.onnx_sha256),
            "platform": self.platform.to_json(),
            "flags": dict(self.flags),
            "inputs": tensors_to_json(self.inputs),
            "outputs": tensors_to_json(self.outputs),
            "key": self.key,
            "plan_bytes": self.plan_bytes,
            "plan_sha256": self.plan_sha256,
            "build_seconds": self.build_seconds,
            "built": self.built,
            "timing_cache": self.timing_cache,
        }

    @classmethod
    def from_json(cls, data: dict) -> EngineRecord:
        return cls(
            plan=str(data["plan"]),
            onnx=str(data["onnx"]),
            onnx_sha256={str(k): str(v) for k, v in data["onnx_sha256"].items()},
            platform=Platform.from_json(data["platform"]),
            flags=dict(data["flags"]),
            inputs=tensors_from_json(data["inputs"]),
            outputs=tensors_from_json(data["outputs"]),
            key=str(data["key"]),
            plan_bytes=int(data["plan_bytes"]),
            plan_sha256=str(data["plan_sha256"]),
            build_seconds=float(data.get("build_seconds", 0.0)),
            built=str(data.get("built", "")),
            timing_cache=data.get("timing_cache"),
        )


@dataclass(frozen=True)
class EngineManifest:
    """`ARTIFACTS/engines/<target>/manifest.json`: the plans built for one target from one export."""

    target: str
    precision: str
    engines: dict[str, EngineRecord]

    def to_json(self) -> dict:
        return {
            "format": ENGINE_FORMAT,
            "format_version": ENGINE_FORMAT_VERSION,
            "target": self.target,
            "precision": self.precision,
            "engines": {name: record.to_json() for name, record in self.engines.items()},
        }

    @classmethod
    def from_json(cls, data: dict, path: Path, *, fix: str) -> EngineManifest:
        """The manifest in `data` (read from `path`); ArtifactsError naming the field when one is missing or malformed."""
        return parse_manifest(
            path,
            fix,
            lambda: cls(
                target=str(data["target"]),
                precision=str(data["precision"]),
                engines=parse_records(data["engines"], "engines", EngineRecord.from_json),
            ),
        )


def engines_dir(artifacts: Path, target: str) -> Path:
    return Path(artifacts) / ENGINES_DIR / target


def targets_with_engines(artifacts: Path) -> list[str]:
    """The targets (tensorrt, then rtx: the trt backend's order) whose engine manifest `artifacts` holds."""
    return [t for t in TARGETS if (engines_dir(artifacts, t) / ENGINE_MANIFEST_NAME).is_file()]


def build_command(artifacts: Path, target: str) -> str:
    return f"python -m engines.build --artifacts {artifacts} --target {target}"


def write_engine_manifest(artifacts: Path, manifest: EngineManifest) -> None:
    path = engines_dir(artifacts, manifest.target) / ENGINE_MANIFEST_NAME
    atomic_write_json(path, manifest.to_json())


def read_engine_manifest(artifacts: Path, target: str) -> EngineManifest:
    path = engines_dir(artifacts, target) / ENGINE_MANIFEST_NAME
    build = build_command(artifacts, target)
    if not path.is_file():
        raise ArtifactsError(
            f"{artifacts} has no {LABELS[target]} engines ({path} is missing); build them with `{build}`"
        )
    fix = f"rebuild with `{build} --force`"
    data = read_versioned_json(path, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, fix=fix)
    return EngineManifest.from_json(data, path, fix=fix)


def _check_platform(plan: Path, built: Platform, present: Platform, precision: str, artifacts: Path) -> None:
    """Refuse a plan the present TensorRT or GPU cannot load (TensorRT plans: same version and GPU;
    TensorRT-RTX plans: same version, and a GPU among the compute capabilities they were built for)."""
    label, build = LABELS[built.target], build_command(artifacts, built.target)
    if built.tensorrt != present.tensorrt:
        raise ArtifactsError(
            f"engine {plan} was built with {label} {built.tensorrt}, this node has {label} {present.tensorrt}; "
            f"plans only load in the version that built them: run `{build}` on this node"
        )
    if built.target == "rtx":
        runs_on = runnable_compute_capabilities(built.compute_capabilities or (), precision)
        if present.compute_capability not in runs_on:
            if present.compute_capability == "9.0":
                fix = f"Hopper is no TensorRT-RTX target: build with `{build_command(artifacts, 'tensorrt')}` on this node (needs TensorRT)"
            else:
                fix = f"rebuild with `{build} --compute-capability {str(present.compute_capability).replace('.', '')}`"
            raise ArtifactsError(
                f"engine {plan} is a TensorRT-RTX {precision} engine for compute capability {', '.join(runs_on) or 'none'}; "
                f"this node's {present.gpu} is {present.compute_capability}: {fix}"
            )
        return
    if (built.gpu, built.compute_capability) != (present.gpu, present.compute_capability):
        raise ArtifactsError(
            f"engine {plan} was built for {built.gpu} (compute capability {built.compute_capability}), this node "
            f"has {present.gpu} (compute capability {present.compute_capability}); run `{build}` on this node"
        )


def check_engines_usable(
    engine_manifest: EngineManifest, artifacts_manifest: ArtifactsManifest, present: Platform, artifacts: Path
) -> None:
    """Refuse (ArtifactsError) engines built for another GPU or TensorRT, or from other ONNX files."""
    build = build_command(artifacts, present.target)
    folder = engines_dir(artifacts, present.target)
    for component, onnx_record in artifacts_manifest.components.items():
        # By the graph's file stem: a view of one size of a --resolutions folder (runtime.artifacts) names
        # `transformer` the graph whose plan is `transformer_<H>x<W>`.
        entry = engine_manifest.engines.get(Path(onnx_record.file).stem)
        if entry is None:
            raise ArtifactsError(f"{folder} has no engine for {component}; run `{build}`")
        plan = folder / entry.plan
        _check_platform(plan, entry.platform, present, artifacts_manifest.precision, artifacts)
        if entry.onnx_sha256 != onnx_record.sha256:
            raise ArtifactsError(
                f"engine {plan} was built from other {component} ONNX files than {artifacts} now holds (re-exported since?); "
                f"run `{build}`"
            )
        if not plan.is_file() or plan.stat().st_size != entry.plan_bytes:
            raise ArtifactsError(
                f"engine {plan} is missing or not the size its manifest records; run `{build} --force`"
            )
