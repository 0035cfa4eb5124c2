"""python -m engines.build --artifacts DIR [--target auto|tensorrt|rtx]: one strongly typed engine per component.

Plans go to DIR/engines/<target>/<component>.plan with DIR/engines/<target>/manifest.json
(common.engine_manifest). Targets (common.tensorrt_env): `tensorrt` builds with TensorRT for the GPU
it runs on; `rtx` builds TensorRT-RTX engines ahead of time on any machine, for a list of compute
capabilities; `auto` takes `tensorrt` where it and a GPU are present, else `rtx` where
`tensorrt_rtx` imports, else prints one line saying why nothing was built and exits 0 (the runtime
then uses ONNX Runtime). A plan is reused only when its cache key matches: the target and its
version, the GPU or compute capabilities, the ONNX files' sha256 and the build flags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from common.atomic import atomic_write_bytes, atomic_write_via
from common.cli import OneLineParser, run_cli
from common.engine_manifest import (
    ENGINES_DIR,
    EngineManifest,
    EngineRecord,
    engines_dir,
    read_engine_manifest,
    write_engine_manifest,
)
from common.errors import Flux2TrtError, UsageError
from common.integrity import verify_artifacts
from common.manifest import ComponentRecord, key_of, read_manifest, sha256_file
from common.precision import PRECISIONS
from common.precision import precision as declared
from common.staging import folder_lock, remove_stale_staging
from common.tensorrt_env import (
    RTX_COMPUTE_CAPABILITIES,
    RTX_DEFAULT_COMPUTE_CAPABILITIES,
    TARGETS,
    Platform,
    cc_tuple,
)

if TYPE_CHECKING:
    from engines.trt_build import TrtApi

# Bump when the build code changes what a plan is for the same inputs: it invalidates cached plans.
ENGINE_CODE_VERSION = 2
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level


def parse_compute_capabilities(text: str) -> tuple[str, ...]:
    """`89,120` or `8.9,12.0` -> ("8.9", "12.0"), each one TensorRT-RTX can target."""
    capabilities = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        capability = part if "." in part else f"{part[:-1]}.{part[-1:]}"
        if capability == "9.0":
            raise UsageError(
                f"--compute-capability {part}: 9.0 (Hopper, H100/H200) is no TensorRT-RTX target; "
                f"build those engines with --target tensorrt on the node"
            )
        if capability not in RTX_COMPUTE_CAPABILITIES:
            raise UsageError(
                f"--compute-capability {part} is not a TensorRT-RTX target; choose from "
                f"{', '.join(c.replace('.', '') for c in RTX_COMPUTE_CAPABILITIES)}"
            )
        if capability not in capabilities:
            capabilities.append(capability)
    if not capabilities:
        raise UsageError(f"--compute-capability {text!r} names no compute capability, e.g. 89,120")
    return tuple(capabilities)


@dataclass(frozen=True)
class BuildConfig:
    opt_level: int = DEFAULT_OPT_LEVEL  # IBuilderConfig.builder_optimization_level, 0..5
    workspace_gib: float | None = None  # MemoryPoolType.WORKSPACE limit; None leaves TensorRT's default
    tf32: bool = False  # fp32 math stays fp32 (TensorRT enables TF32 unless told not to)
    compute_capabilities: tuple[str, ...] | None = None  # rtx only; None: TensorRT-RTX's defaults
    strip_weights: bool = False  # weight-stripped, refittable plans: weights come from the ONNX at load

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
            "strip_weights": self.strip_weights,
        }


@dataclass(frozen=True)
class PlanInputs:
    """What one plan is built from and for; its key decides whether a recorded plan is reused."""

    component: str
    onnx_sha256: dict[str, str]
    platform: Platform
    flags: dict

    @property
    def key(self) -> str:
        return key_of(
            {
                "component": self.component,
                "onnx_sha256": self.onnx_sha256,
                "platform": self.platform.to_json(),
                "flags": self.flags,
                "code": ENGINE_CODE_VERSION,
            }
        )


def rebuild_reason(previous: EngineRecord | None, wanted: PlanInputs, plan: Path) -> str | None:
    """Why a plan must be (re)built, or None when the recorded one is valid for `wanted`."""
    if previous is None:
        return "no engine yet"
    if previous.key == wanted.key:
        if not plan.is_file() or plan.stat().st_size != previous.plan_bytes:
            return "plan file missing or truncated"
        if sha256_file(plan) != previous.plan_sha256:
            return "plan file differs from its recorded sha256"
        return None
    changed = [
        name for name in ("onnx_sha256", "platform", "flags") if getattr(previous, name) != getattr(wanted, name)
    ]
    return f"{', '.join(changed) or 'build code'} changed"


def _previous_engines(artifacts: Path, target: str) -> dict[str, EngineRecord]:
    try:
        return read_engine_manifest(artifacts, target).engines
    except Flux2TrtError:
        return {}  # none yet, or unreadable: everything is built


def _resolve_target(requested: str, log) -> str | None:
    """The target to build for, or None after logging the one line that says why nothing is built."""
    from common.tensorrt_env import module_status, resolve_build_target, trt_status

    if requested not in ("auto", *TARGETS):
        raise UsageError(f"--target {requested!r} is unknown; choose auto, {', '.join(TARGETS)}")
    target, found = resolve_build_target(requested)
    if target is None:
        log(f"engine building skipped: {found}; the runtime will use ONNX Runtime")
        return None
    ok, reason = trt_status("tensorrt") if target == "tensorrt" else module_status("rtx")
    if not ok:
        log(f"engine building skipped: {reason}; the runtime will use ONNX Runtime")
        return None
    if target == "rtx":
        log(
            f"{reason} builds engines ahead of time for RTX and workstation GPUs; data-center (Hopper) engines "
            f"need TensorRT on the node (--target tensorrt there)"
        )
    return target


def _platform(target: str, trt, build: BuildConfig, capabilities_from: str | None = None) -> Platform:
    """What this machine builds for: its GPU (tensorrt), or the compute capabilities asked for (rtx)."""
    if target == "tensorrt":
        from common.tensorrt_env import present_gpu

        gpu, capability = present_gpu()
        return Platform(target, trt.__version__, gpu=gpu, compute_capability=capability)
    if build.strip_weights:
        from common.tensorrt_env import gpu_status

        present, why = gpu_status()
        if not present:
            raise UsageError(
                f"--strip-weights: TensorRT-RTX {trt.__version__} compiles refittable plans only with a CUDA GPU "
                f"present ({why}; measured: its kernel compiler fails its CUDA check); build them on a GPU node "
                f"or leave --strip-weights out"
            )
    capabilities = build.compute_capabilities or RTX_DEFAULT_COMPUTE_CAPABILITIES
    source = capabilities_from or ("--compute-capability" if build.compute_capabilities else "TensorRT-RTX default")
    return Platform(target, trt.__version__, compute_capabilities=capabilities, compute_capabilities_from=source)


def _for_precision(target: str, build: BuildConfig, precision: str) -> tuple[BuildConfig, str | None]:
    """`build` with the precision's own TensorRT-RTX targets where none were asked for (nvfp4: 12.0,
    12.1), so the builder is told them and the manifest records what the plan holds; and where they
    came from (None: from `build` itself)."""
    own = declared(precision).rtx_compute_capabilities
    if target != "rtx" or build.compute_capabilities or not own:
        return build, None
    return replace(build, compute_capabilities=own), f"{precision} default"


def _check_precision_fits(target: str, build: BuildConfig, precision: str) -> None:
    if build.compute_capabilities and target != "rtx":
        raise UsageError("--compute-capability applies to --target rtx; TensorRT builds for the GPU it runs on")
    declaration = declared(precision)
    old = [c for c in build.compute_capabilities or () if not declaration.runs_on(cc_tuple(c))]
    if old:
        raise UsageError(
            f"--compute-capability {','.join(c.replace('.', '') for c in old)} cannot run {precision} engines "
            f"({declaration.capability_need()}); drop it{_buildable_here(declaration)} or export at {declaration.traced}"
        )


def _buildable_here(declaration) -> str:
    own = declaration.rtx_compute_capabilities
    return f" (TensorRT-RTX builds {declaration} for {','.join(c.replace('.', '') for c in own)})" if own else ""


def _check_gpu_fits(platform: Platform, precision: str) -> None:
    """`--target tensorrt` builds for the GPU it runs on: refuse one whose tensor cores lack the precision."""
    declaration = declared(precision)
    if platform.compute_capability is None or declaration.runs_on(cc_tuple(platform.compute_capability)):
        return
    raise UsageError(
        f"this node's {platform.gpu} (compute capability {platform.compute_capability}) cannot run {precision} "
        f"engines ({declaration.capability_need()}); build them on such a GPU or export at {declaration.traced}"
    )


@dataclass
class TimingCache:
    """The --timing-cache file through one build: the bytes each plan starts from, and what the
    manifest records about it (a new dict when that changes, so records already made keep theirs)."""

    path: Path | None
    data: bytes | None  # None: no timing cache; b"": start an empty one
    record: dict | None

    @classmethod
    def open(cls, path: Path | None, api, log) -> TimingCache:
        if path is None:
            return cls(None, None, None)
        path = Path(path).expanduser().absolute()
        if not path.parent.is_dir():
            raise UsageError(f"--timing-cache {path}: folder {path.parent} does not exist")
        if not api.has_timing_cache:
            log(
                f"timing cache {path} discarded: {api.label} {api.version} has no timing cache (its timing-cache "
                f"calls are deprecated no-ops); building without one"
            )
            return cls(path, None, {"file": str(path), "used": False})
        return cls(path, path.read_bytes() if path.is_file() else b"", {"file": str(path), "used": True})

    def rejected(self, api, log) -> None:
        log(
            f"timing cache {self.path} discarded: {api.label} {api.version} rejected it (another GPU or "
            f"version, or damaged); a fresh cache was used and is written back"
        )
        self.record = {**self.record, "discarded": True}

    def update(self, data: bytes | None) -> None:
        if data is not None:
            self.data = data
            atomic_write_bytes(self.path, data)


def plan_file(component: str) -> str:
    """The plan's file name in engines/<target>/."""
    return f"{component}.plan"


