"""make bench-editing: what K reference images cost, as ratios against text to image (K = 0) in the same run.

Exports the tiny FLUX.2 [dev] checkpoint with K = 0, 1, 2 reference images at the output size
(each folder starts as a copy of the previous one, so the text encoder and VAE decoder are
reused), generates the same prompt and seed with each through ONNX Runtime's CPU provider, and
reports the joint sequence length the transformer attends over, the median time of the denoising
loop and of the one VAE encoder call, and their ratios to K = 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-references", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "artifacts" / "bench-editing")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default bench/results/editing-HxW.json)")
    args = parser.parse_args()

    from common.specs import Shapes, image_tokens, reference_tokens
    from export.run import export_artifacts
    from export.verify.reference import check_reference_images
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling

    results = {}
    previous = None
    for k in range(args.max_references + 1):
        folder = args.work / f"{args.height}x{args.width}-k{k}"
        if previous is not None and not folder.exists():
            shutil.copytree(previous, folder)
        shapes = Shapes(args.height, args.width, args.max_sequence_length, reference_images=k)
        export_artifacts(model="tiny", out=folder, precision="fp32", shapes=shapes, skip_check=True, log=lambda m: None)
        previous = folder
        opened = open_artifacts(folder)
        references = None
        if k:
            height, width = shapes.reference_size
            references = check_reference_images((k, 3, height, width))
        runtime = Flux2Runtime(opened, OrtBackend(opened.folder, opened.manifest))
        warm_up = Sampling("warm-up", seed=0, steps=1, guidance=4.0)
        next(runtime.generate(warm_up, progress=False, reference_images=references))
        denoise, encode = [], []
        for repeat in range(args.repeats):
            _, _, timings = next(
                runtime.generate(
                    Sampling("a red fox", seed=repeat, steps=args.steps, guidance=4.0),
                    progress=False,
                    reference_images=references,
                )
            )
            denoise.append(timings.stages["denoise"])
            encode.append(timings.stages.get("vae_encoder", 0.0))
        image = image_tokens(opened.geometry, shapes)
        results[f"k{k}"] = {
            "image_tokens": image,
            "reference_tokens": k * reference_tokens(opened.geometry, shapes),
            "joint_sequence": args.max_sequence_length + image + k * reference_tokens(opened.geometry, shapes),
            "denoise_s": statistics.median(denoise),
            "per_step_s": statistics.median(denoise) / args.steps,
            "vae_encoder_s": statistics.median(encode),
            "transformer_bytes": opened.manifest.components["transformer"].total_bytes,
        }
    base = results["k0"]
    for entry in results.values():
        entry["image_and_reference_tokens_over_k0"] = (entry["image_tokens"] + entry["reference_tokens"]) / base[
            "image_tokens"
        ]
        entry["per_step_over_k0"] = entry["per_step_s"] / base["per_step_s"]
    report = {
        "machine": "this machine (CPU, ONNX Runtime CPU provider), tiny FLUX.2 [dev] checkpoint, fp32",
        "shapes": {"height": args.height, "width": args.width, "max_sequence_length": args.max_sequence_length},
        "steps": args.steps,
        "repeats": args.repeats,
        "numpy": np.__version__,
        **results,
    }
    out = args.out or REPO / "bench" / "results" / f"editing-{args.height}x{args.width}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"tiny dev, {args.height}x{args.width}, {args.max_sequence_length} text tokens, {args.steps} steps, "
        f"ort-cpu, median of {args.repeats}"
    )
    print(f"{'K':>2} {'tokens (img+ref)':>17} {'x K=0':>6} {'joint':>6} {'ms/step':>9} {'x K=0':>6} {'encode ms':>10}")
    for k in range(args.max_references + 1):
        e = results[f"k{k}"]
        print(
            f"{k:>2} {e['image_tokens'] + e['reference_tokens']:>17} {e['image_and_reference_tokens_over_k0']:>6.2f} "
            f"{e['joint_sequence']:>6} {e['per_step_s'] * 1000:>9.1f} {e['per_step_over_k0']:>6.2f} "
            f"{e['vae_encoder_s'] * 1000:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
