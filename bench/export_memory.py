"""make bench-export: host memory and time of exporting full-width FLUX.2 [dev] transformer slices.

Synthesizes transformer slices with FLUX.2 [dev]'s real widths (48 heads x 128, joint_attention_dim
15360, in_channels 128, mlp ratio 3, 4-axis RoPE (32, 32, 32, 32), guidance embedding) and 1+1 and
2+2 double+single blocks, as random bf16 safetensors in the diffusers layout (sharded, with the
index), written tensor by tensor so the generator stays small; the small rest of a checkpoint
(text encoder with FLUX.2's 3 x 5120 embedding width, VAE, tokenizer, scheduler) comes from the
tiny generator. Slices are cached and reused.

Then, each in its own process, `python -m export --components transformer --skip-check` exports
every slice at bf16 and fp16 by the streaming path (the default), and the 1+1 slice by the plain
path too (`--no-stream`: `from_pretrained` + `torch.onnx.export`), while this process samples the
export's process tree from /proc every 50 ms: peak anonymous memory (RssAnon: what the export
itself holds) and peak RSS (which also counts memory-mapped safetensors pages). Each run starts
with the slice's files in the page cache. Last, the 1+1 slice is exported with the numerics
check on a short sequence (the full one is too slow for PyTorch fp32 on a 2-core CPU).

Prints a table, writes JSON (default bench/results/export_memory.json) and exits 1 when the
streaming path misses its memory bounds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

from common.atomic import atomic_dir

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
MiB = 2**20

# Bump when the synthesized slices change for the same arguments.
GENERATOR_VERSION = 1
SHARD_BYTES = 2 * GiB
SLICES = ((1, 1), (2, 2))
PRECISIONS = ("bf16", "fp16")
SAMPLE_SECONDS = 0.05

# FLUX.2 [dev]'s transformer config (diffusers' Flux2Transformer2DModel defaults are [dev]'s);
# only the block counts differ.
DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": True,
}


def _companion_config():
    """The tiny rest of the checkpoint, at the widths the transformer's inputs need."""
    from flux2_tiny.config import TinyConfig

    # hidden 5120 x 3 stacked layers = joint_attention_dim 15360; 32 latent channels x 2x2 = 128.
    return TinyConfig(
        text_hidden_size=5120,
        text_intermediate_size=64,
        text_num_layers=1,
        text_num_heads=4,
        text_num_kv_heads=1,
        text_out_layers=(1, 1, 1),
        latent_channels=32,
    )


# --- synthesizing slices ---------------------------------------------------------------


def _random_chunks(name: str, shape: tuple[int, ...], chunk_elements: int = 16 * 2**20):
    """Seeded bf16 values for one tensor, in row blocks: linear weights ~ N(0, 1/fan_in), norm scales ~ 1."""
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if len(shape) == 1:
        yield (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
        return
    row = math.prod(shape[1:])
    std = 1.0 / math.sqrt(row)
    step = max(1, chunk_elements // row)
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        yield (torch.randn((rows, *shape[1:]), generator=generator) * std).to(torch.bfloat16)


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]]) -> None:
    """A bf16 safetensors file whose tensors are generated and written one block at a time."""
    import torch

    header, offset = {}, 0
    for name, shape in entries:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name, shape in entries:
            for chunk in _random_chunks(name, shape):
                handle.write(chunk.reshape(-1).view(torch.uint8).numpy().data)


def write_transformer(folder: Path, double: int, single: int) -> int:
    """Config, sharded weights and index of a [dev]-width transformer slice; returns the weight bytes."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():
        model = Flux2Transformer2DModel(**DEV_TRANSFORMER, num_layers=double, num_single_layers=single)
    folder.mkdir(parents=True)
    model.save_config(folder)
    shards, current, current_bytes = [], [], 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * 2
        if current and current_bytes + size > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, tuple(tensor.shape)))
        current_bytes += size
    shards.append(current)
    weight_map, total = {}, 0
    for number, entries in enumerate(shards, 1):
        file = f"diffusion_pytorch_model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, entries)
        weight_map.update(dict.fromkeys((name for name, _ in entries), file))
        total += sum(math.prod(shape) * 2 for _, shape in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(index, indent=2) + "\n", encoding="utf-8"
    )
    return total


def ensure_companions(cache: Path) -> Path:
    from flux2_tiny.dev import write_tiny_checkpoint

    config = _companion_config()
    target = cache / f"companions-{config.key()}"
    if (target / "model_index.json").is_file():
        return target
    with atomic_dir(target) as staging:
        write_tiny_checkpoint(staging, config)
        shutil.rmtree(staging / "transformer")  # replaced by each slice's own
    return target


def ensure_slice(cache: Path, double: int, single: int, log) -> Path:
    target = cache / f"flux2-dev-slice-{double}+{single}-v{GENERATOR_VERSION}"
    if (target / "model_index.json").is_file():
        log(f"reusing {target}")
        return target
    companions = ensure_companions(cache)
    with atomic_dir(target) as staging:
        started = time.perf_counter()
        for path in companions.rglob("*"):
            if path.is_file():
                (staging / path.relative_to(companions)).parent.mkdir(parents=True, exist_ok=True)
                os.link(path, staging / path.relative_to(companions))
        total = write_transformer(staging / "transformer", double, single)
    log(f"wrote {target}: {total / GiB:.2f} GiB of bf16 in {time.perf_counter() - started:.0f} s")
    return target


def transformer_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in (checkpoint / "transformer").glob("*.safetensors"))


# --- measuring -------------------------------------------------------------------------


def _status_kib(pid: int) -> tuple[int, int]:
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        pass  # the process ended between listing and reading
    return anon, rss


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


class TreeSampler(threading.Thread):
    """Peak of the summed RssAnon and RSS over a process and its descendants."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_anon = self.peak_rss = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            totals = [_status_kib(pid) for pid in _tree(self.pid)]
            self.peak_anon = max(self.peak_anon, sum(a for a, _ in totals) * 1024)
            self.peak_rss = max(self.peak_rss, sum(r for _, r in totals) * 1024)
            self.samples += 1
            self._stop_event.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def warm_page_cache(folder: Path) -> None:
    """Read the weights once so that every run starts from the same (warm) page cache."""
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            while handle.read(64 * MiB):
                pass


