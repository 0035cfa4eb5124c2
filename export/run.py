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
from common.errors import Flux2TrtError, InternalError, UsageError
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
from common.precision import DEFAULT as DEFAULT_PRECISION
from common.precision import Precision
from common.precision import precision as declared
from common.specs import (
    COMPONENTS,
    EDITING_COMPONENTS,
    RESOLUTION_COMPONENTS,
    STEP_CACHE_COMPONENTS,
    Geometry,
    Shapes,
    component_specs,
    graph_name,
    step_cache_specs,
)
from common.staging import folder_lock, owner_tag, remove_stale_staging
from common.storage import ensure_space, is_storage_error, storage_error
from common.tokenizer import TOKENIZER_FILES, PromptTokenizer
from export import checkpoint as ckpt
from export import lora as export_lora
from export.component_export import ComponentJob, export_component
from export.components import COMPONENTS as COMPONENTS_DECLARED
from export.fp8 import run as fp8_export
from export.fp8.run import Fp8Options
from export.nvfp4 import importing
from export.space import expected_bytes
from export.verify.reference import ReferenceInputs

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
    precision: str = DEFAULT_PRECISION
    components: tuple[str, ...] = COMPONENTS
    shapes: Shapes = field(default_factory=Shapes)
    text_encoder_layers: tuple[int, ...] | None = None
    force: bool = False
    skip_check: bool = False
    fp8: object = None  # export.fp8.run.Fp8Options for precision fp8
    # A single-file transformer in BFL naming replacing the checkpoint's (export.nvfp4.importing).
    transformer_weights: Path | None = None
    # `--lora FILE[:SCALE]`, baked into the transformer's weights in this order (export.lora).
    loras: tuple = ()
    # True traces without weights and streams them from the checkpoint into the ONNX file
    # (`export.writing.streaming`); False loads the modules and exports them as they are.
    stream: bool = True
    # `--step-cache`: the transformer also as head, tail and out graphs (docs/cache.md), sharing its weights.
    step_cache: bool = False


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
    declared(precision)  # an unknown name is refused, naming every precision
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


@dataclass(frozen=True)
class ExportPlan:
    """What an export will do, decided before anything is written: checkpoint, shapes, one job per graph."""

    out: Path
    precision: Precision  # the folder's
    checkpoint: ckpt.Checkpoint
    geometry: Geometry
    shapes: Shapes
    source: Source
    versions: dict
    jobs: tuple  # export.component_export.ComponentJob, staging left to fill in
    previous: ArtifactsManifest | None
    force: bool
    published: object = None  # export.nvfp4.published.PublishedTransformer of --transformer-weights
    loras: tuple = ()  # (common.lora.Lora, scale) of each --lora, baked


def _normalised(job: ExportJob) -> tuple[tuple[str, ...], Shapes]:
    """(components, shapes) as the export records them: references' size explicit, their encoder included."""
    components, shapes = job.components, job.shapes
    if shapes.reference_images:
        # The size is recorded, never left to "the output size" on reading.
        reference_height, reference_width = shapes.reference_size
        shapes = dataclasses.replace(shapes, reference_height=reference_height, reference_width=reference_width)
        if "vae" in components and "vae_encoder" not in components:
            components = (*components, "vae_encoder")
    return components, shapes


