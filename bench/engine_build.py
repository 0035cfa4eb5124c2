"""make bench-engines: TensorRT-RTX ahead-of-time build time and peak host memory, against the ONNX data size.

Takes the full-width FLUX.2 [dev] transformer slice of `bench.export_memory` (1 double + 1 single
block at FLUX.2 [dev]'s real widths, 4.3 GiB of bf16), exports its transformer at fp16, bf16, fp8 and nvfp4
(`--components transformer --skip-check`), then builds each with
`python -m engines.build --target rtx --force` in its own process while this one samples that
process tree's peak anonymous memory (RssAnon) and peak RSS from /proc every 50 ms. Reported as
ratios in the same run: peak host memory / ONNX data bytes (the goal: <= 2; the full 32B
transformer must build on a 128 GB machine), plan bytes / ONNX data bytes, and build seconds per
GiB. `--strip-weights` adds weight-stripped builds for the plan size with and without weights.

Needs ~20 GB of disk (the slice and three exports, kept in --cache for the next run), ~13 GB of
RAM at its peak (bf16's build) and about a minute per build; measured on a 2-core, 24 GiB machine
(docs/engines.md). `--model tiny` runs the same steps on the tiny checkpoint (a smoke
run: fixed overheads dominate its ratios). Writes JSON (default bench/results/engine_build.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.export_memory import GiB, TreeSampler, ensure_slice, machine, warm_page_cache

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp16", "bf16", "fp8", "nvfp4")
QUANTIZED = ("fp8", "nvfp4")
FAST_CALIBRATION = ["--calib-prompts", "1", "--calib-steps", "2"]  # scales do not change build cost


def _run(command: list[str], log) -> tuple[dict, str]:
    """Run `command` from the repo, sampling its process tree; (peaks and seconds, output tail)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=output)
        sampler = TreeSampler(process.pid)
        sampler.start()
        returncode = process.wait()
        seconds = time.perf_counter() - started
        sampler.stop()
        output.seek(0)
        tail = "\n".join(output.read().decode(errors="replace").strip().splitlines()[-6:])
    measured = {
        "returncode": returncode,
        "seconds": round(seconds, 2),
        "peak_rss_anon_bytes": sampler.peak_anon,
        "peak_rss_bytes": sampler.peak_rss,
    }
    if returncode:
        log(tail)
    return measured, tail


def export_transformer(model: str, out: Path, precision: str, shapes, log) -> None:
    if (out / "manifest.json").is_file():
        return
    command = [sys.executable, "-m", "export", "--model", model, "--out", str(out), "--precision", precision,
               "--components", "transformer", "--skip-check", "--height", str(shapes[0]), "--width", str(shapes[1]),
               "--max-sequence-length", str(shapes[2])]  # fmt: skip
    command += FAST_CALIBRATION if precision in QUANTIZED else []
    measured, tail = _run(command, log)
    if measured["returncode"]:
        raise SystemExit(f"error: export of {model} at {precision} failed (exit {measured['returncode']})")


def build(artifacts: Path, precision: str, strip: bool, log) -> dict:
    data = artifacts / "transformer.onnx.data"
    warm_page_cache(artifacts)  # the same (warm) page cache for every build
    command = [sys.executable, "-m", "engines.build", "--artifacts", str(artifacts), "--target", "rtx", "--force"]
    command += ["--strip-weights"] if strip else []
    measured, tail = _run(command, log)
    plan = artifacts / "engines" / "rtx" / "transformer.plan"
    onnx_bytes = data.stat().st_size if data.is_file() else 0
    row = {
        "precision": precision,
        "strip_weights": strip,
        "onnx_data_bytes": onnx_bytes,
        **measured,
        "plan_bytes": plan.stat().st_size if plan.is_file() and not measured["returncode"] else None,
    }
    if measured["returncode"]:
        row["error"] = tail.splitlines()[-1] if tail else "failed"
    elif onnx_bytes:
        row.update(
            peak_anon_over_onnx=round(measured["peak_rss_anon_bytes"] / onnx_bytes, 2),
            peak_rss_over_onnx=round(measured["peak_rss_bytes"] / onnx_bytes, 2),
            plan_over_onnx=round(row["plan_bytes"] / onnx_bytes, 3),
            seconds_per_gib=round(measured["seconds"] / (onnx_bytes / GiB), 1),
        )
    return row


