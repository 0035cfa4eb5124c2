"""python -m export: FLUX.2 checkpoint -> verified ONNX graphs + manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import OneLineParser, one_of, parse_csv, parse_int_csv, run_cli
from common.precision import DEFAULT, PRECISION_NAMES
from common.specs import COMPONENTS, DEFAULT_HEIGHT, DEFAULT_MAX_SEQUENCE_LENGTH, DEFAULT_WIDTH, Shapes
from export.fp8 import run as fp8_export

STEP_CACHE_HELP = (
    "also write the transformer as head, tail and out graphs sharing its weights, for "
    "runtime.generate --cache-threshold (docs/cache.md)"
)


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m export", description="Export FLUX.2 to ONNX and verify it against PyTorch.")
    parser.add_argument(
        "--model", required=True, help="checkpoint folder (diffusers layout), or tiny, tiny-klein, tiny-klein-distilled"
    )
    parser.add_argument("--out", required=True, type=Path, help="artifacts folder to write")
    parser.add_argument(
        "--precision",
        default=DEFAULT,
        type=one_of(PRECISION_NAMES, "precision"),
        choices=PRECISION_NAMES,
        help=f"one of {', '.join(PRECISION_NAMES)} (default {DEFAULT})",
    )
    parser.add_argument(
        "--components", default=",".join(COMPONENTS), help=f"comma-separated subset of {','.join(COMPONENTS)}"
    )
    parser.add_argument("--height", type=int, default=None, help=f"image height in pixels (default {DEFAULT_HEIGHT})")
    parser.add_argument("--width", type=int, default=None, help=f"image width in pixels (default {DEFAULT_WIDTH})")
    parser.add_argument(
        "--resolutions",
        default=None,
        metavar="HxW[,HxW...]",
        help="several image sizes from one folder: the transformer and VAE once per size, one copy of their "
        "weights; the first is the default (replaces --height/--width; docs/export.md)",
    )
    parser.add_argument("--max-sequence-length", type=int, default=DEFAULT_MAX_SEQUENCE_LENGTH)
    parser.add_argument(
        "--batch-size", type=int, default=1, help="batch of every graph (2: both CFG passes in one transformer call)"
    )
    parser.add_argument(
        "--reference-images",
        type=int,
        default=0,
        metavar="K",
        help="image editing: K reference images per generation (adds vae_encoder.onnx; default 0, text to image)",
    )
    parser.add_argument(
        "--reference-size",
        default=None,
        metavar="HxW",
        help="pixel size of each reference image (default: the output --height x --width)",
    )
    parser.add_argument(
        "--text-encoder-layers", default=None, help="hidden-state indices, e.g. 10,20,30 (default: from the checkpoint)"
    )
    parser.add_argument("--step-cache", action="store_true", help=STEP_CACHE_HELP)
    parser.add_argument("--force", action="store_true", help="re-export even when cached artifacts match")
    parser.add_argument("--skip-check", action="store_true", help="do not run the numerics check against PyTorch")
    parser.add_argument(
        "--transformer-weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="a single-file FLUX.2 transformer in BFL naming (the published FLUX.2-dev-NVFP4 files, with "
        "--precision nvfp4, or a plain bf16 file) replacing the checkpoint's transformer weights (docs/nvfp4.md)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="bake a transformer LoRA (diffusers/peft, BFL or kohya .safetensors) into the weights, at SCALE "
        "(default 1.0); repeatable (docs/lora.md)",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="LoRA slots of rank R on every transformer block linear, fed at run time by runtime.generate --lora "
        "(default 0: none; docs/lora.md)",
    )
    fp8_export.add_arguments(parser)
    # The plain path (load the modules, then export), kept for benchmarks and comparisons.
    parser.add_argument("--no-stream", dest="stream", action="store_false", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    from common.lora import parse_lora_request
    from export.run import ExportJob, run_export

    layers = (
        parse_int_csv(parser, "--text-encoder-layers", args.text_encoder_layers) if args.text_encoder_layers else None
    )
    reference_height = reference_width = 0
    if args.reference_size is not None:
        if not args.reference_images:
            parser.error(f"--reference-size {args.reference_size} needs --reference-images K (K >= 1)")
        reference_height, reference_width = parse_size(parser, "--reference-size", args.reference_size)
    height, width, resolutions = _sizes(parser, args)
    job = ExportJob(
        model=args.model,
        out=args.out,
        precision=args.precision,
        components=parse_csv(args.components),
        shapes=Shapes(
            height=height,
            width=width,
            resolutions=resolutions,
            max_sequence_length=args.max_sequence_length,
            batch_size=args.batch_size,
            reference_images=args.reference_images,
            reference_height=reference_height,
            reference_width=reference_width,
            lora_rank=args.lora_rank,
        ),
        text_encoder_layers=layers,
        force=args.force,
        skip_check=args.skip_check,
        fp8=fp8_export.options_from_args(args, args.precision),
        stream=args.stream,
        step_cache=args.step_cache,
        transformer_weights=args.transformer_weights,
        loras=tuple(parse_lora_request(text) for text in args.lora),
    )
    run_export(job)
    return 0


def _sizes(parser, args) -> tuple[int, int, tuple]:
    """(height, width, resolutions): --resolutions' first size, or --height/--width (defaults in common.specs)."""
    if args.resolutions is None:
        height = DEFAULT_HEIGHT if args.height is None else args.height
        return height, DEFAULT_WIDTH if args.width is None else args.width, ()
    sizes = tuple(
        parse_size(parser, "--resolutions", part.strip()) for part in args.resolutions.split(",") if part.strip()
    )
    if not sizes:
        parser.error(f"--resolutions {args.resolutions!r} names no size; write HxW[,HxW...], e.g. 1024x1024,1152x896")
    given = (sizes[0][0] if args.height is None else args.height, sizes[0][1] if args.width is None else args.width)
    if given != sizes[0]:
        parser.error(
            f"--height/--width {given[0]}x{given[1]} and --resolutions {args.resolutions}: the first size is the "
            "default; drop --height/--width or list that size first"
        )
    return sizes[0][0], sizes[0][1], sizes if len(sizes) > 1 else ()


def parse_size(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, int]:
    """'512x768' -> (512, 768): height first, as --height/--width."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        parser.error(f"{flag} {text!r} is not HEIGHTxWIDTH in pixels, e.g. 1024x1024")
    return int(parts[0]), int(parts[1])


def cli() -> None:
    """The console script: user errors as one line and an exit code, as `python -m` gives them."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
