"""Export a FLUX.2 checkpoint's components to ONNX, verify each against PyTorch, write the manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from common.atomic import atomic_dir, atomic_write_json, writable_error
from common.engine_manifest import ENGINES_DIR
from common.errors import Flux2TrtError, UsageError, VerificationError
from common.integrity import record_verified
from common.manifest import (
    MANIFEST_NAME,
    ArtifactsManifest,
    ComponentRecord,
    Source,
    TokenizerRecord,
    key_of,
    read_manifest,
    sha256_file,
)
from common.named_checkpoints import resolve_model
from common.precision import PRECISION_NAMES as PRECISIONS
from common.precision import PRECISIONS as DECLARED
from common.precision import TOLERANCES
from common.specs import (
    COMPONENTS,
    EDITING_COMPONENTS,
    ComponentSpec,
    Geometry,
    Shapes,
    component_specs,
)
from common.staging import folder_lock, remove_stale_staging
from common.storage import ensure_space, is_storage_error, storage_error
from common.tokenizer import TOKENIZER_FILES, PromptTokenizer
from export import checkpoint as ckpt
from export.space import expected_bytes
from export.writing.trace import data_file_name, example_inputs, export_graph

# Bump when the graphs this code writes change for the same inputs: it invalidates cached exports.
# 2: the VAE upsamples in float32 (no bf16 Resize for TensorRT); 3: timestep rounding as the pipeline;
# 4: fp16 transformer stream in float32, and the manifest lists the float32 matrix multiplies.
EXPORT_CODE_VERSION = 4
LIBRARIES = ("flux2-trt", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime")


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass(frozen=True)
class ExportJob:
    """One request to `python -m export`: what to export from which checkpoint, where, how."""

    model: str | Path
    out: Path
    precision: str = "fp32"
    components: tuple[str, ...] = COMPONENTS
    shapes: Shapes = field(default_factory=Shapes)
    text_encoder_layers: tuple[int, ...] | None = None
    force: bool = False
    skip_check: bool = False
    fp8: object = None  # export.fp8.run.Fp8Options for precision fp8
    # True traces without weights and streams them from the checkpoint into the ONNX file
    # (`export.writing.streaming`); False loads the modules and exports them as they are.
    stream: bool = True


@dataclass(frozen=True)
class ComponentJob:
    """One graph of an export: everything `_export_component` (and the FP8 path) needs to write and check it."""

    component: str
    spec: ComponentSpec
    key: str
    checkpoint: ckpt.Checkpoint
    geometry: Geometry
    shapes: Shapes
    precision: str
    reference: object  # export.verify.reference.ReferenceInputs
    staging: Path
    skip_check: bool
    stream: bool = True


def validate_request(
    *,
    precision: str,
    components: tuple[str, ...],
    height: int,
    width: int,
    max_sequence_length: int,
    batch_size: int = 1,
    reference_images: int = 0,
    reference_size: tuple[int, int] = (0, 0),
) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    known = COMPONENTS + (EDITING_COMPONENTS if reference_images else ())
    unknown = [c for c in components if c not in known]
    if unknown or not components:
        hint = "" if reference_images else " (vae_encoder comes with --reference-images)"
        raise UsageError(f"unknown component(s) {','.join(unknown) or '(none)'}; choose from {','.join(known)}{hint}")
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % 16:
            raise UsageError(
                f"--{name} {value} is not a positive multiple of 16; FLUX.2 needs 16-pixel steps (8x VAE, 2x2 patches)"
            )
    if max_sequence_length <= 0:
        raise UsageError(f"--max-sequence-length {max_sequence_length} must be positive (FLUX.2 uses 512)")
    if batch_size <= 0:
        raise UsageError(f"--batch-size {batch_size} must be positive (2 runs a CFG step in one transformer call)")
    if reference_images < 0:
        raise UsageError(f"--reference-images {reference_images} must be 0 (text to image) or more")
    if reference_images:
        validate_reference_size(*reference_size)


# diffusers' Flux2ImageProcessor.check_image_input refuses sides under 64 pixels, and the pipeline
# scales an image above 1024 x 1024 pixels of area down to that area before encoding it.
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_AREA = 1024 * 1024


def validate_reference_size(height: int, width: int) -> None:
    size = f"--reference-size {height}x{width}"
    if height % 16 or width % 16 or min(height, width) < MIN_REFERENCE_SIDE:
        raise UsageError(
            f"{size} must be multiples of 16 of at least {MIN_REFERENCE_SIDE} pixels (diffusers' smallest reference)"
        )
    if height * width > MAX_REFERENCE_AREA:
        raise UsageError(
            f"{size} is over 1024x1024 pixels of area; diffusers scales references down to that area, so choose one within it"
        )


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise UsageError(
            f"--out {out} is a non-empty folder that is not an artifacts folder; choose an empty or new folder"
        )
    # Checked, not created: the parent folders are made when the export starts writing
    # (`_make_parent`), so a request refused later (a wrong --model) leaves no folders behind.
    parent = out.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"cannot create output folder {parent}: {existing} is a file; choose a writable --out")
    if reason := writable_error(existing):
        raise UsageError(f"output folder {existing} is not writable ({reason}); choose a writable --out")


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create output folder {out.parent} ({exc.strerror}); choose a writable --out"
        ) from None


def export_artifacts(*, log=None, **request) -> ArtifactsManifest:
    """Write (or reuse) the ONNX graphs of an `ExportJob(**request)`; return the manifest."""
    return run_export(ExportJob(**request), log=log)


def run_export(job: ExportJob, log=None) -> ArtifactsManifest:
    """Write (or reuse) the ONNX graphs for `job.components` into `job.out`; return the manifest.

    A disk that refuses a write (full, a file-size limit, I/O error, permission) ends it as a
    StorageError; the staging folder is gone by then (`atomic_dir`).
    """
    try:
        return _run_export(job, log)
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        raise storage_error(exc, "export", Path(job.out).expanduser().absolute()) from None


def _run_export(job: ExportJob, log=None) -> ArtifactsManifest:
    log = log or (lambda message: print(message, file=sys.stderr))
    model, precision, components, shapes = job.model, job.precision, job.components, job.shapes
    force, skip_check, stream, fp8 = job.force, job.skip_check, job.stream, job.fp8
    if precision == "fp8" and fp8 is None:
        from export.fp8.run import Fp8Options

        fp8 = Fp8Options()
    out = Path(job.out).expanduser().absolute()
    if shapes.reference_images:
        # The size is recorded, never left to "the output size" on reading.
        reference_height, reference_width = shapes.reference_size
        shapes = dataclasses.replace(shapes, reference_height=reference_height, reference_width=reference_width)
        if "vae" in components and "vae_encoder" not in components:
            components = (*components, "vae_encoder")
    validate_request(
        precision=precision,
        components=components,
        height=shapes.height,
        width=shapes.width,
        max_sequence_length=shapes.max_sequence_length,
        batch_size=shapes.batch_size,
        reference_images=shapes.reference_images,
        reference_size=shapes.reference_size,
    )
    _prepare_out(out)
    checkpoint = ckpt.open_checkpoint(resolve_model(model))
    geometry = checkpoint.geometry(job.text_encoder_layers)
    if shapes.height % geometry.pixels_per_token or shapes.width % geometry.pixels_per_token:
        raise UsageError(
            f"--height/--width {shapes.height}x{shapes.width} must be multiples of {geometry.pixels_per_token} "
            f"for the VAE in {checkpoint.root / 'vae'}"
        )
    specs = component_specs(geometry, shapes)
    versions = library_versions()
    source = Source(
        checkpoint=str(checkpoint.root),
        model=str(model),
        config_sha256=checkpoint.config_hash(),
        weights_fingerprint=checkpoint.weights_fingerprint(),
    )
    previous = _previous_manifest(out)

    from export.verify.reference import ReferenceInputs

    reference = ReferenceInputs(checkpoint, geometry, shapes)
    entries, reports, rows = {}, {}, []
    _make_parent(out)
    with folder_lock(out, "export"), atomic_dir(out) as staging:
        remove_stale_staging(out.parent, name=out.name, log=log)  # what a killed export of `out` left
        (staging / "reports").mkdir()
        for component in components:
            spec = specs[component]
            key = key_of(
                {
                    "component": component,
                    "precision": precision,
                    "spec": spec.to_json(),
                    "geometry": geometry.to_json(),
                    "source": source.key_payload(),
                    "versions": versions,
                    "code": EXPORT_CODE_VERSION,
                    "checked": not skip_check,
                    **({"fp8": fp8.key_payload(component)} if precision == "fp8" else {}),
                    "streamed": stream,
                    # K and the reference size fix the transformer's RoPE tables beyond its input
                    # shapes (2 x 64x64 and 1 x 128x64 give the same token count); absent at K = 0.
                    **(
                        {"references": [shapes.reference_images, *shapes.reference_size]}
                        if shapes.reference_images
                        else {}
                    ),
                }
            )
            started = time.perf_counter()
            component_job = ComponentJob(
                component, spec, key, checkpoint, geometry, shapes, precision, reference, staging, skip_check, stream
            )
            reused = None if force else _reusable(previous, out, component, key)
            if reused is None:  # refused before writing, not after streaming most of a file that cannot fit
                ensure_space(
                    out,
                    expected_bytes(checkpoint, component, _component_precision(precision, fp8, component)),
                    f"the {component} graph",
                )
            if reused is not None:
                entry, report = reused
                for name in entry.files:
                    os.link(out / name, staging / name)
                status = "reused"
            elif precision == "fp8":
                from export.fp8 import run as fp8_export

                entry, report = fp8_export.export_component(component_job, fp8, export_bf16=_export_component)
                status = "exported"
            else:
                entry, report = _export_component(component_job)
                status = "exported"
            entries[component] = entry
            reports[component] = report
            rows.append((component, status, entry, report, time.perf_counter() - started))

        tokenizer_files = _copy_tokenizer(checkpoint, staging)
        shutil.copy2(checkpoint.root / "scheduler" / "scheduler_config.json", staging / "scheduler_config.json")
        manifest = ArtifactsManifest(
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            precision=precision,
            source=source,
            geometry=geometry,
            shapes=shapes,
            versions=versions,
            tokenizer=TokenizerRecord(
                folder="tokenizer",
                files=tokenizer_files,
                # How it pads and truncates: the runtime refuses a tokenizer that disagrees (issue 12).
                **PromptTokenizer(staging / "tokenizer", shapes.max_sequence_length, geometry.pipeline_class).record(),
            ),
            scheduler_config="scheduler_config.json",
            components=entries,
        )
        atomic_write_json(staging / "reports" / "export_check.json", {"precision": precision, "components": reports})
        if precision == "fp8":
            from export.fp8 import run as fp8_export

            fp8_export.write_reports(staging / "reports", reports)
        atomic_write_json(staging / MANIFEST_NAME, manifest.to_json())
        kept = _keep_engines(out, staging)
        if kept:
            log(
                f"kept {kept} engine files of {out / ENGINES_DIR} (linked); plans of graphs this export changed are "
                f"refused by their recorded ONNX sha256 until `python -m engines.build --artifacts {out}` rebuilds them"
            )
    # Every file was hashed just now (reused ones by _reusable): the first use need not re-hash. After
    # the rename, as removing the previous folder changes the link count, hence the ctime, of reused files.
    record_verified(out, manifest.files())
    log(_summary_table(rows, precision, out))
    return manifest


def _keep_engines(out: Path, staging: Path) -> int:
    """Hard-link `out/engines/` into the new folder; return the number of files linked.

    Re-running an export (an idempotent deployment script, a new precision beside, --force) must not
    throw away engines that took an hour to build on a GPU node: a plan whose ONNX files are unchanged
    is still valid, and one built from a graph that changed is refused by its recorded ONNX sha256
    (common.engine_manifest) and rebuilt by `engines.build`, which rebuilds only those. Hidden names
    (a build's temporaries) are left behind.
    """
    source = out / ENGINES_DIR
    if not source.is_dir():
        return 0
    linked = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(out)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(path, staging / relative)
        linked += 1
    return linked


def _previous_manifest(out: Path) -> ArtifactsManifest | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(out)
    except Flux2TrtError:
        return None  # an older or damaged export: everything is redone


def _reusable(previous: ArtifactsManifest | None, out: Path, component: str, key: str):
    if previous is None:
        return None
    entry = previous.components.get(component)
    if entry is None or entry.key != key:
        return None
    for name, digest in entry.sha256.items():
        path = out / name
        if not path.is_file() or sha256_file(path) != digest:
            return None
    report_path = out / "reports" / "export_check.json"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))["components"][component]
    except (OSError, KeyError, ValueError):
        return None
    return entry, report


def _export_component(job: ComponentJob):
    component, spec, key, checkpoint, geometry = job.component, job.spec, job.key, job.checkpoint, job.geometry
    shapes, precision, reference, staging = job.shapes, job.precision, job.reference, job.staging
    skip_check, stream = job.skip_check, job.stream
    import numpy as np
    import torch
    from tqdm import tqdm

    from export.verify.onnx_run import method_for, run_graph
    from export.verify.reference import build_graph_module

    stages = ([] if stream else ["load"]) + ["export", "hash"] + ([] if skip_check else ["verify"])
    bar = tqdm(total=len(stages), desc=f"{component:<12} {precision}", unit="step", file=sys.stderr, leave=True)
    try:
        onnx_name = f"{component}.onnx"
        module = None
        if stream:
            from export.writing.streaming import export_streaming

            bar.set_postfix_str("tracing without weights, streaming them into ONNX")
            facts = export_streaming(component, checkpoint, geometry, shapes, precision, spec, staging / onnx_name)
        else:
            bar.set_postfix_str("loading weights")
            module = build_graph_module(component, checkpoint, geometry, shapes, precision)
            bar.update()
            bar.set_postfix_str("tracing and writing ONNX")
            facts = export_graph(module, example_inputs(spec), spec, staging / onnx_name)
        bar.update()

        kept_float32 = _float32_matmuls(staging / onnx_name, component, precision)
        bar.set_postfix_str("sha256")
        files = [onnx_name] + ([data_file_name(onnx_name)] if (staging / data_file_name(onnx_name)).exists() else [])
        digests = {name: sha256_file(staging / name) for name in files}
        sizes = {name: (staging / name).stat().st_size for name in files}
        bar.update()

        report = {"method": None, "outputs": {}, "tolerance": dataclasses.asdict(TOLERANCES[precision]), "passed": None}
        if skip_check:
            report["note"] = "numerics check skipped (--skip-check)"
        else:
            bar.set_postfix_str("checking against PyTorch fp32")
            weight_bytes = sizes.get(data_file_name(onnx_name), 0)
            method = method_for(precision, weight_bytes)
            report["method"] = method
            if method is None:
                report["note"] = (
                    f"{precision} graph with {weight_bytes} bytes of weights is too large for onnx's reference "
                    "evaluator on a CPU and ONNX Runtime's CPU provider has no bf16 kernels: not checked here"
                )
            else:
                if precision == "fp32" and module is not None:
                    reference_module = module
                else:
                    del module
                    reference_module = build_graph_module(component, checkpoint, geometry, shapes, "fp32")
                feeds = reference.feeds(spec)
                args = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
                with torch.no_grad():
                    expected = reference_module(*args)
                expected = {spec.outputs[0].name: expected.numpy()}
                for name, value in expected.items():
                    if bad := int(value.size - np.count_nonzero(np.isfinite(value))):
                        raise VerificationError(
                            f"{component}: PyTorch fp32 on the checkpoint's own weights gives {bad} NaN/Inf values in "
                            f"{name}; the weights in {checkpoint.component_dir(component)} are damaged: restore them"
                        )
                module = reference_module = None  # free the PyTorch weights before the graph runs
                actual = run_graph(staging / onnx_name, feeds, method)
                tolerance = TOLERANCES[precision]
                for name, value in expected.items():
                    report["outputs"][name] = tolerance.judge(actual[name], value)
                report["passed"] = all(m["passed"] for m in report["outputs"].values())
                if not report["passed"]:
                    worst = ", ".join(tolerance.describe(n, m) for n, m in report["outputs"].items())
                    raise VerificationError(
                        f"{component} {precision} graph does not match PyTorch fp32 ({method}): {worst}"
                    )
            bar.update()
    finally:
        bar.close()
    entry = ComponentRecord(
        file=onnx_name,
        files=tuple(files),
        sha256=digests,
        bytes=sizes,
        key=key,
        precision=precision,
        opset=int(facts["opset"]),
        nodes=int(facts["nodes"]),
        inputs=spec.inputs,
        outputs=spec.outputs,
        float32_matmuls=tuple(kept_float32) if precision in ("fp16", "bf16") else None,
    )
    return entry, report


def _float32_matmuls(path: Path, component: str, precision: str) -> list[str]:
    """The matrix multiplies an fp16/bf16 graph keeps in float32, all of them on purpose, or the export fails.

    Recorded in the manifest, so that `engines.check` can hold TensorRT's network to "every other
    matrix multiply in the graph's precision".
    """
    if precision not in ("fp16", "bf16"):
        return []
    import onnx

    from common.onnx_checks import FLOAT32_MATMUL_SCOPES, float32_matmuls

    found = float32_matmuls(onnx.load(str(path), load_external_data=False))
    stray = [
        f"{name} ({scope or 'no scope'})" for name, scope in found if not any(s in scope for s in FLOAT32_MATMUL_SCOPES)
    ]
    if stray:
        raise Flux2TrtError(
            f"the {precision} {component} graph {path.name} computes matrix multiplies in float32 outside attention: "
            f"{', '.join(stray[:5])}; this is an exporter bug, please report it with the checkpoint's configs"
        )
    return [name for name, _ in found]


def _copy_tokenizer(checkpoint: ckpt.Checkpoint, staging: Path) -> dict[str, str]:
    source = checkpoint.root / "tokenizer"
    target = staging / "tokenizer"
    target.mkdir()
    copied = {}
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied[name] = sha256_file(target / name)
    if "tokenizer.json" not in copied:
        raise ckpt.CheckpointError(f"checkpoint tokenizer {source} has no tokenizer.json; {ckpt.LAYOUT_HINT}")
    return copied


def _summary_table(rows, precision: str, out: Path) -> str:
    header = f"{'component':<13}{'status':<10}{'MiB':>9}  {'method':<26}{'max_abs':>10}{'rel_l2':>11}{'cosine':>10}  {'check':<6}{'sec':>7}"
    lines = [f"export to {out} ({precision})", header, "-" * len(header)]
    for component, status, entry, report, seconds in rows:
        mib = entry.total_bytes / 2**20
        metrics = next(iter(report["outputs"].values()), None)
        if metrics:
            numbers = f"{metrics['max_abs']:>10.3g}{metrics['rel_l2']:>11.3g}{metrics['cosine']:>10.6f}"
        else:
            numbers = f"{'-':>10}{'-':>11}{'-':>10}"
        check = {True: "pass", False: "FAIL", None: "skip"}[report["passed"]]
        lines.append(
            f"{component:<13}{status:<10}{mib:>9.2f}  {str(report['method'] or '-'):<26}{numbers}  {check:<6}{seconds:>7.1f}"
        )
    return "\n".join(lines)


def _component_precision(name: str, fp8, component: str):
    folder = DECLARED[name]
    return folder.of_component(component, bool(fp8) and fp8.component_precision(component) == folder.name)
