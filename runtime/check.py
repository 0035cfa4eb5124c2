"""python -m runtime.check: this runtime vs diffusers' pipeline, same prompt, seed, steps and guidance.

Per component (same inputs into both): text encoder -> prompt_embeds; transformer -> the
velocity at the first step; VAE -> the image decoded from diffusers' final latents. End to end:
PSNR and SSIM between the two images. Written as a table and DIR/reports/runtime_check.json.

Editing artifacts (exported with --reference-images K) take K `--image` files: both sides get the
same prepared images (`runtime.reference_images`), the VAE encoder is compared on them (its
reference tokens against `Flux2Pipeline.prepare_image_latents`), and the transformer with them.

Running is kept apart from comparing, as Polygraphy keeps them: `run_reference` (diffusers'
pipeline) and `run_runtime` (this runtime's backend, through `runtime.pipeline`'s own input
building) each return the same `Stages` record; `judge` holds one against the other (the
precision's tolerance, the PSNR bound) and `write_report` writes the table and the JSON.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_json
from common.cli import OneLineParser, one_of, run_cli
from common.errors import UsageError
from common.manifest import read_manifest
from common.metrics import psnr, ssim
from common.precision import precision as declared
from runtime.artifacts import Artifacts
from runtime.backends.select import BACKENDS
from runtime.pipeline import (
    Conditioning,
    Flux2Runtime,
    Sampling,
    Timings,
    check_seed,
    initial_noise,
    to_image,
    transformer_feeds,
)
from runtime.scheduler import flux2_schedule

CHECK_PROMPT = "A photograph of a red fox sitting in fresh snow at dawn, soft light, shallow depth of field."

# End-to-end bounds against diffusers float32; the measurements behind each: docs/runtime.md
# ("How runtime.check bounds the image"). fp32: the acceptance numbers.
MIN_PSNR_FP32 = {"onnx": 40.0, "torch": 50.0}
# Below fp32 the image cannot be closer to float32 than PyTorch's own pipeline at that precision is:
# the bound is that pipeline's PSNR (its "floor", measured in the same check) minus this margin,
# a factor of 2 in mean squared error.
FLOOR_MARGIN_DB = 3.0
# ... but never below this: diffusers' bf16 pipeline can drift far from its fp32 one on a GPU, and a
# floor that low checks nothing. The end-to-end bound FP8 is held to on the tiny default.
MIN_PSNR_REDUCED = 25.0


@dataclass(frozen=True)
class CheckRequest:
    """One `python -m runtime.check` run: which artifacts against which checkpoint, what to draw."""

    artifacts: Path
    model: Path | None = None  # the source checkpoint; default: the one the manifest names
    backend: str = "auto"
    prompt: str = CHECK_PROMPT
    seed: int = 0
    steps: int = 4
    guidance: float = 4.0
    images: tuple[Path, ...] = ()  # reference images, as many as editing artifacts take
    size: tuple[int, int] | None = None  # one size of a --resolutions folder; None: the first (check_sizes: each)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.prompt, self.seed, self.steps, self.guidance)


@dataclass(frozen=True)
class FirstStep:
    """The transformer's first-step inputs both sides get, besides diffusers' embeds and reference tokens."""

    noise: np.ndarray  # [1, N, C]: the seed's packed noise, drawn as diffusers draws it
    timestep: float  # the schedule's first transformer timestep
    guidance: float


@dataclass(frozen=True)
class CheckSetup:
    """What both sides are given: the request, the opened artifacts, the checkpoint, the prepared references."""

    request: CheckRequest
    opened: Artifacts
    checkpoint: Path
    first: FirstStep
    reference_array: np.ndarray | None = None  # [K, 3, H, W] in [-1, 1], what this runtime's VAE encoder gets
    prepared: tuple = ()  # PreparedReference per image, what diffusers gets


@dataclass(frozen=True)
class Stages:
    """One side's output per stage, host float32 (first row of a batch): what `judge` compares."""

    prompt_embeds: np.ndarray  # [1, L, D] from the prompt
    velocity: np.ndarray  # [1, N, C] at the first step, on diffusers' prompt_embeds (and reference tokens)
    decoded: np.ndarray  # [H, W, 3] in [0, 1]: the VAE on diffusers' final latents
    image: np.ndarray  # [H, W, 3] in [0, 1]: end to end from the seed
    seconds: float  # drawing `image` (the reference: with its same-precision floor)
    reference_tokens: np.ndarray | None = None  # [1, K*M, C] from the prepared references (editing)