@dataclass(frozen=True)
class EngineJob:
    """One component of a build: what its plan is built from, and why it is built (None: reused)."""

    number: int  # 1-based, for the [n/N] progress lines
    component: str
    onnx: ComponentRecord
    wanted: PlanInputs
    reason: str | None

    @property
    def plan_name(self) -> str:
        return plan_file(self.component)


@dataclass(frozen=True)
class BuildPlan:
    """What one build does, decided before anything is built: the target, its module and platform,
    and per component whether its recorded plan is reused."""

    artifacts: Path
    target: str
    precision: str
    api: TrtApi
    platform: Platform
    build: BuildConfig
    timing_cache: TimingCache  # the one part that changes as plans are built
    folder: Path  # engines/<target>
    kept: dict[str, EngineRecord]  # the recorded engines of components the artifacts still hold
    jobs: tuple[EngineJob, ...]

    def manifest(self, engines: dict[str, EngineRecord]) -> EngineManifest:
        return EngineManifest(target=self.target, precision=self.precision, engines=dict(engines))


def _target_module(target: str, trt, log) -> tuple[str | None, object]:
    """(target, module) to build with, or (None, None) after the one line that says why nothing is built."""
    if trt is None:
        target = _resolve_target(target, log)
        if target is None:
            return None, None
        from common.tensorrt_env import import_trt

        return target, import_trt(target)
    if target not in TARGETS:
        raise UsageError(f"a given trt module needs an explicit target ({', '.join(TARGETS)}), not {target!r}")
    return target, trt


