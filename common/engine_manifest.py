"""The engine manifest, `ARTIFACTS/engines/manifest.json`: what each TensorRT plan was built from.

Written by `engines.build`, read by the runtime's trt backend. Per component it records the plan
file and its sha256, the ONNX files' sha256 it was built from, the TensorRT version, the GPU name
and compute capability, the build flags and the cache key over all of these. A plan is used only
when all of them match what is present.
"""

from __future__ import annotations

from pathlib import Path

from common.atomic import atomic_write_json
from common.errors import ArtifactsError
from common.manifest import read_versioned_json

ENGINES_DIR = "engines"
ENGINE_MANIFEST_NAME = "manifest.json"
ENGINE_FORMAT = "flux2-trt-engines"
ENGINE_FORMAT_VERSION = 1


def engines_dir(artifacts: Path) -> Path:
    return Path(artifacts) / ENGINES_DIR


def write_engine_manifest(artifacts: Path, manifest: dict) -> None:
    atomic_write_json(engines_dir(artifacts) / ENGINE_MANIFEST_NAME, manifest)


def read_engine_manifest(artifacts: Path) -> dict:
    path = engines_dir(artifacts) / ENGINE_MANIFEST_NAME
    build = f"python -m engines.build --artifacts {artifacts}"
    if not path.is_file():
        raise ArtifactsError(f"{artifacts} has no TensorRT engines ({path} is missing); build them with `{build}`")
    return read_versioned_json(path, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, fix=f"rebuild with `{build} --force`")


def check_engines_usable(engine_manifest: dict, artifacts_manifest: dict, present: dict, artifacts: Path) -> None:
    """Refuse (ArtifactsError) engines built for another GPU or TensorRT, or from other ONNX files."""
    build = f"python -m engines.build --artifacts {artifacts}"
    engines = engine_manifest.get("engines", {})
    for component, onnx_entry in artifacts_manifest.get("components", {}).items():
        entry = engines.get(component)
        if entry is None:
            raise ArtifactsError(f"{engines_dir(artifacts)} has no engine for {component}; run `{build}`")
        plan = engines_dir(artifacts) / entry["plan"]
        built = entry["platform"]
        if built["tensorrt"] != present["tensorrt"]:
            raise ArtifactsError(
                f"engine {plan} was built with TensorRT {built['tensorrt']}, this node has TensorRT {present['tensorrt']}; "
                f"plans only load in the TensorRT version that built them: run `{build}` on this node"
            )
        if (built["gpu"], built["compute_capability"]) != (present["gpu"], present["compute_capability"]):
            raise ArtifactsError(
                f"engine {plan} was built for {built['gpu']} (compute capability {built['compute_capability']}), this node "
                f"has {present['gpu']} (compute capability {present['compute_capability']}); run `{build}` on this node"
            )
        if entry["onnx_sha256"] != onnx_entry["sha256"]:
            raise ArtifactsError(
                f"engine {plan} was built from other {component} ONNX files than {artifacts} now holds (re-exported since?); "
                f"run `{build}`"
            )
        if not plan.is_file() or plan.stat().st_size != entry["plan_bytes"]:
            raise ArtifactsError(
                f"engine {plan} is missing or not the size its manifest records; run `{build} --force`"
            )