def run_export(
    checkpoint: Path, slice_name: str, out: Path, precision: str, *, stream: bool, check: bool, shapes, log
) -> dict:
    command = [
        sys.executable,
        "-m",
        "export",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--precision",
        precision,
        "--components",
        "transformer",
        "--height",
        str(shapes[0]),
        "--width",
        str(shapes[1]),
        "--max-sequence-length",
        str(shapes[2]),
    ]
    command += [] if check else ["--skip-check"]
    command += [] if stream else ["--no-stream"]
    warm_page_cache(checkpoint / "transformer")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stderr, stderr=stderr)
        sampler = TreeSampler(process.pid)
        sampler.start()
        returncode = process.wait()
        seconds = time.perf_counter() - started
        sampler.stop()
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip().splitlines()[-5:]
    if returncode:
        log("\n".join(tail))
        raise SystemExit(f"error: export of {checkpoint} at {precision} failed (exit {returncode})")
    data = out / "transformer.onnx.data"
    return {
        "slice": slice_name,
        "path": "streaming" if stream else "plain",
        "precision": precision,
        "weight_bytes": transformer_bytes(checkpoint),
        "onnx_data_bytes": data.stat().st_size,
        "peak_rss_anon_bytes": sampler.peak_anon,
        "peak_rss_bytes": sampler.peak_rss,
        "seconds": round(seconds, 2),
        "mb_per_s": round(data.stat().st_size / MiB / seconds, 1),
        "samples": sampler.samples,
    }


def _find(runs, slice_name, path, precision):
    return next(r for r in runs if (r["slice"], r["path"], r["precision"]) == (slice_name, path, precision))


def summarize(runs: list[dict]) -> dict:
    small, large = (f"{d}+{s}" for d, s in SLICES)
    ratios = {
        f"plain_over_streaming_peak_rss_anon_{p}": round(
            _find(runs, small, "plain", p)["peak_rss_anon_bytes"]
            / _find(runs, small, "streaming", p)["peak_rss_anon_bytes"],
            2,
        )
        for p in PRECISIONS
    }
    ratios.update(
        {
            f"plain_over_streaming_seconds_{p}": round(
                _find(runs, small, "plain", p)["seconds"] / _find(runs, small, "streaming", p)["seconds"], 2
            )
            for p in PRECISIONS
        }
    )
    acceptance = {}
    for p in PRECISIONS:
        big, little = _find(runs, large, "streaming", p), _find(runs, small, "streaming", p)
        bound = 1.5 * GiB + 0.1 * big["weight_bytes"]
        growth = big["peak_rss_anon_bytes"] - little["peak_rss_anon_bytes"]
        added = big["weight_bytes"] - little["weight_bytes"]
        acceptance[p] = {
            "peak_rss_anon_bytes": big["peak_rss_anon_bytes"],
            "bound_bytes": int(bound),
            "within_bound": big["peak_rss_anon_bytes"] <= bound,
            "growth_bytes": growth,
            "growth_fraction_of_added_weights": round(growth / added, 4),
            "growth_below_5_percent": growth < 0.05 * added,
        }
    return {"ratios": ratios, "acceptance": acceptance}