def plan_export(job: ExportJob) -> ExportPlan:
    """Validate the request and read the checkpoint's configs; refuse in one line before any writing."""
    folder_precision = declared(job.precision)
    fp8 = job.fp8 if job.fp8 is not None or not folder_precision.quantized else Fp8Options(folder_precision.name)
    components, shapes = _normalised(job)
    validate_request(
        precision=folder_precision.name,
        components=components,
        height=shapes.height,
        width=shapes.width,
        max_sequence_length=shapes.max_sequence_length,
        batch_size=shapes.batch_size,
        reference_images=shapes.reference_images,
        reference_size=shapes.reference_size,
    )
    if shapes.lora_rank < 0:
        raise UsageError(f"--lora-rank {shapes.lora_rank} must be 0 (no LoRA slots) or more, e.g. 16 or 64")
    out = Path(job.out).expanduser().absolute()
    _prepare_out(out)
    checkpoint = ckpt.open_checkpoint(resolve_model(job.model))
    geometry = checkpoint.geometry(job.text_encoder_layers)
    _check_sizes(shapes, geometry.pixels_per_token, checkpoint.root / "vae")
    published, fp8 = _imported_weights(job, checkpoint, folder_precision, fp8)
    loras = _baked_loras(job, checkpoint, published)
    if shapes.lora_rank:
        shapes = dataclasses.replace(shapes, lora_targets=export_lora.slot_targets(checkpoint))
    if folder_precision.quantized:
        fp8_export.check_options(fp8, checkpoint, geometry, components)
    reference = ReferenceInputs(checkpoint, geometry, shapes)
    _check_prompt_room(reference, components)
    source = Source(
        checkpoint=str(checkpoint.root),
        model=str(job.model),
        config_sha256=checkpoint.config_hash(),
        weights_fingerprint=checkpoint.weights_fingerprint(),
    )
    versions = library_versions()
    specs = component_specs(geometry, shapes)
    keyed = _common_key(job, folder_precision, geometry, source, versions, shapes)
    jobs = tuple(
        ComponentJob(
            component=component,
            spec=specs[component],
            key=_component_key(
                keyed, component, specs[component], fp8 if folder_precision.quantized else None, published, loras
            ),
            checkpoint=checkpoint,
            geometry=geometry,
            shapes=shapes,
            precision=declared(fp8.component_precision(component))
            if fp8 is not None
            else folder_precision.of_component(component),
            folder_precision=folder_precision,
            reference=reference,
            staging=Path(),  # the export's staging folder, given when it is made
            skip_check=job.skip_check,
            stream=job.stream,
            fp8=fp8,
        )
        for component in components
    )
    jobs += _resolution_jobs(jobs, geometry, shapes)
    if job.step_cache:
        jobs += _step_cache_jobs(jobs, checkpoint, geometry, shapes)
    return ExportPlan(
        out,
        folder_precision,
        checkpoint,
        geometry,
        shapes,
        source,
        versions,
        jobs,
        _previous_manifest(out),
        job.force,
        published,
        loras,
    )


def _check_sizes(shapes: Shapes, step: int, vae: Path) -> None:
    """Every exported size a positive multiple of the VAE x patch factor, none twice; one line naming the first misfit."""
    flag = "--resolutions" if shapes.resolutions else "--height/--width"
    for height, width in shapes.sizes:
        if height <= 0 or width <= 0 or height % step or width % step:
            raise UsageError(
                f"{flag} {height}x{width}: each side must be a positive multiple of {step} for the VAE in {vae} "
                f"(8x VAE, 2x2 patches), e.g. 1024x1024 or 1152x896"
            )
    if len(set(shapes.sizes)) != len(shapes.sizes):
        raise UsageError(f"--resolutions {','.join(f'{h}x{w}' for h, w in shapes.sizes)} names a size twice")
    if shapes.resolutions and shapes.resolutions[0] != (shapes.height, shapes.width):
        raise InternalError(f"shapes {shapes.height}x{shapes.width} are not the first of {shapes.resolutions}")


def _resolution_jobs(first: tuple, geometry, shapes: Shapes) -> tuple:
    """The transformer and VAE graphs at each further `--resolutions` size, reading the first size's weights.

    Each is the first size's job at other shapes: checked against PyTorch at its own size, keyed by the
    first graph's key (whose weights it points at) and its own spec.
    """
    jobs = []
    for height, width in shapes.sizes[1:]:
        at = shapes.at(height, width)
        specs = component_specs(geometry, at)
        reference = None
        for job in first:
            if job.component not in RESOLUTION_COMPONENTS:
                continue
            reference = reference or ReferenceInputs(job.checkpoint, geometry, at)
            spec = specs[job.component]
            key = key_of({"first_size": job.key, "size": [height, width], "spec": spec.to_json()})
            jobs.append(
                dataclasses.replace(
                    job,
                    spec=spec,
                    shapes=at,
                    reference=reference,
                    key=key,
                    name=graph_name(job.component, shapes, height, width),
                    shares_weights_with=f"{job.component}.onnx",
                )
            )
    return tuple(jobs)


def _step_cache_jobs(jobs: tuple, checkpoint, geometry, shapes: Shapes) -> tuple:
    """The step cache's three graphs (`common.specs.STEP_CACHE_COMPONENTS`) at every exported size, each the
    transformer's job at that size with its own spec and module, pointing its weights at `transformer.onnx`'s."""
    transformers = {j.graph: j for j in jobs if j.component == "transformer"}
    if not transformers:
        raise UsageError(
            "--step-cache writes the transformer in three more graphs beside it; add transformer to --components"
        )
    config = checkpoint.configs["transformer"]
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    parts = []
    for height, size_width in shapes.sizes:
        transformer = transformers[graph_name("transformer", shapes, height, size_width)]
        specs = step_cache_specs(geometry, transformer.shapes, width)
        parts += [
            dataclasses.replace(
                transformer,
                component=part,
                spec=specs[part],
                key=key_of(
                    {"transformer": transformer.key, "spec": specs[part].to_json(), "code": STEP_CACHE_CODE_VERSION}
                ),
                name=graph_name(part, shapes, height, size_width),
                shares_weights_with="transformer.onnx",
            )
            for part in STEP_CACHE_COMPONENTS
        ]
    return tuple(parts)