def plan_build(
    *, artifacts: Path, target: str, force: bool, build: BuildConfig, timing_cache: Path | None, log, trt, platform
) -> BuildPlan | None:
    """Resolve the target, check the artifacts and decide per component: build (and why) or reuse.

    None when no target can build here (after logging why). Removes what a killed build left, and
    checks every weight file, before anything is built.
    """
    from engines.trt_build import TrtApi

    artifacts = Path(artifacts).expanduser().absolute()
    manifest = read_manifest(artifacts)
    target, trt = _target_module(target, trt, log)
    if target is None:
        return None
    _check_precision_fits(target, build, manifest.precision)
    build, capabilities_from = _for_precision(target, build, manifest.precision)
    platform = platform or _platform(target, trt, build, capabilities_from)
    _check_gpu_fits(platform, manifest.precision)
    api = TrtApi(trt, target)
    cache = TimingCache.open(timing_cache, api, log)

    verify_artifacts(artifacts, manifest, log=log)  # a damaged weight file would build a plan that draws garbage
    folder = engines_dir(artifacts, target)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder, log=log)  # plans half-written by a killed build
    previous = _previous_engines(artifacts, target)
    components = manifest.components
    jobs = []
    for number, (component, onnx_record) in enumerate(components.items(), start=1):
        wanted = PlanInputs(component, onnx_record.sha256, platform, build.flags())
        reason = "--force" if force else rebuild_reason(previous.get(component), wanted, folder / plan_file(component))
        jobs.append(EngineJob(number, component, onnx_record, wanted, reason))
    kept = {name: record for name, record in previous.items() if name in components}
    return BuildPlan(artifacts, target, manifest.precision, api, platform, build, cache, folder, kept, tuple(jobs))