@dataclass(frozen=True)
class Reference:
    """The diffusers side: its stages, the final latents both VAEs decode, and the same-precision floor."""

    stages: Stages
    final_latents: np.ndarray  # [1, N, C] diffusers' latents after the last step
    floor_psnr: float | None  # diffusers at the artifacts' compute dtype against float32; None at fp32
    description: str  # "diffusers Flux2Pipeline, float32, cpu"


@dataclass(frozen=True)
class Judgement:
    components: dict  # stage -> Tolerance.judge's metrics
    end_to_end: dict  # PSNR, SSIM, the bound and the floor it came from
    passed: bool


def _reference_pipeline(checkpoint: Path, dtype: str = "float32", opened=None):
    """diffusers' pipeline for the checkpoint, with the LoRAs the artifacts `opened` have baked in (as adapters)."""
    import torch

    from common.lora import baked_loras, load_into_pipeline
    from common.reference_pipeline import reference_pipeline

    # PyTorch lets cuDNN convolutions use TF32 by default, which moved diffusers' "float32" VAE past
    # the fp32 bound on an H200 (docs/runtime.md). A reference is true float32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    pipe = reference_pipeline(checkpoint, dtype=dtype)
    if opened is not None and opened.manifest.loras:
        load_into_pipeline(pipe, baked_loras(opened.manifest.loras, f"artifacts {opened.folder}"))
    return pipe


def _pipeline_call(setup: CheckSetup) -> dict:
    """diffusers' pipeline arguments for the request, less the generator and the step callback."""
    request, shapes = setup.request, setup.opened.shapes
    call = dict(
        prompt=request.prompt,
        height=shapes.height,
        width=shapes.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        max_sequence_length=shapes.max_sequence_length,
        text_encoder_out_layers=tuple(setup.opened.geometry.text_out_layers),
        output_type="np",
    )
    if setup.prepared:
        call["image"] = [reference.image for reference in setup.prepared]
    return call


def _floor_psnr(setup: CheckSetup, call: dict, image: np.ndarray) -> float | None:
    """diffusers at the artifacts' compute dtype against its float32 image; None for fp32 artifacts.

    NaN where diffusers' own pipeline at that dtype draws NaN/Inf (its float16 pipeline on
    activations past 65504): there is no floor to hold the artifacts to, only `MIN_PSNR_REDUCED`.
    """
    import torch

    precision = declared(setup.opened.precision)
    if precision.is_float32:
        return None
    same_precision = _reference_pipeline(setup.checkpoint, precision.compute_dtype, setup.opened)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(setup.request.seed)
        floor_image = same_precision(**call, generator=generator).images[0]
    return psnr(floor_image, image)


def _reference_tokens(pipe, setup: CheckSetup):
    """Flux2Pipeline.prepare_image_latents on the prepared references: [1, K*M, C] torch; None without any."""
    if not setup.prepared:
        return None
    import torch

    height, width = setup.opened.shapes.reference_size
    processed = [
        pipe.image_processor.preprocess(r.image, height=height, width=width, resize_mode="crop") for r in setup.prepared
    ]
    with torch.no_grad():
        tokens, _ = pipe.prepare_image_latents(
            images=processed, batch_size=1, generator=None, device=pipe._execution_device, dtype=pipe.vae.dtype
        )
    return tokens.float()


def _host(tensor) -> np.ndarray | None:
    return None if tensor is None else tensor.float().cpu().numpy()


def run_reference(setup: CheckSetup) -> Reference:
    """diffusers' float32 pipeline -> its stage outputs; the per-stage ones from the torch backend's
    stages over that pipeline (diffusers' modules, called as Flux2Pipeline calls them)."""
    import torch

    from runtime.backends.torch_backend import TorchBackend

    opened, request, first = setup.opened, setup.request, setup.first
    started = time.perf_counter()
    pipe = _reference_pipeline(setup.checkpoint, opened=setup.opened)
    call = _pipeline_call(setup)
    final = {}

    def keep_latents(_pipe, _index, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompt=request.prompt,
            device=pipe._execution_device,
            max_sequence_length=call["max_sequence_length"],
            text_encoder_out_layers=call["text_encoder_out_layers"],
        )
        generator = torch.Generator().manual_seed(request.seed)
        image = pipe(**call, generator=generator, callback_on_step_end=keep_latents).images[0]
    floor_psnr = _floor_psnr(setup, call, image)
    seconds = time.perf_counter() - started

    tokens = _reference_tokens(pipe, setup)
    stages = TorchBackend.around(pipe, opened.folder, opened.manifest, setup.checkpoint)
    feeds = transformer_feeds(
        stages.from_host(first.noise),
        Conditioning(embeds.float(), reference_latents=tokens),
        stages.from_host(np.full((1,), first.timestep, np.float32)),
        stages.from_host(np.full((1,), first.guidance, np.float32)),
        guidance_embeds=opened.geometry.guidance_embeds,
    )
    velocity = stages.run("transformer", feeds)["velocity"]
    decoded = to_image(_host(stages.run("vae", {"packed_latents": final["latents"]})["image"]))[0]
    outputs = Stages(_host(embeds), _host(velocity), decoded, image, seconds, _host(tokens))
    description = f"diffusers {opened.geometry.pipeline_class}, float32, {pipe._execution_device}"
    return Reference(outputs, _host(final["latents"]), floor_psnr, description)