# Bump when export/graphs/step_cache.py writes other graphs for the same transformer.
STEP_CACHE_CODE_VERSION = 1


def _common_key(job: ExportJob, folder_precision: Precision, geometry, source: Source, versions: dict, shapes) -> dict:
    """What every graph of the export depends on (each key adds its own part, `_component_key`)."""
    keyed = {
        "precision": folder_precision.name,
        "geometry": geometry.to_json(),
        "source": source.key_payload(),
        "versions": versions,
        "code": EXPORT_CODE_VERSION,
        "checked": not job.skip_check,
        "streamed": job.stream,
    }
    if shapes.reference_images:
        # K and the reference size fix the transformer's RoPE tables beyond its input shapes
        # (2 x 64x64 and 1 x 128x64 give the same token count); absent at K = 0.
        keyed["references"] = [shapes.reference_images, *shapes.reference_size]
    return keyed


def _component_key(keyed: dict, component: str, spec, quantization, published, loras) -> str:
    """A graph's cache key: the export's common part, its spec, its quantization, its imported weights and LoRAs."""
    payload = {**keyed, "component": component, "spec": spec.to_json()}
    if quantization is not None:
        payload["fp8"] = quantization.key_payload(component)
    if published is not None and component == "transformer":
        payload["transformer_weights"] = importing.fingerprint(published)
    if loras and component == "transformer":
        payload["loras"] = [{"sha256": lora.sha256, "scale": scale} for lora, scale in loras]
        payload["lora_code"] = export_lora.CODE_VERSION
    return key_of(payload)


def _baked_loras(job: ExportJob, checkpoint, published) -> tuple:
    """Each --lora read and checked against the transformer it is baked into; refused where it cannot apply."""
    if not job.loras:
        return ()
    if "transformer" not in job.components:
        raise UsageError("--lora is baked into the transformer; add transformer to --components")
    if published is not None and published.nvfp4_layers:
        raise UsageError(
            f"--lora with --transformer-weights {published.path}: its NVFP4 layers are written as the file stores "
            "them, so a baked LoRA would be lost there; export with --lora-rank R and apply it at run time"
        )
    return export_lora.open_loras(tuple(job.loras), checkpoint)


def _imported_weights(job: ExportJob, checkpoint, folder_precision: Precision, fp8):
    """(the --transformer-weights file read and checked, or None; the quantization options that follow it)."""
    if job.transformer_weights is None:
        return None, fp8
    published = importing.open_weights(job.transformer_weights, checkpoint, folder_precision)
    if fp8 is not None:
        fp8 = dataclasses.replace(fp8, transformer_weights=str(published.path))
    return published, fp8


def _check_prompt_room(reference: ReferenceInputs, components: tuple[str, ...]) -> None:
    """Refuse a model whose chat template alone fills --max-sequence-length: it could never serve (issue 26).

    Through the checkpoint's own tokenizer and template, as the numerics check and the runtime read
    them. Only for a model the runtime opens (text encoder, transformer and VAE): a partial export
    (`--components transformer`, as benchmarks and graph tests take) is never served, and the next
    export into the folder replaces its components rather than adding to them.
    """
    if set(COMPONENTS) <= set(components):
        subject = f"--max-sequence-length {reference.shapes.max_sequence_length}"
        reference.tokenizer().check_prompt_room(subject, "export with", UsageError)


def _run_export(job: ExportJob, log=None) -> ArtifactsManifest:
    log = log or (lambda message: print(message, file=sys.stderr))
    plan = plan_export(job)
    out = plan.out
    _make_parent(out)
    # Named as staging folders are, so a killed export's staged transformer is removed by the next one.
    staged = out.parent / f".{out.name}.tmp-{owner_tag()}-transformer"
    with folder_lock(out, "export"):
        try:
            return _write_export(_with_imported_weights(plan, staged, log), log)
        finally:
            importing.remove_staged(staged)