def _engine_record(
    job: EngineJob, platform: Platform, built, seconds: float, timing_cache: dict | None
) -> EngineRecord:
    """What the manifest records about the plan just built for `job` (`built`: engines.trt_build.BuiltPlan)."""
    return EngineRecord(
        plan=job.plan_name,
        onnx=job.onnx.file,
        onnx_sha256=job.wanted.onnx_sha256,
        platform=platform,
        flags=job.wanted.flags,
        inputs=job.onnx.inputs,
        outputs=job.onnx.outputs,
        key=job.wanted.key,
        plan_bytes=built.plan_bytes,
        plan_sha256=built.plan_sha256,
        build_seconds=round(seconds, 2),
        built=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        timing_cache=timing_cache,
    )


def _build_one(plan: BuildPlan, job: EngineJob, engines: dict[str, EngineRecord], log) -> tuple:
    """Build `job`'s plan, write it and record it in `engines` and the manifest; returns its summary row."""
    from engines.trt_build import build_plan

    progress = f"[{job.number}/{len(plan.jobs)}] {job.component}"
    api, cache = plan.api, plan.timing_cache
    log(f"{progress}: building ({job.reason}) from {plan.artifacts / job.onnx.file}")
    started = time.perf_counter()
    results = []

    def build_into(temporary: Path) -> None:
        # The plan streams into a hidden temporary file as TensorRT serializes it (never whole in
        # memory); it takes the plan's name only once built, hashed and synced.
        with open(temporary, "wb") as sink:
            results.append(
                build_plan(api, plan.artifacts / job.onnx.file, plan.build, job.onnx.inputs, cache.data, log, sink)
            )

    atomic_write_via(plan.folder / job.plan_name, build_into)
    built, seconds = results[0], time.perf_counter() - started
    if built.timing_cache_discarded:
        cache.rejected(api, log)
    engines[job.component] = _engine_record(job, plan.platform, built, seconds, cache.record)
    # After every plan, so an interrupted build keeps the engines already finished.
    write_engine_manifest(plan.artifacts, plan.manifest(engines))
    cache.update(built.timing_cache)
    plan_bytes = engines[job.component].plan_bytes
    log(f"{progress}: built in {seconds:.1f} s, {plan_bytes / 2**20:.1f} MiB")
    return (job.component, "built", plan_bytes, seconds)


