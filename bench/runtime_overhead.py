"""make bench-runtime: per-stage time of runtime.generate on the tiny default, and the runtime's overhead.

Overhead = total wall time minus time inside backend calls (ONNX Runtime here), reported as a
ratio of the total. Also the runtime's import time against diffusers' (the runtime must not pull
diffusers or transformers onto inference nodes). Everything is measured in this one process /
command, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_seconds(statement: str, repeats: int = 3) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    runs = [
        float(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout)
        for _ in range(repeats)
    ]
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "tiny-fp32")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtime.json")
    args = parser.parse_args()
    if not (args.artifacts / "manifest.json").is_file():
        from export.run import export_artifacts

        export_artifacts(model="tiny", out=args.artifacts, precision="fp32")

    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling

    artifacts = open_artifacts(args.artifacts)
    runtime = Flux2Runtime(artifacts, OrtBackend(artifacts.folder, artifacts.manifest))
    next(runtime.generate(Sampling("warm-up", seed=0, steps=1, guidance=4.0), progress=False))  # sessions created
    rows = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        _, _, timings = next(
            runtime.generate(
                Sampling("a red fox in the snow", seed=repeat, steps=args.steps, guidance=4.0), progress=False
            )
        )
        total = time.perf_counter() - started
        rows.append({**timings.as_dict(), "wall_s": total, "overhead_s": total - timings.backend})
    median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    runtime_import = import_seconds("import runtime.generate, runtime.pipeline, runtime.backends.ort")
    diffusers_import = import_seconds("import diffusers; from diffusers import Flux2Pipeline")
    result = {
        "machine": "this machine (CPU, ONNX Runtime CPU provider)",
        "shapes": artifacts.shapes.to_json(),
        "steps": args.steps,
        "median": median,
        "overhead_ratio": median["overhead_s"] / median["wall_s"],
        "import_s": {
            "runtime": runtime_import,
            "diffusers_flux2": diffusers_import,
            "ratio": runtime_import / diffusers_import,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    shapes = artifacts.shapes
    print(
        f"runtime.generate, tiny fp32 {shapes.height}x{shapes.width}, {args.steps} steps, ort-cpu, median of {args.repeats}"
    )
    print(f"{'stage':<14}{'seconds':>10}{'share':>9}")
    for stage in ("tokenize_s", "text_encoder_s", "denoise_s", "vae_s"):
        print(f"{stage[:-2]:<14}{median[stage]:>10.4f}{median[stage] / median['wall_s']:>9.1%}")
    print(f"{'total':<14}{median['wall_s']:>10.4f}")
    print(f"{'in backend':<14}{median['backend_s']:>10.4f}{median['backend_s'] / median['wall_s']:>9.1%}")
    print(f"{'overhead':<14}{median['overhead_s']:>10.4f}{result['overhead_ratio']:>9.1%}")
    print(
        f"import: runtime {runtime_import:.2f} s vs diffusers Flux2Pipeline {diffusers_import:.2f} s (ratio {result['import_s']['ratio']:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