def table(runs: list[dict]) -> str:
    header = (
        f"{'slice':<6}{'path':<11}{'prec':<6}{'weights GiB':>12}{'peak anon GiB':>15}{'peak RSS GiB':>14}"
        f"{'seconds':>9}{'MB/s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in runs:
        lines.append(
            f"{r['slice']:<6}{r['path']:<11}{r['precision']:<6}{r['weight_bytes'] / GiB:>12.2f}"
            f"{r['peak_rss_anon_bytes'] / GiB:>15.2f}{r['peak_rss_bytes'] / GiB:>14.2f}{r['seconds']:>9.1f}"
            f"{r['mb_per_s']:>8.0f}"
        )
    return "\n".join(lines)


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text(encoding="utf-8").split()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    from export.run import library_versions

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def bench_export(
    *, cache: Path, work: Path, results: Path, shapes: tuple[int, int, int], verify_shapes, verify: bool
) -> int:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cache.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = {f"{d}+{s}": ensure_slice(cache, d, s, log) for d, s in SLICES}
    small = f"{SLICES[0][0]}+{SLICES[0][1]}"
    plan = [(name, True, p) for name in checkpoints for p in PRECISIONS] + [(small, False, p) for p in PRECISIONS]
    runs = []
    for name, stream, precision in plan:
        out = Path(tempfile.mkdtemp(prefix="export-", dir=work)) / "artifacts"
        try:
            log(f"exporting {name} {'streaming' if stream else 'plain'} {precision} ...")
            runs.append(
                run_export(checkpoints[name], name, out, precision, stream=stream, check=False, shapes=shapes, log=log)
            )
            log(table(runs[-1:]).splitlines()[-1])
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
    summary = summarize(runs)
    report = {
        "machine": machine(),
        "shapes": {"height": shapes[0], "width": shapes[1], "max_sequence_length": shapes[2]},
        "sample_seconds": SAMPLE_SECONDS,
        "runs": runs,
        **summary,
    }
    if verify:
        out = Path(tempfile.mkdtemp(prefix="verify-", dir=work)) / "artifacts"
        try:
            log(f"verifying {small} fp16 against PyTorch fp32 at {verify_shapes} ...")
            run = run_export(
                checkpoints[small], small, out, "fp16", stream=True, check=True, shapes=verify_shapes, log=log
            )
            check = json.loads((out / "reports" / "export_check.json").read_text(encoding="utf-8"))["components"][
                "transformer"
            ]
            report["verify"] = {
                "slice": small,
                "precision": "fp16",
                "shapes": dict(zip(("height", "width", "max_sequence_length"), verify_shapes)),
                "method": check["method"],
                "passed": check["passed"],
                "outputs": check["outputs"],
                "tolerance": check["tolerance"],
                "peak_rss_anon_bytes": run["peak_rss_anon_bytes"],
                "seconds": run["seconds"],
            }
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(table(runs))
    print(
        f"shapes {shapes[0]}x{shapes[1]}, {shapes[2]} tokens; {report['machine']['cpus']} CPUs, "
        f"{report['machine']['memory_gib']} GiB"
    )
    for name, value in summary["ratios"].items():
        print(f"{name}: {value}")
    failed = False
    for precision, verdict in summary["acceptance"].items():
        ok = verdict["within_bound"] and verdict["growth_below_5_percent"]
        failed |= not ok
        print(
            f"acceptance {precision}: 2+2 peak anon {verdict['peak_rss_anon_bytes'] / GiB:.2f} GiB "
            f"(bound {verdict['bound_bytes'] / GiB:.2f}), growth 1+1 -> 2+2 "
            f"{verdict['growth_bytes'] / MiB:.0f} MiB = {100 * verdict['growth_fraction_of_added_weights']:.1f}% "
            f"of added weights (< 5%): {'pass' if ok else 'FAIL'}"
        )
    if "verify" in report:
        v = report["verify"]
        (metrics,) = v["outputs"].values()
        print(
            f"verify {v['slice']} {v['precision']} at {verify_shapes[0]}x{verify_shapes[1]}, {verify_shapes[2]} tokens "
            f"({v['method']}): rel_l2 {metrics['rel_l2']:.3g}, cosine {metrics['cosine']:.6f}, "
            f"max_abs {metrics['max_abs']:.3g}: {'pass' if v['passed'] else 'FAIL'}"
        )
        failed |= not v["passed"]
    print(f"results: {results}")
    return 1 if failed else 0


def main(argv=None) -> int:
    from common.cli import OneLineParser

    default_cache = Path(os.environ.get("FLUX2_TRT_CACHE") or Path.home() / ".cache" / "flux2-trt") / "bench"
    parser = OneLineParser(prog="python -m bench.export_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache, help="where slices are generated and reused")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for exports (default: CACHE/work)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "export_memory.json")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--verify-size", default="256,256,64", help="height,width,tokens of the numerics check")
    parser.add_argument("--no-verify", action="store_true", help="skip the numerics check of the 1+1 slice")
    args = parser.parse_args(argv)
    verify_shapes = tuple(int(v) for v in args.verify_size.split(","))
    return bench_export(
        cache=args.cache,
        work=args.work or args.cache / "work",
        results=args.results,
        shapes=(args.height, args.width, args.max_sequence_length),
        verify_shapes=verify_shapes,
        verify=not args.no_verify,
    )


if __name__ == "__main__":
    from common.cli import run_cli

    raise SystemExit(run_cli(main))