def run_runtime(runtime: Flux2Runtime, setup: CheckSetup, reference: Reference) -> Stages:
    """This runtime's backend -> the same stage outputs: the image from the seed, the text encoder (and
    VAE encoder) on the same inputs, the transformer and the VAE on diffusers' embeds, tokens and latents.
    Graphs built for a batch of B get B copies of each row; their first row is compared."""
    backend, first, theirs = runtime.backend, setup.first, reference.stages
    started = time.perf_counter()
    _, image, _ = next(runtime.generate(setup.request.sampling, progress=False, reference_images=setup.reference_array))
    seconds = time.perf_counter() - started

    def rows(array: np.ndarray):
        return backend.from_host(np.concatenate([array] * runtime.batch))

    timings = Timings()
    embeds = backend.to_host(runtime.encode_prompt(setup.request.prompt, timings))[:1]
    tokens, their_tokens = None, None
    if setup.reference_array is not None:
        tokens = backend.to_host(runtime.encode_references(setup.reference_array, timings))[:1]
        their_tokens = rows(theirs.reference_tokens)
    feeds = transformer_feeds(
        rows(first.noise),
        Conditioning(rows(theirs.prompt_embeds), reference_latents=their_tokens),
        runtime.batch_scalar(first.timestep),
        runtime.batch_scalar(first.guidance),
        guidance_embeds=runtime.artifacts.geometry.guidance_embeds,
    )
    feeds.update(runtime.adapter_feeds)  # LoRA slots: zeros, the base model diffusers draws here
    velocity = backend.to_host(backend.run("transformer", feeds)["velocity"])[:1]
    decoded = runtime.decode(rows(reference.final_latents), timings)[0]
    return Stages(embeds, velocity, decoded, image, seconds, tokens)


def min_psnr_db(kind: str, floor_psnr: float | None, quantized: bool = False) -> float:
    """The end-to-end bound: the fp32 acceptance number, or the same-precision floor less the margin.

    A quantized graph (fp8, nvfp4) is held to MIN_PSNR_REDUCED: its error is the quantization's,
    which diffusers' bf16 pipeline (the floor) does not have.
    """
    if floor_psnr is None:
        return MIN_PSNR_FP32[kind]
    if quantized:
        return MIN_PSNR_REDUCED
    if not np.isfinite(floor_psnr):  # diffusers' own pipeline drew NaN at this dtype: no floor
        return MIN_PSNR_REDUCED
    return max(floor_psnr - FLOOR_MARGIN_DB, MIN_PSNR_REDUCED)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and np.isfinite(value) else None


def judge(ours: Stages, reference: Reference, precision: str, kind: str) -> Judgement:
    """Each stage against the precision's tolerance, the image against the PSNR bound."""
    tolerance = declared(precision).tolerance
    theirs = reference.stages
    components = {
        "text_encoder": tolerance.judge(ours.prompt_embeds, theirs.prompt_embeds),
        "transformer": tolerance.judge(ours.velocity, theirs.velocity),
        "vae": tolerance.judge(ours.decoded, theirs.decoded),
    }
    if ours.reference_tokens is not None:
        components["vae_encoder"] = tolerance.judge(ours.reference_tokens, theirs.reference_tokens)
    end_to_end = {
        "psnr_db": psnr(ours.image, theirs.image),
        "ssim": ssim(ours.image, theirs.image),
        "min_psnr_db": min_psnr_db(kind, reference.floor_psnr, declared(precision).quantized),
        # None where diffusers at this dtype drew no finite image (JSON has no NaN)
        "diffusers_same_precision_psnr_db": _finite_or_none(reference.floor_psnr),
    }
    if reference.floor_psnr is not None and not np.isfinite(reference.floor_psnr):
        end_to_end["diffusers_same_precision_note"] = (
            f"diffusers' own {declared(precision).compute_dtype} pipeline drew NaN/Inf on this checkpoint"
        )
    end_to_end["passed"] = bool(end_to_end["psnr_db"] >= end_to_end["min_psnr_db"])
    passed = end_to_end["passed"] and all(m["passed"] for m in components.values())
    return Judgement(components, end_to_end, passed)


