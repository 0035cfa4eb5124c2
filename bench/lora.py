"""make bench-lora: what LoRA slots cost the transformer, measured here and by arithmetic for FLUX.2 [dev].

Measured (one process, ONNX Runtime CPU, ratios): a wider-than-tiny checkpoint's transformer
exported at fp32 without slots and with slots of rank 16 and 64, the three sessions timed in
alternation on the same inputs (slots fed random factors, as a LoRA would fill them), median of
`--repeats` calls each. Wider than the tiny default, because rank 64 against the tiny model's
32-wide layers would say nothing; still far narrower than [dev]'s 6144, so these ratios are an
upper bound on [dev]'s.

By arithmetic (no GPU here): for the real FLUX.2 [dev] transformer config at 1024 x 1024 and 512
text tokens, the extra multiply-adds of rank-R branches on every block linear (2 R (K + N) FLOPs
per token of the stream that linear sees) against the transformer's own matrix products (its
linears and attention), and the bytes of the slot inputs (float32 A and B per linear), turned into
H100 SXM time by its datasheet (989 TFLOPS dense bf16, 3.35 TB/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RANKS = (0, 16, 64)
# Wider than the tiny default (inner 1024 = 16 heads x 64, MLP 3072), one double and two single blocks.
WIDE = {"num_attention_heads": 16, "attention_head_dim": 64, "axes_dims_rope": (16, 16, 16, 16),
        "num_layers": 1, "num_single_layers": 2, "seed": 23}  # fmt: skip
H100_BF16_FLOPS, H100_BYTES_PER_S = 989e12, 3.35e12


def dev_arithmetic(rank: int, height: int = 1024, width: int = 1024, text_tokens: int = 512) -> dict:
    """Extra FLOPs and input bytes of rank-`rank` slots on FLUX.2 [dev] against its own matrix products, per call."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from bench.export_memory import DEV_TRANSFORMER
    from export.graphs.lora_slots import slot_targets

    with init_empty_weights():
        model = Flux2Transformer2DModel(**DEV_TRANSFORMER, num_layers=8, num_single_layers=48)
    image_tokens = (height // 16) * (width // 16)
    joint = image_tokens + text_tokens
    text_stream = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.")

    def tokens(name: str) -> int:
        if name.startswith("single_transformer_blocks."):
            return joint
        return text_tokens if any(part in name for part in text_stream) else image_tokens

    base = lora = 0.0
    slot_bytes = 0
    for name, in_features, out_features in slot_targets(model):
        base += 2 * in_features * out_features * tokens(name)
        lora += 2 * rank * (in_features + out_features) * tokens(name)
        slot_bytes += 4 * rank * (in_features + out_features)
    inner = model.inner_dim
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    attention = blocks * 2 * 2 * joint * joint * inner  # Q K^T and P V over the joint sequence
    del torch
    return {
        "rank": rank,
        "targets": len(slot_targets(model)),
        "block_linear_flops": base,
        "attention_flops": attention,
        "lora_flops": lora,
        "lora_vs_matmuls": lora / (base + attention),
        "slot_input_bytes": slot_bytes,
        "h100_lora_ms": 1e3 * lora / H100_BF16_FLOPS,
        "h100_step_ms": 1e3 * (base + attention) / H100_BF16_FLOPS,
        "h100_slot_read_ms": 1e3 * slot_bytes / H100_BYTES_PER_S,
    }


def _export(rank: int, work: Path, shapes) -> Path:
    from export.run import export_artifacts
    from flux2_tiny import ensure_tiny_checkpoint
    from flux2_tiny.config import DEFAULT

    checkpoint = ensure_tiny_checkpoint(dataclasses.replace(DEFAULT, **WIDE))
    out = work / f"rank{rank}"
    export_artifacts(
        model=str(checkpoint),
        out=out,
        precision="fp32",
        components=("transformer",),
        shapes=dataclasses.replace(shapes, lora_rank=rank),
        skip_check=True,
        log=lambda m: None,
    )
    return out


def measure(work: Path, shapes, repeats: int) -> dict:
    """Median seconds per transformer call for each rank, the sessions timed in alternation."""
    import numpy as np

    from common.cpu_twin import ort_session
    from common.manifest import read_manifest
    from common.specs import component_specs

    sessions, feeds = {}, {}
    rng = np.random.default_rng(0)
    for rank in RANKS:
        folder = _export(rank, work, shapes)
        manifest = read_manifest(folder)
        spec = component_specs(manifest.geometry, manifest.shapes)["transformer"]
        feeds[rank] = {t.name: (0.05 * rng.standard_normal(t.shape)).astype(np.float32) for t in spec.inputs}
        sessions[rank] = ort_session(folder / "transformer.onnx")
        sessions[rank].run(None, feeds[rank])  # warm-up
    seconds = {rank: [] for rank in RANKS}
    for _ in range(repeats):
        for rank in RANKS:
            started = time.perf_counter()
            sessions[rank].run(None, feeds[rank])
            seconds[rank].append(time.perf_counter() - started)
    base = statistics.median(seconds[0])
    return {
        f"rank{rank}": {
            "median_s": statistics.median(seconds[rank]),
            "vs_no_slots": statistics.median(seconds[rank]) / base,
        }
        for rank in RANKS
    }


def main(argv=None) -> int:
    from common.specs import Shapes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--max-sequence-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--work", type=Path, default=REPO / "artifacts" / "bench-lora")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lora.json")
    args = parser.parse_args(argv)
    shapes = Shapes(args.height, args.width, args.max_sequence_length)
    measured = measure(args.work, shapes, args.repeats)
    result = {
        "measured": {
            "what": "transformer call, ONNX Runtime CPU, fp32, median of alternated calls",
            "checkpoint": {"tiny overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in WIDE.items()}},
            "shapes": dataclasses.asdict(shapes),
            "repeats": args.repeats,
            **measured,
        },
        "flux2_dev_arithmetic": [dev_arithmetic(rank) for rank in (16, 64)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for rank in RANKS:
        row = measured[f"rank{rank}"]
        print(f"rank {rank:>2}: {row['median_s'] * 1e3:8.1f} ms per call, {row['vs_no_slots']:.3f} x no slots")
    for row in result["flux2_dev_arithmetic"]:
        print(
            f"FLUX.2 [dev] rank {row['rank']}: +{row['lora_vs_matmuls']:.2%} of the step's matrix FLOPs "
            f"({row['h100_lora_ms']:.1f} ms of {row['h100_step_ms']:.0f} ms on an H100 at its datasheet), "
            f"{row['slot_input_bytes'] / 2**20:.0f} MiB of slot inputs ({row['h100_slot_read_ms']:.2f} ms to read)"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