def build_engines(
    *,
    artifacts: Path,
    target: str = "auto",
    force: bool = False,
    build: BuildConfig | None = None,
    timing_cache: Path | None = None,
    log=None,
    trt=None,
    platform: Platform | None = None,
) -> EngineManifest | None:
    """Build (or reuse) a plan per component; return the engine manifest, or None when skipped.

    `trt` and `platform` default to the target's installed module and what it builds for; tests
    of the GPU-only parts pass a fake module with an explicit target.
    """
    log = log or (lambda message: print(message, flush=True))
    build = build or BuildConfig()
    plan = plan_build(
        artifacts=artifacts,
        target=target,
        force=force,
        build=build,
        timing_cache=timing_cache,
        log=log,
        trt=trt,
        platform=platform,
    )
    if plan is None:
        return None
    engines = dict(plan.kept)
    log(f"{plan.api.label} {plan.api.version} for {plan.platform.describe()}, flags {build.flags()}")
    rows = []
    for job in plan.jobs:
        if job.reason is None:
            log(f"[{job.number}/{len(plan.jobs)}] {job.component}: reused {plan.folder / job.plan_name}")
            rows.append((job.component, "reused", engines[job.component].plan_bytes, 0.0))
        else:
            rows.append(_build_one(plan, job, engines, log))
    write_engine_manifest(plan.artifacts, plan.manifest(engines))
    log(_summary(rows, plan.folder))
    return plan.manifest(engines)


def _summary(rows, folder: Path) -> str:
    lines = [f"engines in {folder}", f"{'component':<17}{'status':<8}{'MiB':>10}{'sec':>8}"]
    lines += [f"{c:<17}{s:<8}{b / 2**20:>10.1f}{t:>8.1f}" for c, s, b, t in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m engines.build", description="Build TensorRT engines for an artifacts folder."
    )
    parser.add_argument("--artifacts", required=True, type=Path, help="artifacts folder written by python -m export")
    parser.add_argument(
        "--target",
        default="auto",
        choices=("auto", *TARGETS),
        help="tensorrt (this node's GPU), rtx (TensorRT-RTX, ahead of time, any machine), or auto (default)",
    )
    parser.add_argument(
        "--compute-capability",
        default=None,
        help="rtx: comma-separated targets, e.g. 89,120 (default: TensorRT-RTX's own, "
        + ",".join(c.replace(".", "") for c in RTX_DEFAULT_COMPUTE_CAPABILITIES)
        + "".join(
            f"; {p}: {','.join(c.replace('.', '') for c in p.rtx_compute_capabilities)}"
            for p in PRECISIONS.values()
            if p.rtx_compute_capabilities
        )
        + ")",
    )
    parser.add_argument("--force", action="store_true", help="rebuild every engine even when its cache key matches")
    parser.add_argument(
        "--opt-level", type=int, default=DEFAULT_OPT_LEVEL, help="builder optimization level 0..5 (default 3)"
    )
    parser.add_argument(
        "--timing-cache", type=Path, default=None, help="timing cache file to read and update (tensorrt target)"
    )
    parser.add_argument("--workspace", type=float, default=None, help="workspace memory pool limit in GiB")
    parser.add_argument(
        "--strip-weights",
        action="store_true",
        help="weight-stripped, refittable plans: the runtime refits them from the ONNX weights at load",
    )
    args = parser.parse_args(argv)
    capabilities = parse_compute_capabilities(args.compute_capability) if args.compute_capability else None
    # One build at a time per artifacts folder, whichever target it picks.
    with folder_lock(Path(args.artifacts).expanduser().absolute() / ENGINES_DIR, "engine build"):
        build_engines(
            artifacts=args.artifacts,
            target=args.target,
            force=args.force,
            build=BuildConfig(
                opt_level=args.opt_level,
                workspace_gib=args.workspace,
                compute_capabilities=capabilities,
                strip_weights=args.strip_weights,
            ),
            timing_cache=args.timing_cache,
        )
    return 0


def cli() -> None:
    """The console script: user errors as one line and an exit code, as `python -m` gives them."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