def build_report(setup: CheckSetup, backend: str, reference: Reference, ours: Stages, verdict: Judgement, notes):
    """reports/runtime_check.json's content."""
    request, opened = setup.request, setup.opened
    tolerance = declared(opened.precision).tolerance
    images = [{"path": str(r.path), "size": list(r.original_size), "fitted": r.fitted} for r in setup.prepared]
    return {
        "artifacts": str(opened.folder),
        "checkpoint": str(setup.checkpoint),
        "precision": opened.precision,
        "backend": backend,
        "reference": reference.description,
        "prompt": request.prompt,
        "seed": request.seed,
        "steps": request.steps,
        "guidance": request.guidance,
        "height": opened.shapes.height,
        "width": opened.shapes.width,
        **({"images": images} if images else {}),
        "tolerance": {"max_rel_l2": tolerance.max_rel_l2, "min_cosine": tolerance.min_cosine},
        "components": verdict.components,
        "end_to_end": verdict.end_to_end,
        "seconds": {"reference": round(reference.stages.seconds, 3), "runtime": round(ours.seconds, 3)},
        "notes": list(notes),
        "passed": verdict.passed,
    }


def write_report(report: dict, folder: Path, log) -> None:
    """The JSON beside the artifacts (one per size of a --resolutions folder after its first), and the table."""
    (folder / "reports").mkdir(exist_ok=True)
    height, width = report["height"], report["width"]
    first = read_manifest(folder).shapes.sizes[0]
    name = "runtime_check.json" if (height, width) == first else f"runtime_check_{height}x{width}.json"
    atomic_write_json(folder / "reports" / name, report)
    log(format_table(report))


def stand_in_notes(precision: str, requested: str, backend: str) -> list[str]:
    """What the report says when the CHECK policy ran the torch backend in ONNX Runtime's place."""
    if not backend.startswith("torch") or requested == "torch":
        return []
    quantized = declared(precision).quantized
    return [
        f"ONNX Runtime's CPU provider cannot run {precision} graphs: ran the torch backend at "
        f"{'bf16 (it has no FP8)' if quantized else precision} instead; the {precision} ONNX "
        "graphs themselves were checked at export time (reports/export_check.json"
        + (", reports/fp8_check.json)" if quantized else ")")
    ]


def _checkpoint(request: CheckRequest, opened: Artifacts) -> Path:
    checkpoint = Path(request.model or opened.manifest.source.checkpoint).expanduser()
    if not (checkpoint / "model_index.json").is_file():
        raise UsageError(
            f"checkpoint {checkpoint} has no model_index.json; pass --model with the FLUX.2 folder the artifacts came from"
        )
    return checkpoint


def first_step(runtime: Flux2Runtime, request: CheckRequest) -> FirstStep:
    noise = initial_noise(runtime.artifacts, request.seed, 1)
    schedule = flux2_schedule(runtime.scheduler, request.steps, noise.shape[1])
    return FirstStep(noise, float(schedule.transformer_timesteps[0]), request.guidance)


def run_check(*, log=None, **request) -> dict:
    """Keyword front door: `check(CheckRequest(**request))`."""
    request["images"] = tuple(request.get("images") or ())
    return check(CheckRequest(**request), log=log)


