"""python -m engines.build --artifacts DIR: one strongly typed TensorRT engine per exported component.

Plans go to DIR/engines/<component>.plan with DIR/engines/manifest.json (common.engine_manifest).
A plan is reused only when its cache key matches: the ONNX files' sha256, the TensorRT version,
the GPU name and compute capability, and the build flags; any change rebuilds it. Without
TensorRT or a GPU this prints one line saying so and exits 0: the runtime then uses ONNX Runtime.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import OneLineParser, run_cli
from common.engine_manifest import (
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    engines_dir,
    read_engine_manifest,
    write_engine_manifest,
)
from common.errors import Flux2TrtError, UsageError
from common.integrity import verify_artifacts
from common.manifest import key_of, read_manifest, sha256_file
from common.staging import folder_lock, remove_stale_staging

# Bump when the build code changes what a plan is for the same inputs: it invalidates cached plans.
ENGINE_CODE_VERSION = 1
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level


@dataclass(frozen=True)
class BuildConfig:
    opt_level: int = DEFAULT_OPT_LEVEL  # IBuilderConfig.builder_optimization_level, 0..5
    workspace_gib: float | None = None  # MemoryPoolType.WORKSPACE limit; None leaves TensorRT's default
    tf32: bool = False  # fp32 math stays fp32 (TensorRT enables TF32 unless told not to)

    def __post_init__(self):
        if not 0 <= self.opt_level <= 5:
            raise UsageError(
                f"--opt-level {self.opt_level} is out of range; TensorRT's builder optimization levels are 0..5"
            )
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise UsageError(
                f"--workspace {self.workspace_gib} GiB must be positive (or omitted for TensorRT's default)"
            )

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gib is None else int(self.workspace_gib * 2**30)

    def flags(self) -> dict:
        """What the plan depends on among the build settings: recorded, and part of the key."""
        return {
            "strongly_typed": True,
            "precision_flags": [],
            "tf32": self.tf32,
            "builder_optimization_level": self.opt_level,
            "workspace_bytes": self.workspace_bytes,
        }


def engine_key(*, component: str, onnx_sha256: dict, platform: dict, flags: dict) -> str:
    return key_of(
        {
            "component": component,
            "onnx_sha256": onnx_sha256,
            "platform": platform,
            "flags": flags,
            "code": ENGINE_CODE_VERSION,
        }
    )


def rebuild_reason(previous: dict | None, entry: dict, plan: Path) -> str | None:
    """Why a plan must be (re)built, or None when the recorded one is valid for `entry`."""
    if previous is None:
        return "no engine yet"
    if previous.get("key") == entry["key"]:
        if not plan.is_file() or plan.stat().st_size != previous.get("plan_bytes"):
            return "plan file missing or truncated"
        if sha256_file(plan) != previous.get("plan_sha256"):
            return "plan file differs from its recorded sha256"
        return None
    changed = [name for name in ("onnx_sha256", "platform", "flags") if previous.get(name) != entry[name]]
    return f"{', '.join(changed) or 'build code'} changed"


def _previous_engines(artifacts: Path) -> dict:
    try:
        return read_engine_manifest(artifacts).get("engines", {})
    except Flux2TrtError:
        return {}  # none yet, or unreadable: everything is built


def build_engines(
    *,
    artifacts: Path,
    force: bool = False,
    build: BuildConfig | None = None,
    timing_cache: Path | None = None,
    log=None,
    trt=None,
    platform: dict | None = None,
) -> dict | None:
    """Build (or reuse) a plan per component; return the engine manifest, or None when skipped.

    `trt` and `platform` default to the installed TensorRT and the present GPU; tests pass fakes.
    """
    log = log or (lambda message: print(message, flush=True))
    build = build or BuildConfig()
    artifacts = Path(artifacts).expanduser().absolute()
    manifest = read_manifest(artifacts)
    if trt is None:
        from common.tensorrt_env import present_platform, trt_status

        available, reason = trt_status()
        if not available:
            log(f"engine building skipped: {reason}; the runtime will use ONNX Runtime")
            return None
        import tensorrt as trt

        platform = platform or present_platform()
    if timing_cache is not None:
        timing_cache = Path(timing_cache).expanduser().absolute()
        if not timing_cache.parent.is_dir():
            raise UsageError(f"--timing-cache {timing_cache}: folder {timing_cache.parent} does not exist")

    from engines.trt_build import build_plan

    verify_artifacts(artifacts, manifest, log=log)  # a damaged weight file would build a plan that draws garbage
    folder = engines_dir(artifacts)
    folder.mkdir(exist_ok=True)
    remove_stale_staging(folder, log=log)  # plans half-written by a killed build
    previous = _previous_engines(artifacts)
    engines = {name: entry for name, entry in previous.items() if name in manifest["components"]}
    engine_manifest = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "precision": manifest["precision"],
    }
    components = manifest["components"]
    log(
        f"TensorRT {platform['tensorrt']} on {platform['gpu']} (sm {platform['compute_capability']}), flags {build.flags()}"
    )
    rows = []
    for number, (component, onnx_entry) in enumerate(components.items(), start=1):
        plan_name = f"{component}.plan"
        entry = {
            "plan": plan_name,
            "onnx": onnx_entry["file"],
            "onnx_sha256": onnx_entry["sha256"],
            "platform": platform,
            "flags": build.flags(),
            "inputs": onnx_entry["inputs"],
            "outputs": onnx_entry["outputs"],
        }
        entry["key"] = engine_key(
            component=component, onnx_sha256=entry["onnx_sha256"], platform=platform, flags=entry["flags"]
        )
        reason = "--force" if force else rebuild_reason(previous.get(component), entry, folder / plan_name)
        if reason is None:
            log(f"[{number}/{len(components)}] {component}: reused {folder / plan_name}")
            rows.append((component, "reused", previous[component]["plan_bytes"], 0.0))
            continue
        log(f"[{number}/{len(components)}] {component}: building ({reason}) from {artifacts / onnx_entry['file']}")
        started = time.perf_counter()
        build_plan(
            trt, artifacts / onnx_entry["file"], folder / plan_name, build, onnx_entry["inputs"], timing_cache, log
        )
        seconds = time.perf_counter() - started
        entry.update(
            plan_bytes=(folder / plan_name).stat().st_size,
            plan_sha256=sha256_file(folder / plan_name),
            build_seconds=round(seconds, 2),
            built=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            timing_cache=str(timing_cache) if timing_cache else None,
        )
        engines[component] = entry
        # After every plan, so an interrupted build keeps the engines already finished.
        write_engine_manifest(artifacts, {**engine_manifest, "engines": engines})
        log(
            f"[{number}/{len(components)}] {component}: built in {seconds:.1f} s, {entry['plan_bytes'] / 2**20:.1f} MiB"
        )
        rows.append((component, "built", entry["plan_bytes"], seconds))
    write_engine_manifest(artifacts, {**engine_manifest, "engines": engines})
    log(_summary(rows, folder))
    return {**engine_manifest, "engines": engines}


def _summary(rows, folder: Path) -> str:
    lines = [f"engines in {folder}", f"{'component':<13}{'status':<8}{'MiB':>10}{'sec':>8}"]
    lines += [f"{c:<13}{s:<8}{b / 2**20:>10.1f}{t:>8.1f}" for c, s, b, t in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m engines.build", description="Build TensorRT engines for an artifacts folder."
    )
    parser.add_argument("--artifacts", required=True, type=Path, help="artifacts folder written by python -m export")
    parser.add_argument("--force", action="store_true", help="rebuild every engine even when its cache key matches")
    parser.add_argument(
        "--opt-level", type=int, default=DEFAULT_OPT_LEVEL, help="builder optimization level 0..5 (default 3)"
    )
    parser.add_argument("--timing-cache", type=Path, default=None, help="timing cache file to read and update")
    parser.add_argument("--workspace", type=float, default=None, help="workspace memory pool limit in GiB")
    args = parser.parse_args(argv)
    with folder_lock(engines_dir(args.artifacts.expanduser().absolute()), "engine build"):
        build_engines(
            artifacts=args.artifacts,
            force=args.force,
            build=BuildConfig(opt_level=args.opt_level, workspace_gib=args.workspace),
            timing_cache=args.timing_cache,
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
