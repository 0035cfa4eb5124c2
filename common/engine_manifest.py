"""The engine manifest, `ARTIFACTS/engines/<target>/manifest.json`: what each TensorRT plan was built from.

Written by `engines.build`, read by the runtime's trt backend. One folder per build target
(`tensorrt`, `rtx`: common.tensorrt_env). Per component it records the plan file, its size and
sha256, the ONNX files' sha256 it was built from, the platform (target, TensorRT version, and the
GPU and compute capability for `tensorrt` or the compute capabilities for `rtx`), the build flags
and the cache key over all of these. A plan is used only when all of them match what is present.
"""

from __future__ import annotations

from pathlib import Path

from common.atomic import atomic_write_json
from common.errors import ArtifactsError
from common.manifest import read_versioned_json
from common.tensorrt_env import LABELS, runnable_compute_capabilities

ENGINES_DIR = "engines"
ENGINE_MANIFEST_NAME = "manifest.json"
ENGINE_FORMAT = "flux2-trt-engines"
ENGINE_FORMAT_VERSION = 2  # 2: one folder per target, the target in each platform


def engines_dir(artifacts: Path, target: str) -> Path:
    return Path(artifacts) / ENGINES_DIR / target


def build_command(artifacts: Path, target: str) -> str:
    return f"python -m engines.build --artifacts {artifacts} --target {target}"


def write_engine_manifest(artifacts: Path, target: str, manifest: dict) -> None:
    path = engines_dir(artifacts, target) / ENGINE_MANIFEST_NAME
    atomic_write_json(path, manifest)


def read_engine_manifest(artifacts: Path, target: str) -> dict:
    path = engines_dir(artifacts, target) / ENGINE_MANIFEST_NAME
    build = build_command(artifacts, target)
    if not path.is_file():
        raise ArtifactsError(
            f"{artifacts} has no {LABELS[target]} engines ({path} is missing); build them with `{build}`"
        )
    return read_versioned_json(path, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, fix=f"rebuild with `{build} --force`")


def _check_platform(plan: Path, built: dict, present: dict, precision: str, artifacts: Path) -> None:
    """Refuse a plan the present TensorRT or GPU cannot load (TensorRT plans: same version and GPU;
    TensorRT-RTX plans: same version, and a GPU among the compute capabilities they were built for)."""
    target = built.get("target", "tensorrt")
    label, build = LABELS[target], build_command(artifacts, target)
    if built["tensorrt"] != present["tensorrt"]:
        raise ArtifactsError(
            f"engine {plan} was built with {label} {built['tensorrt']}, this node has {label} {present['tensorrt']}; "
            f"plans only load in the version that built them: run `{build}` on this node"
        )
    if built.get("target") == "rtx":
        runs_on = runnable_compute_capabilities(built["compute_capabilities"], precision)
        if present["compute_capability"] not in runs_on:
            if present["compute_capability"] == "9.0":
                fix = f"Hopper is no TensorRT-RTX target: build with `{build_command(artifacts, 'tensorrt')}` on this node (needs TensorRT)"
            else:
                fix = f"rebuild with `{build} --compute-capability {present['compute_capability'].replace('.', '')}`"
            raise ArtifactsError(
                f"engine {plan} is a TensorRT-RTX {precision} engine for compute capability {', '.join(runs_on) or 'none'}; "
                f"this node's {present['gpu']} is {present['compute_capability']}: {fix}"
            )
        return
    if (built["gpu"], built["compute_capability"]) != (present["gpu"], present["compute_capability"]):
        raise ArtifactsError(
            f"engine {plan} was built for {built['gpu']} (compute capability {built['compute_capability']}), this node "
            f"has {present['gpu']} (compute capability {present['compute_capability']}); run `{build}` on this node"
        )


def check_engines_usable(engine_manifest: dict, artifacts_manifest: dict, present: dict, artifacts: Path) -> None:
    """Refuse (ArtifactsError) engines built for another GPU or TensorRT, or from other ONNX files."""
    target = present.get("target", "tensorrt")
    build = build_command(artifacts, target)
    folder = engines_dir(artifacts, target)
    engines = engine_manifest.get("engines", {})
    precision = artifacts_manifest.get("precision", "fp32")
    for component, onnx_entry in artifacts_manifest.get("components", {}).items():
        entry = engines.get(component)
        if entry is None:
            raise ArtifactsError(f"{folder} has no engine for {component}; run `{build}`")
        plan = folder / entry["plan"]
        _check_platform(plan, entry["platform"], present, precision, artifacts)
        if entry["onnx_sha256"] != onnx_entry["sha256"]:
            raise ArtifactsError(
                f"engine {plan} was built from other {component} ONNX files than {artifacts} now holds (re-exported since?); "
                f"run `{build}`"
            )
        if not plan.is_file() or plan.stat().st_size != entry["plan_bytes"]:
            raise ArtifactsError(
                f"engine {plan} is missing or not the size its manifest records; run `{build} --force`"
            )