def check(request: CheckRequest, log=None) -> dict:
    """Run both sides, judge, write DIR/reports/runtime_check.json and the table; return the report."""
    from runtime.artifacts import open_artifacts
    from runtime.backends.select import CHECK, select_backend
    from runtime.reference_images import references_for

    log = log or (lambda message: print(message, file=sys.stderr))
    if request.steps < 1:
        raise UsageError(f"--steps {request.steps} must be >= 1")
    check_seed(request.seed)
    opened = open_artifacts(request.artifacts, size=request.size)
    checkpoint = _checkpoint(request, opened)
    # bf16/fp8 where ONNX Runtime cannot run them: the torch backend stands in (the CHECK policy), noted.
    chosen = select_backend(
        request.backend, opened.folder, opened.manifest, checkpoint=checkpoint, log=log, policy=CHECK
    )
    notes = stand_in_notes(opened.precision, request.backend, chosen.name)
    for note in notes:
        log(f"note: {note}")
    kind = "torch" if chosen.name.startswith("torch") else "onnx"
    runtime = Flux2Runtime(opened, chosen, check_finite=False)  # NaN/Inf are measured and reported below
    reference_array, prepared = references_for(opened, list(request.images), log=log)
    setup = CheckSetup(request, opened, checkpoint, first_step(runtime, request), reference_array, tuple(prepared))
    reference = run_reference(setup)
    ours = run_runtime(runtime, setup, reference)
    verdict = judge(ours, reference, opened.precision, kind)
    report = build_report(setup, chosen.name, reference, ours, verdict, notes)
    write_report(report, opened.folder, log)
    chosen.close()
    return report


def format_table(report: dict) -> str:
    header = f"{'stage':<14}{'max_abs':>10}{'rel_l2':>11}{'cosine':>11}  result"
    lines = [
        f"runtime.check {report['artifacts']} ({report['precision']}, {report['backend']} vs {report['reference']})",
        header,
        "-" * len(header),
    ]
    for name, m in report["components"].items():
        lines.append(
            f"{name:<14}{m['max_abs']:>10.3g}{m['rel_l2']:>11.3g}{m['cosine']:>11.6f}  {'pass' if m['passed'] else 'FAIL'}"
            + ("" if m["finite"] else f" ({m['non_finite']} NaN/Inf values)")
        )
    e = report["end_to_end"]
    lines.append(
        f"{'image':<14}PSNR {e['psnr_db']:.2f} dB (min {e['min_psnr_db']:.1f}), SSIM {e['ssim']:.5f}  {'pass' if e['passed'] else 'FAIL'}"
    )
    if e.get("diffusers_same_precision_psnr_db") is not None:
        lines.append(
            f"{'':<14}(diffusers at {declared(report['precision']).compute_dtype} is {e['diffusers_same_precision_psnr_db']:.2f} dB from float32; "
            + (
                f"bound for a quantized graph = {MIN_PSNR_REDUCED:g} dB)"
                if declared(report["precision"]).quantized
                else f"bound = that - {FLOOR_MARGIN_DB:g} dB, at least {MIN_PSNR_REDUCED:g} dB)"
            )
        )
    if e.get("diffusers_same_precision_note"):
        lines.append(f"{'':<14}({e['diffusers_same_precision_note']}; bound = {MIN_PSNR_REDUCED:g} dB)")
    lines.append(f"overall: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m runtime.check", description="Compare this runtime with diffusers' FLUX.2 pipeline."
    )
    parser.add_argument("--artifacts", required=True, type=Path)
    parser.add_argument("--model", type=Path, default=None, help="source checkpoint (default: the one in the manifest)")
    parser.add_argument(
        "--backend",
        default="auto",
        type=one_of(BACKENDS, "backend"),
        choices=BACKENDS,
        help="default auto: trt, else ort, else torch",
    )
    parser.add_argument("--prompt", default=CHECK_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--image", action="append", type=Path, default=None, help="reference image (editing artifacts); repeat for K"
    )
    parser.add_argument("--height", type=int, default=None, help="check one exported size (default: every one)")
    parser.add_argument("--width", type=int, default=None, help="check one exported size (default: every one)")
    args = parser.parse_args(argv)
    request = CheckRequest(
        artifacts=args.artifacts,
        model=args.model,
        backend=args.backend,
        prompt=args.prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        images=tuple(args.image or ()),
    )
    if (args.height is None) != (args.width is None):
        parser.error(f"--height {args.height} --width {args.width}: give both (one of the exported sizes), or neither")
    reports = check_sizes(dataclasses.replace(request, size=None if args.height is None else (args.height, args.width)))
    return 0 if all(report["passed"] for report in reports) else 1


def check_sizes(request: CheckRequest, log=None) -> list[dict]:
    """`check` at `request.size`, or at every size the artifacts were exported at when it is None."""
    sizes = [request.size] if request.size is not None else list(read_manifest(request.artifacts).shapes.sizes)
    return [check(dataclasses.replace(request, size=size), log=log) for size in sizes]


def cli() -> None:
    """The console script: user errors as one line and an exit code, as `python -m` gives them."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
