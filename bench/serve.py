"""make bench-serve: the Triton server against runtime.generate in one process, on the same images.

1. The runtime runtime.generate drives draws N images (seed i) in this process: the single-process rate.
2. tritonserver (one model instance, ort backend, as `make serve`) draws the same N requests, first
   one at a time (concurrency 1: latency, the server's overhead per image), then from C concurrent
   clients (throughput). Every server image must equal runtime.generate's pixel for pixel.
3. runtime.generate runs again after the server has stopped; the baseline is the mean of both runs,
   so load from other users of the machine lands on both sides.

Ratios only (same machine, same run): overhead = server latency at concurrency 1 / in-process
image time - 1; throughput ratio = server images/s at concurrency C / in-process images/s.
Results: bench/results/serve.json and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PROMPT = "A photograph of a red fox sitting in fresh snow at dawn"


def in_process(artifacts: Path, count: int, steps: int) -> tuple[float, list[np.ndarray]]:
    """Seconds per image of the runtime runtime.generate drives (built once, `count` images), and the images.

    The same work the server does per request (no PNG encoding: the client gets the array).
    """
    from runtime.artifacts import open_artifacts
    from runtime.backends.select import select_backend
    from runtime.pipeline import Flux2Runtime, to_uint8

    opened = open_artifacts(artifacts)
    backend = select_backend("ort", opened.folder, opened.specs, opened.manifest, log=lambda m: None)
    runtime = Flux2Runtime(opened, backend)
    next(runtime.generate("warm-up", seed=0, steps=1, guidance=1.0, progress=False))
    images = []
    started = time.perf_counter()
    for seed in range(count):
        _, image, _ = next(runtime.generate(PROMPT, seed=seed, steps=steps, guidance=4.0, progress=False))
        images.append(to_uint8(image))
    seconds = (time.perf_counter() - started) / count
    backend.close()
    return seconds, images


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def through_server(url: str, count: int, steps: int, concurrency: int) -> tuple[float, list, list[float], int]:
    """(wall seconds, images by seed, latencies, failed requests) for `count` requests from `concurrency` clients."""
    from deploy.client import ServerError, infer

    def one(seed: int):
        started = time.perf_counter()
        try:
            images, _ = infer(url, "flux2", prompt=PROMPT, seed=seed, steps=steps, guidance=4.0, num_images=1,
                              negative_prompt="")  # fmt: skip
        except ServerError as exc:
            print(f"failed: {exc}", file=sys.stderr)
            return None, time.perf_counter() - started
        return images[0], time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    return wall, [a[0] for a in answers], [a[1] for a in answers], sum(a[0] is None for a in answers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "tiny-fp32")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--triton-env", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    if not (args.artifacts / "manifest.json").is_file():
        from export.run import export_artifacts

        export_artifacts(model="tiny", out=args.artifacts, precision="fp32")

    from deploy.local_server import LocalServer
    from deploy.triton import write_repository
    from runtime.artifacts import open_artifacts

    shapes = open_artifacts(args.artifacts).shapes
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        scratch = Path(scratch)
        before, expected = in_process(args.artifacts, args.requests, args.steps)
        repository = write_repository(
            artifacts=args.artifacts, repository=scratch / "repository", backend="ort", max_queue=args.requests
        ).parent
        server = LocalServer(repository, triton_env=args.triton_env)
        with server:
            sequential = through_server(server.url, args.requests, args.steps, 1)
            concurrent = through_server(server.url, args.requests, args.steps, args.concurrency)
        exit_code = server.returncode
        after, _ = in_process(args.artifacts, args.requests, args.steps)
    baseline = (before + after) / 2
    mismatched = sum(
        image is None or not np.array_equal(image, want)
        for run in (sequential, concurrent)
        for image, want in zip(run[1], expected)
    )
    latency_1 = statistics.median(sequential[2])
    result = {
        "artifacts": str(args.artifacts),
        "shape": f"{shapes.height}x{shapes.width}, {shapes.max_sequence_length} tokens",
        "steps": args.steps,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "in_process_s_per_image": {"before": before, "after": after, "mean": baseline},
        "server_c1": {
            "p50_s": latency_1,
            "p99_s": percentile(sequential[2], 99),
            "images_per_s": args.requests / sequential[0],
        },
        f"server_c{args.concurrency}": {
            "p50_s": statistics.median(concurrent[2]),
            "p99_s": percentile(concurrent[2], 99),
            "images_per_s": args.requests / concurrent[0],
        },
        "overhead_c1": latency_1 / baseline - 1,
        "throughput_ratio": (args.requests / concurrent[0]) * baseline,
        "failed_requests": sequential[3] + concurrent[3],
        "images_differing_from_runtime_generate": mismatched,
        "server_exit_code": exit_code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    c = args.concurrency
    print(f"{result['shape']}, {args.steps} steps, {args.requests} requests, ort-cpu")
    print(f"in process (runtime.generate): {baseline:.3f} s/image ({before:.3f} before, {after:.3f} after)")
    print(
        f"server c=1: p50 {latency_1:.3f} s, p99 {result['server_c1']['p99_s']:.3f} s -> overhead {result['overhead_c1']:+.1%}"
    )
    print(
        f"server c={c}: p50 {result[f'server_c{c}']['p50_s']:.3f} s, p99 {result[f'server_c{c}']['p99_s']:.3f} s, "
        f"{result[f'server_c{c}']['images_per_s']:.3f} images/s -> {result['throughput_ratio']:.3f} x in-process rate"
    )
    print(f"failed requests {result['failed_requests']}, images differing {mismatched}, server exit {exit_code}")
    return 0 if result["failed_requests"] == 0 and mismatched == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
