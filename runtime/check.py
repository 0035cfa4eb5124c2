"""python -m runtime.check: this runtime vs diffusers' pipeline, same prompt, seed, steps and guidance.

Per component (same inputs into both): text encoder -> prompt_embeds; transformer -> the
velocity at the first step; VAE -> the image decoded from diffusers' final latents. End to end:
PSNR and SSIM between the two images. Written as a table and DIR/reports/runtime_check.json.

Editing artifacts (exported with --reference-images K) take K `--image` files: both sides get the
same prepared images (`runtime.reference_images`), the VAE encoder is compared on them (its
reference tokens against `Flux2Pipeline.prepare_image_latents`), and the transformer with them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_json
from common.cli import OneLineParser, run_cli
from common.errors import UsageError
from common.metrics import psnr, ssim
from common.precision import precision as declared
from runtime.backends.select import BACKENDS

CHECK_PROMPT = "A photograph of a red fox sitting in fresh snow at dawn, soft light, shallow depth of field."

# End-to-end bounds against diffusers float32. fp32: the acceptance numbers.
MIN_PSNR_FP32 = {"onnx": 40.0, "torch": 50.0}
# Below fp32 the image cannot be closer to float32 than PyTorch's own pipeline at that precision
# is: the bound is that pipeline's PSNR (its "floor", measured in the same check) minus this
# margin. Measured on the tiny default against diffusers' bf16 pipeline (31.00 dB at 256 x 256 /
# 3 steps, 34.67 dB at 1024 x 1024 / 4 steps): the torch backend at bf16 gives 31.05 and 34.68 dB
# now that it rounds the timestep where the pipeline does; fp16 graphs 57.5 and 47.1 dB against
# diffusers fp16's 56.8 and 47.0. 3 dB is a factor of 2 in mean squared error.
FLOOR_MARGIN_DB = 3.0
# ... but never below this: on an H200 (8 steps, 1024 x 1024) diffusers' bf16 pipeline, which
# rounds the latents to bf16 after every step, drifted to 13.3 dB from its fp32 pipeline while
# this runtime (float32 latents between steps) stayed at 38.2 dB; a floor that low checks
# nothing. 25 dB is the end-to-end bound FP8 is held to on the tiny default.
MIN_PSNR_REDUCED = 25.0


def _reference_pipeline(checkpoint: Path, pipeline_class: str, dtype: str = "float32"):
    import torch

    from common.reference_pipeline import reference_pipeline

    # PyTorch lets cuDNN convolutions use TF32 by default: measured on an H200, that moved the
    # "float32" VAE reference 5.5e-4 (relative L2) away from the fp32 graphs, over the fp32 bound.
    # A reference is true float32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return reference_pipeline(checkpoint, dtype=dtype)


def run_check(
    *,
    artifacts: Path,
    model: Path | None = None,
    backend: str = "auto",
    prompt: str = CHECK_PROMPT,
    seed: int = 0,
    steps: int = 4,
    guidance: float = 4.0,
    images: list[Path] | None = None,
    log=None,
) -> dict:
    import torch

    from runtime.artifacts import open_artifacts
    from runtime.backends.select import CHECK, select_backend
    from runtime.backends.torch_backend import TorchBackend
    from runtime.pipeline import Flux2Runtime, Sampling, Timings, check_seed, initial_noise, to_image
    from runtime.reference_images import references_for

    log = log or (lambda message: print(message, file=sys.stderr))
    if steps < 1:
        raise UsageError(f"--steps {steps} must be >= 1")
    check_seed(seed)
    opened = open_artifacts(artifacts)
    precision = opened.precision
    checkpoint = Path(model or opened.manifest.source.checkpoint).expanduser()
    if not (checkpoint / "model_index.json").is_file():
        raise UsageError(
            f"checkpoint {checkpoint} has no model_index.json; pass --model with the FLUX.2 folder the artifacts came from"
        )

    notes = []
    # A bf16/fp8 check on a machine where ONNX Runtime cannot run them (no onnxruntime-gpu) runs the
    # PyTorch modules, with --backend ort as with auto (the CHECK policy), and the report says so.
    chosen = select_backend(backend, opened.folder, opened.manifest, checkpoint=checkpoint, log=log, policy=CHECK)
    if chosen.name.startswith("torch") and backend != "torch":
        notes.append(
            f"ONNX Runtime's CPU provider cannot run {precision} graphs: ran the torch backend at "
            f"{'bf16 (it has no FP8)' if declared(precision).quantized else precision} instead; the {precision} ONNX "
            "graphs themselves were checked at export time (reports/export_check.json"
            + (", reports/fp8_check.json)" if declared(precision).quantized else ")")
        )
        log(f"note: {notes[-1]}")
    kind = "torch" if chosen.name.startswith("torch") else "onnx"
    runtime = Flux2Runtime(opened, chosen, check_finite=False)  # NaN/Inf are measured and reported below
    layers = tuple(opened.geometry.text_out_layers)
    shapes = opened.shapes
    reference_array, prepared = references_for(opened, images or [], log=log)

    started = time.perf_counter()
    pipe = _reference_pipeline(checkpoint, opened.geometry.pipeline_class)
    device = pipe._execution_device
    with torch.no_grad():
        ref_embeds, _ = pipe.encode_prompt(
            prompt=prompt, device=device, max_sequence_length=shapes.max_sequence_length, text_encoder_out_layers=layers
        )
        final = {}

        def keep_latents(_pipe, _index, _t, kwargs):
            final["latents"] = kwargs["latents"]
            return kwargs

        call = dict(
            prompt=prompt,
            height=shapes.height,
            width=shapes.width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            max_sequence_length=shapes.max_sequence_length,
            text_encoder_out_layers=layers,
            output_type="np",
            callback_on_step_end=keep_latents,
        )
        if prepared:
            call["image"] = [reference.image for reference in prepared]
        ref_image = pipe(**call).images[0]
    floor_psnr = None
    if not declared(precision).is_float32:
        same_precision = _reference_pipeline(
            checkpoint, opened.geometry.pipeline_class, declared(precision).compute_dtype
        )
        with torch.no_grad():
            floor_image = same_precision(
                **{**call, "generator": torch.Generator().manual_seed(seed), "callback_on_step_end": None}
            ).images[0]
        floor_psnr = psnr(floor_image, ref_image)
        del same_precision
    reference_seconds = time.perf_counter() - started

    timings = Timings()
    started = time.perf_counter()
    sampling = Sampling(prompt, seed, steps, guidance)
    _, our_image, _ = next(runtime.generate(sampling, progress=False, reference_images=reference_array))
    runtime_seconds = time.perf_counter() - started

    # Per component, same inputs into both sides; graphs built for a batch of b get b copies of
    # the row and their first row is compared.
    b = shapes.batch_size

    def rows(array):
        return chosen.from_host(np.concatenate([array] * b))

    ours_embeds = chosen.to_host(runtime.encode_prompt(prompt, timings))[:1]
    from runtime.scheduler import flux2_schedule

    noise = initial_noise(opened, seed, 1)
    schedule = flux2_schedule(runtime.scheduler, steps, noise.shape[1])
    feeds = {
        "hidden_states": noise,
        "encoder_hidden_states": ref_embeds.float().cpu().numpy(),
        "timestep": np.full((1,), schedule.transformer_timesteps[0], np.float32),
    }
    if opened.geometry.guidance_embeds:
        feeds["guidance"] = np.full((1,), guidance, np.float32)
    reference_components = {}
    if prepared:
        # The VAE encoder on the same prepared images; then the transformer gets diffusers' tokens.
        ref_height, ref_width = shapes.reference_size
        with torch.no_grad():
            ref_tokens, _ = pipe.prepare_image_latents(
                images=[
                    pipe.image_processor.preprocess(r.image, height=ref_height, width=ref_width, resize_mode="crop")
                    for r in prepared
                ],
                batch_size=1,
                generator=None,
                device=device,
                dtype=pipe.vae.dtype,
            )
        ours_tokens = chosen.run("vae_encoder", {"reference_images": chosen.from_host(reference_array)})
        ours_tokens = chosen.to_host(ours_tokens["reference_tokens"]).reshape(1, -1, ref_tokens.shape[-1])
        reference_components["vae_encoder"] = (ours_tokens, ref_tokens.float().cpu().numpy())
        feeds["reference_latents"] = ref_tokens.float().cpu().numpy()
    ours_velocity = chosen.to_host(chosen.run("transformer", {k: rows(v) for k, v in feeds.items()})["velocity"])[:1]
    # The reference side: the torch backend's stages (diffusers' modules, as Flux2Pipeline calls them)
    # over the float32 pipeline that drew the reference image.
    reference = TorchBackend.around(pipe, opened.folder, opened.manifest, checkpoint)
    ref_velocity = reference.run("transformer", {k: reference.from_host(v) for k, v in feeds.items()})["velocity"]
    final_latents = final["latents"].float().cpu().numpy()
    ours_decoded = to_image(chosen.to_host(chosen.run("vae", {"packed_latents": rows(final_latents)})["image"]))[0]
    decoded = reference.run("vae", {"packed_latents": final["latents"]})["image"]
    ref_decoded = to_image(decoded.float().cpu().numpy())[0]

    tolerance = declared(precision).tolerance
    components = {
        "text_encoder": tolerance.judge(ours_embeds, ref_embeds.float().cpu().numpy()),
        "transformer": tolerance.judge(ours_velocity, ref_velocity.float().cpu().numpy()),
        "vae": tolerance.judge(ours_decoded, ref_decoded),
        **{name: tolerance.judge(ours, theirs) for name, (ours, theirs) in reference_components.items()},
    }
    end_to_end = {
        "psnr_db": psnr(our_image, ref_image),
        "ssim": ssim(our_image, ref_image),
        "min_psnr_db": MIN_PSNR_FP32[kind]
        if floor_psnr is None
        else max(floor_psnr - FLOOR_MARGIN_DB, MIN_PSNR_REDUCED),
        "diffusers_same_precision_psnr_db": floor_psnr,
    }
    end_to_end["passed"] = bool(end_to_end["psnr_db"] >= end_to_end["min_psnr_db"])
    passed = end_to_end["passed"] and all(m["passed"] for m in components.values())
    report = {
        "artifacts": str(opened.folder),
        "checkpoint": str(checkpoint),
        "precision": precision,
        "backend": chosen.name,
        "reference": f"diffusers {opened.geometry.pipeline_class}, float32, {device}",
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        **(
            {"images": [{"path": str(r.path), "size": list(r.original_size), "fitted": r.fitted} for r in prepared]}
            if prepared
            else {}
        ),
        "tolerance": {"max_rel_l2": tolerance.max_rel_l2, "min_cosine": tolerance.min_cosine},
        "components": components,
        "end_to_end": end_to_end,
        "seconds": {"reference": round(reference_seconds, 3), "runtime": round(runtime_seconds, 3)},
        "notes": notes,
        "passed": passed,
    }
    (opened.folder / "reports").mkdir(exist_ok=True)
    atomic_write_json(opened.folder / "reports" / "runtime_check.json", report)
    log(format_table(report))
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
            f"bound = that - {FLOOR_MARGIN_DB:g} dB, at least {MIN_PSNR_REDUCED:g} dB)"
        )
    lines.append(f"overall: {'PASS' if report['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m runtime.check", description="Compare this runtime with diffusers' FLUX.2 pipeline."
    )
    parser.add_argument("--artifacts", required=True, type=Path)
    parser.add_argument("--model", type=Path, default=None, help="source checkpoint (default: the one in the manifest)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="default auto: trt, else ort, else torch")
    parser.add_argument("--prompt", default=CHECK_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--image", action="append", type=Path, default=None, help="reference image (editing artifacts); repeat for K"
    )
    args = parser.parse_args(argv)
    report = run_check(
        artifacts=args.artifacts,
        model=args.model,
        backend=args.backend,
        prompt=args.prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        images=args.image,
    )
    return 0 if report["passed"] else 1


def cli() -> None:
    """The console script: user errors as one line and an exit code, as `python -m` gives them."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
