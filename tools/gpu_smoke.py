"""make gpu-smoke: prove a GPU node with TensorRT end to end on the tiny checkpoint, per component.

Exports the tiny FLUX.2 checkpoint (256 x 256, 128 tokens), checks the graphs, builds the
engines, then runs each component on the same realistic inputs the export check uses
(export.verify.reference.ReferenceInputs) through

  - the TensorRT engine (the runtime's trt backend),
  - the same ONNX graph (ONNX Runtime's CPU provider; onnx's reference evaluator for bf16),
  - the PyTorch module at the same precision on the GPU, and at fp32 on the CPU (the reference),

and prints relative L2 and PSNR of the engine against each. It fails (exit 1) when the engine
misses the export check's bound against fp32 PyTorch (common.precision).

It sits outside the packages because it uses all three (export, engines, runtime), which must
not import one another.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from common.cli import OneLineParser, run_cli  # noqa: E402
from common.errors import ArtifactsError, VerificationError  # noqa: E402
from common.metrics import compare, psnr  # noqa: E402
from common.precision import PRECISION_NAMES as PRECISIONS  # noqa: E402
from common.precision import TOLERANCES  # noqa: E402
from common.specs import Shapes  # noqa: E402

SMOKE_SHAPES = Shapes(height=256, width=256, max_sequence_length=128)


def range_psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    """PSNR in dB with the reference's value range as the peak (latents and velocities have no fixed range)."""
    return psnr(actual, expected, data_range=float(np.ptp(expected)))


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return compare(actual, expected)["rel_l2"]


def smoke(*, precision: str, out: Path) -> bool:
    import torch

    from common.manifest import read_manifest
    from common.specs import component_specs
    from common.tensorrt_env import trt_status
    from engines.build import build_engines
    from engines.check import run_check
    from export.checkpoint import open_checkpoint
    from export.run import export_artifacts
    from export.verify.onnx_run import method_for, run_graph
    from export.verify.reference import ReferenceInputs, build_graph_module
    from runtime.backends.trt import TrtBackend

    available, reason = trt_status()
    if not available:
        raise ArtifactsError(f"gpu-smoke needs TensorRT and a CUDA GPU: {reason}")
    artifacts = out / f"tiny-{precision}"
    export_artifacts(model="tiny", out=artifacts, precision=precision, shapes=SMOKE_SHAPES)
    run_check(folder=artifacts)
    build_engines(artifacts=artifacts, target="tensorrt")

    manifest = read_manifest(artifacts)
    checkpoint = open_checkpoint(manifest.source.checkpoint)
    geometry = checkpoint.geometry()
    specs = component_specs(geometry, SMOKE_SHAPES)
    reference = ReferenceInputs(checkpoint, geometry, SMOKE_SHAPES)
    backend = TrtBackend(artifacts, manifest)
    bound = TOLERANCES[precision].max_rel_l2
    rows, passed = [], True
    for component, entry in manifest.components.items():
        spec = specs[component]
        feeds = reference.feeds(spec)
        output = spec.outputs[0].name
        engine = backend.to_host(backend.run(component, {k: backend.from_host(v) for k, v in feeds.items()})[output])
        weight_bytes = entry.total_bytes
        method = method_for(precision, weight_bytes)
        graph = run_graph(artifacts / entry.file, feeds, method)[output] if method else None
        with torch.no_grad():
            args = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
            module = build_graph_module(component, checkpoint, geometry, SMOKE_SHAPES, precision).cuda()
            same_precision = module(*[a.cuda() for a in args]).float().cpu().numpy()
            del module
            fp32 = build_graph_module(component, checkpoint, geometry, SMOKE_SHAPES, "fp32")(*args).numpy()
        ok = bool(np.isfinite(engine).all()) and rel_l2(engine, fp32) <= bound
        passed &= ok
        rows.append((component, graph, same_precision, fp32, engine, method, ok))
    backend.close()
    print(_table(rows, precision, bound))
    print(_memory_table(backend.memory))
    return passed


def _memory_table(memory: dict) -> str:
    """The resident-memory budget per engine: weights (the plan) and scratch activations (device_memory_size_v2)."""
    lines = ["GPU memory per engine (MiB)", f"{'component':<13}{'weights':>10}{'activations':>13}"]
    for component, record in memory.items():
        lines.append(
            f"{component:<13}{record['plan_bytes'] / 2**20:>10.1f}{record['device_memory_bytes'] / 2**20:>13.1f}"
        )
    return "\n".join(lines)


def _table(rows, precision: str, bound: float) -> str:
    header = f"{'component':<13}{'vs ONNX graph':>22}{f'vs torch {precision} (GPU)':>26}{'vs torch fp32':>22}  result"
    lines = [
        f"TensorRT engine vs references, tiny FLUX.2 {precision} (rel L2 / PSNR dB; bound rel L2 <= {bound:g} vs fp32)",
        header,
    ]
    for component, graph, same, fp32, engine, method, ok in rows:
        cells = []
        for reference in (graph, same, fp32):
            cells.append(
                "not run"
                if reference is None
                else f"{rel_l2(engine, reference):.2e} / {range_psnr(engine, reference):5.1f}"
            )
        note = "" if method else " (graph not run: too large for the CPU reference)"
        lines.append(f"{component:<13}{cells[0]:>22}{cells[1]:>26}{cells[2]:>22}  {'pass' if ok else 'FAIL'}{note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(prog="tools/gpu_smoke.py", description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument(
        "--out", type=Path, default=None, help="where to keep the artifacts (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flux2-trt-gpu-smoke-") as scratch:
        if not smoke(precision=args.precision, out=(args.out or Path(scratch)).absolute()):
            raise VerificationError(
                f"a {args.precision} TensorRT engine missed its bound against PyTorch fp32; see the table"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
