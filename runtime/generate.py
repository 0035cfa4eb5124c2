"""python -m runtime.generate: artifacts folder + prompt -> PNG(s) with a JSON sidecar each."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_bytes, atomic_write_json, writable_error
from common.cli import OneLineParser, one_of, run_cli
from common.errors import UsageError
from common.lora import parse_lora_request
from common.staging import remove_stale_staging
from common.storage import is_storage_error, storage_error
from runtime.backends.select import BACKENDS

DEFAULT_STEPS = 50  # Flux2Pipeline's default
DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline's default


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    if prompt_file is not None:
        try:
            lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UsageError(
                f"cannot read --prompt-file {prompt_file} ({reason}); pass a UTF-8 text file, one prompt per line"
            ) from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"--prompt-file {prompt_file} has no prompts; write one prompt per line")
        return prompts
    if prompt is None:
        raise UsageError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    return [prompt]


def validate(*, steps: int, guidance: float, num_images: int, seed: int, cache_threshold: float = 0.0) -> None:
    if steps < 1:
        raise UsageError(f"--steps {steps} must be >= 1")
    if not math.isfinite(guidance):
        raise UsageError(f"--guidance {guidance} must be a finite number (FLUX.2 [dev] uses 4.0)")
    if num_images < 1:
        raise UsageError(f"--num-images {num_images} must be >= 1")
    from runtime.pipeline import check_seed
    from runtime.step_cache import check_threshold

    check_seed(seed)
    check_threshold(cache_threshold)


def check_out(out: Path) -> Path:
    """`out` as a folder images can be written to, refused in one line if not. Nothing is created:
    the folder is made with the first image (`make_out`), so a refused or failed run leaves none."""
    out = Path(out).expanduser()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == out else f" ({existing} is a file)"
        raise UsageError(f"--out {out} is a file{where}; pass a folder for the images")
    if reason := writable_error(existing):
        raise UsageError(f"--out {out} is not writable ({reason}); choose a writable folder")
    return out


def make_out(out: Path) -> Path:
    """Create the `check_out`-ed folder, just before the first image is written into it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out} is not writable ({exc.strerror}); choose a writable folder") from None
    return out