def table(rows: list[dict]) -> str:
    lines = [
        f"{'precision':<10}{'stripped':<9}{'ONNX GiB':>9}{'plan GiB':>9}{'plan/ONNX':>10}{'s':>8}{'anon/ONNX':>10}{'RSS/ONNX':>9}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['precision']:<10}{str(r['strip_weights']):<9}  failed: {r['error']}")
            continue
        lines.append(
            f"{r['precision']:<10}{str(r['strip_weights']):<9}{r['onnx_data_bytes'] / GiB:>9.2f}"
            f"{r['plan_bytes'] / GiB:>9.3f}{r['plan_over_onnx']:>10.3f}{r['seconds']:>8.1f}"
            f"{r['peak_anon_over_onnx']:>10.2f}{r['peak_rss_over_onnx']:>9.2f}"
        )
    return "\n".join(lines)


def merged(results: Path, model: str, shapes, rows: list[dict]) -> dict:
    """The results file with `rows` in place of the builds they repeat (same precision, stripped or not).

    A run of one precision (`--precisions nvfp4`) keeps the other precisions' rows of the same model
    and shapes, so the file stays the whole table without rebuilding what did not change. Each row
    carries the machine it was measured on.
    """
    machine_now = machine()
    rows = [{**row, "machine": machine_now} for row in rows]
    previous = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
    kept = []
    if previous.get("model") == model and list(previous.get("shapes", ())) == list(shapes):
        fresh = {(row["precision"], row["strip_weights"]) for row in rows}
        for row in previous.get("builds", []):
            if (row["precision"], row["strip_weights"]) not in fresh:
                kept.append({"machine": previous.get("machine"), **row})
    order = {name: i for i, name in enumerate(PRECISIONS)}
    builds = sorted(kept + rows, key=lambda row: (order.get(row["precision"], len(order)), row["strip_weights"]))
    return {"model": model, "shapes": list(shapes), "builds": builds}


def bench_engines(*, model: str, cache: Path, results: Path, shapes, strip: bool, precisions=PRECISIONS) -> int:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cache.mkdir(parents=True, exist_ok=True)
    source = str(ensure_slice(cache, 1, 1, log)) if model == "slice" else model
    rows = []
    for precision in precisions:
        artifacts = cache / "engine-bench" / f"{Path(source).name}-{precision}"
        export_transformer(source, artifacts, precision, shapes, log)
        rows.append(build(artifacts, precision, False, log))
        if strip:
            rows.append(build(artifacts, precision, True, log))
    print(table(rows))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(merged(results, model, shapes, rows), indent=2) + "\n", encoding="utf-8")
    print(f"results in {results}")
    return 0


def main(argv=None) -> int:
    from common.cli import OneLineParser

    default_cache = Path(os.environ.get("FLUX2_TRT_CACHE") or Path.home() / ".cache" / "flux2-trt") / "bench"
    parser = OneLineParser(prog="python -m bench.engine_build", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="slice", help="slice (the full-width 1+1 slice, default) or tiny")
    parser.add_argument("--cache", type=Path, default=default_cache, help="where slices and exports are kept")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "engine_build.json")
    parser.add_argument("--size", default="1024,1024,512", help="height,width,tokens of the exported graph")
    parser.add_argument("--strip-weights", action="store_true", help="also build weight-stripped plans")
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="comma-separated, of " + ",".join(PRECISIONS)
    )
    args = parser.parse_args(argv)
    precisions = tuple(args.precisions.split(","))
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"--precisions {','.join(unknown)}: not benchmarked here; choose from {','.join(PRECISIONS)}")
    shapes = tuple(int(v) for v in args.size.split(","))
    return bench_engines(
        model=args.model,
        cache=args.cache,
        results=args.results,
        shapes=shapes,
        strip=args.strip_weights,
        precisions=precisions,
    )


if __name__ == "__main__":
    from common.cli import run_cli

    raise SystemExit(run_cli(main))
