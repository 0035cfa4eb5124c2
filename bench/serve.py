"""make bench-serve: the Triton server against runtime.generate's runtime in one process, on the same images.

The in-process side is the runtime runtime.generate drives (Flux2Runtime, ort backend, built once),
doing the work the server does per request (no PNG encoding: the client gets the array). The
server has one model instance (ort backend, as `make serve`). Every server image must equal the
in-process image of the same seed pixel for pixel.

This machine is shared, so the two sides are measured interleaved and load lands on both:
- concurrency 1, paired: for each seed, one image in process, then the same request to the server;
  overhead = median over seeds of (server latency / in-process time) - 1;
- concurrency C: N in-process images, N requests from C concurrent clients, N in-process images;
  throughput ratio = server images/s / in-process images/s (the mean of the runs around it);
- queueing, for 1, 4 and 8 clients: the same N requests sent one after another, then from C
  concurrent clients released together, three rounds alternating; concurrent / sequential wall time
  (median of the rounds) says whether the queue leaves the one instance idle (goal <= 1.2 at 8).
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


class InProcess:
    def __init__(self, artifacts: Path):
        from runtime.artifacts import open_artifacts
        from runtime.backends.select import select_backend
        from runtime.pipeline import Flux2Runtime, Sampling

        opened = open_artifacts(artifacts)
        self.backend = select_backend("ort", opened.folder, opened.manifest, log=lambda m: None)
        self.runtime = Flux2Runtime(opened, self.backend)
        next(self.runtime.generate(Sampling("warm-up", seed=0, steps=1, guidance=1.0), progress=False))

    def image(self, seed: int, steps: int) -> tuple[np.ndarray, float]:
        from runtime.pipeline import Sampling, to_uint8

        started = time.perf_counter()
        _, image, _ = next(
            self.runtime.generate(Sampling(PROMPT, seed=seed, steps=steps, guidance=4.0), progress=False)
        )
        image = to_uint8(image)
        return image, time.perf_counter() - started


def ask(url: str, seed: int, steps: int) -> tuple[np.ndarray | None, float]:
    from deploy.client import ServerError, infer
    from deploy.request import GenerationRequest

    started = time.perf_counter()
    try:
        images, _ = infer(url, "flux2", GenerationRequest(PROMPT, seed=seed, steps=steps, guidance=4.0))
    except ServerError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return None, time.perf_counter() - started
    return images[0], time.perf_counter() - started


def queueing(url: str, clients: int, n: int, steps: int, rounds: int = 3) -> dict:
    """Wall time of n requests from `clients` concurrent clients against the same n sent one by one."""
    import threading

    sequential, concurrent = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        failed = sum(ask(url, seed, steps)[0] is None for seed in range(n))
        sequential.append(time.perf_counter() - started)
        gate = threading.Barrier(min(clients, n))

        def burst(seed, gate=gate):
            if seed < clients:
                gate.wait()  # the first `clients` requests leave together
            return ask(url, seed, steps)[0] is None

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            failed += sum(pool.map(burst, range(n)))
        concurrent.append(time.perf_counter() - started)
    ratios = [c / s for s, c in zip(sequential, concurrent)]
    return {
        "clients": clients,
        "requests": n,
        "sequential_images_per_s": n / statistics.median(sequential),
        "concurrent_images_per_s": n / statistics.median(concurrent),
        "concurrent_over_sequential_time": statistics.median(ratios),
        "rounds": [[round(s, 3), round(c, 3)] for s, c in zip(sequential, concurrent)],
        "failed": failed,
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "tiny-fp32")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--triton-env", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    if not (args.artifacts / "manifest.json").is_file():
        from export.run import export_artifacts

        export_artifacts(model="tiny", out=args.artifacts, precision="fp32")

    from deploy.local_server import LocalServer
    from deploy.triton import ModelSettings, write_repository

    n, c, steps = args.requests, args.concurrency, args.steps
    local = InProcess(args.artifacts)
    shapes = local.runtime.artifacts.shapes
    failed = differing = 0
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        settings = ModelSettings(backend="ort", max_queue=n)
        repository = write_repository(
            artifacts=args.artifacts, repository=Path(scratch) / "repository", settings=settings
        ).parent
        server = LocalServer(repository, triton_env=args.triton_env)
        with server:
            ask(server.url, 0, 1)  # the first request's connection and buffers
            pairs = []
            for seed in range(n):
                want, local_s = local.image(seed, steps)
                got, server_s = ask(server.url, seed, steps)
                failed += got is None
                differing += got is not None and not np.array_equal(got, want)
                pairs.append((local_s, server_s))
            before = [local.image(seed, steps) for seed in range(n)]
            started = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                answers = list(pool.map(lambda seed: ask(server.url, seed, steps), range(n)))
            concurrent_s = time.perf_counter() - started
            after = [local.image(seed, steps) for seed in range(n)]
            queues = [queueing(server.url, clients, 8, steps) for clients in (1, 4, 8)]
        exit_code = server.returncode
    for (got, _), (want, _) in zip(answers, before):
        failed += got is None
        differing += got is not None and not np.array_equal(got, want)
    local.backend.close()

    local_rate = 2 * n / (sum(s for _, s in before) + sum(s for _, s in after))
    server_rate = n / concurrent_s
    c1_latency = [s for _, s in pairs]
    result = {
        "artifacts": str(args.artifacts),
        "shape": f"{shapes.height}x{shapes.width}, {shapes.max_sequence_length} tokens",
        "steps": steps,
        "requests": n,
        "concurrency": c,
        "c1_paired": {
            "in_process_median_s": statistics.median(s for s, _ in pairs),
            "server_p50_s": statistics.median(c1_latency),
            "server_p99_s": percentile(c1_latency, 99),
            "overhead": statistics.median(server / local_s for local_s, server in pairs) - 1,
        },
        f"c{c}": {
            "in_process_images_per_s": local_rate,
            "in_process_before_after_s": [sum(s for _, s in before) / n, sum(s for _, s in after) / n],
            "server_images_per_s": server_rate,
            "server_p50_s": statistics.median(s for _, s in answers),
            "server_p99_s": percentile([s for _, s in answers], 99),
            "throughput_ratio": server_rate / local_rate,
        },
        "queueing": queues,
        "failed_requests": failed + sum(q["failed"] for q in queues),
        "images_differing_from_in_process": differing,
        "server_exit_code": exit_code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    one, many = result["c1_paired"], result[f"c{c}"]
    print(f"{result['shape']}, {steps} steps, {n} requests, ort-cpu, one model instance")
    print(
        f"c=1 paired: in process {one['in_process_median_s']:.3f} s, server p50 {one['server_p50_s']:.3f} s "
        f"p99 {one['server_p99_s']:.3f} s -> overhead {one['overhead']:+.1%}"
    )
    print(
        f"c={c}: in process {local_rate:.3f} images/s, server {server_rate:.3f} images/s "
        f"(p50 {many['server_p50_s']:.2f} s, p99 {many['server_p99_s']:.2f} s) -> {many['throughput_ratio']:.3f} x"
    )
    print("clients | sequential images/s | concurrent images/s | concurrent / sequential time (goal <= 1.2 at 8)")
    for q in queues:
        print(
            f"{q['clients']:7d} | {q['sequential_images_per_s']:19.3f} | {q['concurrent_images_per_s']:19.3f} | "
            f"{q['concurrent_over_sequential_time']:.2f} x (rounds {q['rounds']})"
        )
    failed = result["failed_requests"]
    print(f"failed requests {failed}, images differing {differing}, server exit {exit_code}")
    return 0 if failed == 0 and differing == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