def encode_png(image_uint8) -> bytes:
    """The PNG file of one image [H, W, 3] uint8: the one encoder behind every PNG flux2-trt hands out
    (runtime.generate's and deploy.client's files, deploy.openai_api's b64_json), so they are equal byte for byte."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_uint8).save(buffer, format="PNG")
    return buffer.getvalue()


def save_image(out: Path, stem: str, image_uint8, sidecar: dict) -> Path:
    png = out / f"{stem}.png"
    try:
        atomic_write_bytes(png, encode_png(image_uint8))
        atomic_write_json(out / f"{stem}.json", sidecar)
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        png.unlink(missing_ok=True)  # no image without its sidecar
        raise storage_error(exc, f"saving image {png.name}", out) from None
    return png


@dataclass(frozen=True)
class GenerateRequest:
    """One `python -m runtime.generate` run: which artifacts, which prompts, how many images, where to."""

    artifacts: Path
    prompts: tuple[str, ...]
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    num_images: int = 1
    backend: str = "auto"
    out: Path = Path("out")
    low_vram: bool = False
    progress: bool = True
    negative_prompt: str = ""
    images: tuple[Path, ...] = ()  # reference images for editing, as many as the artifacts were exported with
    verify: bool = False  # re-hash every artifact file, even those already verified unchanged
    loras: tuple = ()  # common.lora.LoraRequest per --lora, fed into the artifacts' LoRA slots
    size: tuple[int, int] | None = None  # (height, width) of a --resolutions folder; None: its first size
    cache_threshold: float = 0.0  # the first-block step cache (docs/cache.md); 0: off


def generate(*, log=None, **request) -> list[Path]:
    """Keyword front door: `generate_images(GenerateRequest(**request))`."""
    request["prompts"] = tuple(request.get("prompts", ()))
    request["images"] = tuple(request.get("images") or ())
    request["loras"] = tuple(
        parse_lora_request(item) if isinstance(item, str) else item for item in request.get("loras") or ()
    )
    return generate_images(GenerateRequest(**request), log=log)


def generate_images(request: GenerateRequest, log=None) -> list[Path]:
    """Generate `num_images` per prompt; prompt i uses seed + i. Returns the PNG paths written."""
    artifacts, prompts, seed, steps = request.artifacts, request.prompts, request.seed, request.steps
    guidance, num_images, backend, out = request.guidance, request.num_images, request.backend, request.out
    low_vram, progress, negative_prompt = request.low_vram, request.progress, request.negative_prompt
    images, verify = request.images, request.verify
    log = log or (lambda message: print(message, file=sys.stderr))
    validate(steps=steps, guidance=guidance, num_images=num_images, seed=seed, cache_threshold=request.cache_threshold)
    from runtime import step_cache
    from runtime.artifacts import open_artifacts
    from runtime.backends.select import select_backend
    from runtime.lora import open_loras
    from runtime.pipeline import Flux2Runtime, Sampling, to_uint8
    from runtime.reference_images import references_for

    opened = open_artifacts(artifacts, verify=verify, log=log, size=request.size)
    step_cache.check_run(request.cache_threshold, opened)  # before the backend's choice is logged
    references, _ = references_for(opened, images, log=log)
    loras = open_loras(request.loras, opened.folder, opened.shapes)
    out = check_out(out)
    if out.is_dir():
        remove_stale_staging(out, log=log)  # half-written images of a killed run
    chosen = select_backend(backend, opened.folder, opened.manifest, low_vram=low_vram, log=log)
    step_cache.check_run(request.cache_threshold, opened, chosen)
    runtime = Flux2Runtime(opened, chosen)
    runtime.use_loras(loras)
    warning = runtime.guidance_warning(guidance)
    if warning:
        log(f"warning: {warning}")
    if negative_prompt and not runtime.uses_cfg(guidance):
        log("warning: --negative-prompt is ignored: only FLUX.2 [klein] base models with --guidance > 1 use one")
    written = []
    for prompt_index, prompt in enumerate(prompts):
        prompt_seed = seed + prompt_index
        fit = runtime.prompt_fit(prompt)
        if fit["prompt_truncated"]:
            log(
                f"note: prompt {prompt_index} has {fit['prompt_tokens']} tokens once formatted; the artifacts take "
                f"{opened.shapes.max_sequence_length} (max_sequence_length): the rest is cut, as diffusers does"
            )
        sampling = Sampling(
            prompt, prompt_seed, steps, guidance, num_images, negative_prompt, cache_threshold=request.cache_threshold
        )
        for image_index, image, timings in runtime.generate(sampling, progress=progress, reference_images=references):
            stem = f"{prompt_index:03d}-{image_index:02d}-seed{prompt_seed}"
            sidecar = {
                "prompt": prompt,
                **fit,
                "seed": prompt_seed,
                "image_index": image_index,
                "steps": steps,
                "guidance": guidance,
                "classifier_free_guidance": runtime.uses_cfg(guidance),
                "negative_prompt": negative_prompt if runtime.uses_cfg(guidance) else None,
                "backend": chosen.name,
                "precision": opened.precision,
                "height": opened.shapes.height,
                "width": opened.shapes.width,
                **({"images": [str(Path(p)) for p in images]} if images else {}),
                **({"loras": [lora.record(scale) for lora, scale in loras]} if loras else {}),
                "artifacts": str(opened.folder.resolve()),
                "manifest_sha256": opened.manifest_sha256,
                "timings": timings.as_dict(),
                **({"cache": timings.cache} if timings.cache else {}),
            }
            # The folder is made with the first image: a run refused or failed before it leaves none.
            written.append(save_image(make_out(out), stem, to_uint8(image), sidecar))
            log(f"wrote {written[-1]} ({timings.stages['total']:.2f} s, {chosen.name}, {opened.precision})")
            if timings.cache:
                ran = timings.cache["steps"] - timings.cache["skipped"]
                log(
                    f"step cache (threshold {request.cache_threshold}): the tail ran on {ran} of "
                    f"{timings.cache['steps']} transformer evaluations"
                )
    chosen.close()
    return written


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m runtime.generate", description="Generate FLUX.2 images from an artifacts folder."
    )
    parser.add_argument("--artifacts", required=True, type=Path, help="folder written by `python -m export`")
    parser.add_argument("--prompt", help="the prompt")
    parser.add_argument(
        "--prompt-file", type=Path, help="UTF-8 text file, one prompt per line (one image set per line)"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed; prompt i of a file uses seed + i (default 0)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"guidance scale (default {DEFAULT_GUIDANCE})"
    )
    parser.add_argument(
        "--negative-prompt", default="", help="klein base models (true CFG) only; diffusers uses the empty prompt"
    )
    parser.add_argument(
        "--image",
        action="append",
        type=Path,
        default=None,
        help="reference image for editing; repeat for several (artifacts exported with --reference-images K)",
    )
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument(
        "--backend",
        default="auto",
        type=one_of(BACKENDS, "backend"),
        choices=BACKENDS,
        help="default auto: trt, else ort, else torch",
    )
    parser.add_argument(
        "--height", type=int, default=None, help="image height: one of the exported sizes (default: the first)"
    )
    parser.add_argument(
        "--width", type=int, default=None, help="image width: one of the exported sizes (default: the first)"
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a transformer LoRA fed into the artifacts' LoRA slots (export --lora-rank R) at SCALE (default 1.0); "
        "repeat to stack several (docs/lora.md)",
    )
    parser.add_argument(
        "--cache-threshold",
        type=float,
        default=0.0,
        help="first-block step cache: skip the transformer's tail on a step whose first-block residual changed "
        "by at most this fraction (0: off, the default; needs artifacts exported with --step-cache; docs/cache.md)",
    )
    parser.add_argument("--low-vram", action="store_true", help="keep one component loaded at a time")
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="folder for PNGs and JSON sidecars (default out/)"
    )
    parser.add_argument(
        "--verify", action="store_true", help="re-hash every artifact file, even those already verified unchanged"
    )
    args = parser.parse_args(argv)
    request = GenerateRequest(
        artifacts=args.artifacts,
        prompts=tuple(read_prompts(args.prompt, args.prompt_file)),
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        num_images=args.num_images,
        backend=args.backend,
        out=args.out,
        low_vram=args.low_vram,
        negative_prompt=args.negative_prompt,
        images=tuple(args.image or ()),
        verify=args.verify,
        loras=tuple(parse_lora_request(text) for text in args.lora),
        size=requested_size(parser, args.height, args.width),
        cache_threshold=args.cache_threshold,
    )
    generate_images(request)
    return 0


def requested_size(parser, height: int | None, width: int | None) -> tuple[int, int] | None:
    """--height/--width as a size, both or neither (the artifacts' exported sizes are checked on opening)."""
    if height is None and width is None:
        return None
    if height is None or width is None:
        parser.error(f"--height {height} --width {width}: give both (one of the exported sizes), or neither")
    return height, width


def cli() -> None:
    """The console script: user errors as one line and an exit code, as `python -m` gives them."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