def _with_imported_weights(plan: ExportPlan, staged: Path, log) -> ExportPlan:
    """`plan` reading its transformer from --transformer-weights' staged checkpoint, where a graph needs it."""
    transformer = next((j for j in plan.jobs if j.component == "transformer"), None)
    if (plan.published is None and not plan.loras) or transformer is None:
        return plan
    if not plan.force and _reusable(plan.previous, plan.out, "transformer", transformer.key) is not None:
        return plan  # the graph from this file is there already: nothing is read
    if plan.published is not None:
        source, tensors = plan.published.path, importing.plain_tensors(plan.published)
    else:
        source, tensors = plan.checkpoint.component_dir("transformer"), export_lora.checkpoint_tensors(plan.checkpoint)
    if plan.loras:
        tensors = export_lora.baked(tensors, plan.loras, transformer.precision.traced.torch_dtype())
        source = f"{source} with {len(plan.loras)} LoRA(s) baked in"
    log(f"staging the transformer of {source} as a diffusers folder in {staged}")
    checkpoint = importing.stage_checkpoint(tensors, plan.checkpoint, staged)
    jobs = tuple(
        dataclasses.replace(j, checkpoint=checkpoint)
        if COMPONENTS_DECLARED[j.component].model_component == "transformer"
        else j
        for j in plan.jobs
    )
    return dataclasses.replace(plan, jobs=jobs)


def _write_export(plan: ExportPlan, log) -> ArtifactsManifest:
    out, rows = plan.out, []
    with atomic_dir(out) as staging:
        remove_stale_staging(out.parent, name=out.name, log=log)  # what a killed export of `out` left
        (staging / "reports").mkdir()
        for component_job in plan.jobs:
            started = time.perf_counter()
            entry, report, status = _produce(plan, dataclasses.replace(component_job, staging=staging))
            rows.append((component_job.graph, status, entry, report, time.perf_counter() - started))
        manifest = _record(plan, staging, rows)
        kept = _keep_engines(out, staging)
        if kept:
            log(
                f"kept {kept} engine files of {out / ENGINES_DIR} (linked); plans of graphs this export changed are "
                f"refused by their recorded ONNX sha256 until `python -m engines.build --artifacts {out}` rebuilds them"
            )
    # Every file was hashed just now (reused ones by _reusable): the first use need not re-hash. After
    # the rename, as removing the previous folder changes the link count, hence the ctime, of reused files.
    record_verified(out, manifest.files())
    log(_summary_table(rows, plan.precision.name, out))
    return manifest


def _produce(plan: ExportPlan, job: ComponentJob) -> tuple[ComponentRecord, dict, str]:
    """(entry, report, "reused" | "exported") for one graph: linked from the previous export, or written."""
    reused = None if plan.force else _reusable(plan.previous, plan.out, job.graph, job.key)
    if reused is not None:
        entry, report = reused
        for name in entry.files:
            if not (job.staging / name).exists():  # a further size's graph lists the first size's data file
                os.link(plan.out / name, job.staging / name)
        return entry, report, "reused"
    # Refused before writing, not after streaming most of a file that cannot fit.
    ensure_space(plan.out, expected_bytes(plan.checkpoint, job.component, job.precision), f"the {job.component} graph")
    entry, report = export_component(job)
    return entry, report, "exported"


def _record(plan: ExportPlan, staging: Path, rows) -> ArtifactsManifest:
    """The tokenizer, scheduler config, reports and manifest beside the graphs in `staging`."""
    checkpoint, shapes, geometry = plan.checkpoint, plan.shapes, plan.geometry
    tokenizer_files = _copy_tokenizer(checkpoint, staging)
    shutil.copy2(checkpoint.root / "scheduler" / "scheduler_config.json", staging / "scheduler_config.json")
    manifest = ArtifactsManifest(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        precision=plan.precision.name,
        source=plan.source,
        geometry=geometry,
        shapes=shapes,
        versions=plan.versions,
        tokenizer=TokenizerRecord(
            folder="tokenizer",
            files=tokenizer_files,
            # How it pads and truncates: the runtime refuses a tokenizer that disagrees (issue 12).
            **PromptTokenizer(staging / "tokenizer", shapes.max_sequence_length, geometry.pipeline_class).record(),
        ),
        scheduler_config="scheduler_config.json",
        components={component: entry for component, _, entry, _, _ in rows},
        loras=tuple(export_lora.records(plan.loras)),
    )
    reports = {component: report for component, _, _, report, _ in rows}
    atomic_write_json(
        staging / "reports" / "export_check.json", {"precision": plan.precision.name, "components": reports}
    )
    if plan.precision.quantized:
        fp8_export.write_reports(staging / "reports", reports, plan.precision)
    atomic_write_json(staging / MANIFEST_NAME, manifest.to_json())
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
    header = f"{'component':<17}{'status':<10}{'MiB':>9}  {'method':<26}{'max_abs':>10}{'rel_l2':>11}{'cosine':>10}  {'check':<6}{'sec':>7}"
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
            f"{component:<17}{status:<10}{mib:>9.2f}  {str(report['method'] or '-'):<26}{numbers}  {check:<6}{seconds:>7.1f}"
        )
    return "\n".join(lines)
