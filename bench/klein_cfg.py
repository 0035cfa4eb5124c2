"""make bench-cfg: classifier-free guidance as two batch-1 transformer calls vs one batch-2 call.

Exports the tiny FLUX.2 [klein] base model at batch 1 and at batch 2 (same shapes otherwise),
generates the same image with each through the same backend, and reports the median time of the
denoising loop and their ratio. Both runs happen in this one process on this one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "artifacts" / "bench-cfg")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "klein_cfg.json")
    args = parser.parse_args()

    from common.metrics import psnr
    from common.specs import Shapes
    from export.run import export_artifacts
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling, Timings

    results = {}
    images = {}
    for batch in (1, 2):
        folder = args.work / f"tiny-klein-b{batch}"
        shapes = Shapes(args.height, args.width, args.max_sequence_length, batch_size=batch)
        export_artifacts(
            model="tiny-klein", out=folder, precision="fp32", shapes=shapes, skip_check=True, log=lambda m: None
        )
        opened = open_artifacts(folder)
        runtime = Flux2Runtime(opened, OrtBackend(opened.folder, opened.manifest))
        next(runtime.generate(Sampling("warm-up", seed=0, steps=1, guidance=4.0), progress=False))
        seconds = []
        for repeat in range(args.repeats):
            timings = Timings()
            _, images[batch], timings = next(
                runtime.generate(
                    Sampling("a red fox in the snow", seed=repeat, steps=args.steps, guidance=4.0), progress=False
                )
            )
            seconds.append(timings.stages["denoise"])
        results[f"batch{batch}"] = {
            "denoise_s": statistics.median(seconds),
            "per_step_s": statistics.median(seconds) / args.steps,
        }
    ratio = results["batch2"]["denoise_s"] / results["batch1"]["denoise_s"]
    report = {
        "machine": "this machine (CPU, ONNX Runtime CPU provider)",
        "shapes": {"height": args.height, "width": args.width, "max_sequence_length": args.max_sequence_length},
        "steps": args.steps,
        **results,
        "batch2_over_two_calls": ratio,
        "same_image_psnr_db": psnr(images[1], images[2]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"tiny klein CFG, {args.height}x{args.width}, {args.max_sequence_length} tokens, {args.steps} steps, ort-cpu, median of {args.repeats}"
    )
    print(
        f"two batch-1 calls per step: {results['batch1']['denoise_s']:.3f} s ({results['batch1']['per_step_s'] * 1000:.1f} ms/step)"
    )
    print(
        f"one batch-2 call per step:  {results['batch2']['denoise_s']:.3f} s ({results['batch2']['per_step_s'] * 1000:.1f} ms/step)"
    )
    print(f"batch-2 / two calls: {ratio:.2f}; images agree at {report['same_image_psnr_db']:.1f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
