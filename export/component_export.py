"""One graph of an export, written the same way at every precision: trace -> rewrite -> verify -> record.

1. trace: the component's module at the precision its graph is traced at (`Precision.traced`:
   itself, or bf16 for fp8), streamed from the checkpoint (or loaded, with `--no-stream`);
2. rewrite: a quantized precision's post-pass on the written graph (FP8 Q/DQ, `export.fp8.run`);
3. verify: the one numerics check against fp32 PyTorch (`export.verify.check`);
4. record: the manifest entry (files, sha256, sizes, opset, nodes) and the check's report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from common.errors import InternalError
from common.manifest import ComponentRecord, sha256_file
from common.precision import Precision
from common.specs import ComponentSpec, Geometry, Shapes
from export import checkpoint as ckpt
from export.components import COMPONENTS
from export.fp8 import run as fp8_export
from export.verify.check import CheckTarget, new_report, verify_graph
from export.writing.trace import data_file_name, example_inputs, export_graph


@dataclass(frozen=True)
class ComponentJob:
    """One graph of an export: everything needed to write and check it."""

    component: str
    spec: ComponentSpec
    key: str
    checkpoint: ckpt.Checkpoint
    geometry: Geometry
    shapes: Shapes
    precision: Precision  # the graph's own: an fp8 folder's VAE is bf16
    folder_precision: Precision  # the artifacts folder's
    reference: object  # export.verify.reference.ReferenceInputs
    staging: Path
    skip_check: bool = False
    stream: bool = True
    fp8: object = None  # export.fp8.run.Fp8Options, for a quantized precision
    # `--resolutions`: the graph's manifest name and file stem (`common.specs.graph_name`), and the ONNX
    # file of the graph at the first size whose weights it reads (export/writing/shared_weights.py).
    name: str = ""
    shares_weights_with: str = ""

    @property
    def graph(self) -> str:
        return self.name or self.component


def export_component(job: ComponentJob) -> tuple[ComponentRecord, dict]:
    """Write `job`'s graph into `job.staging` and check it; (manifest entry, report)."""
    assert COMPONENTS[job.component].quantizable or not job.precision.quantized, (job.component, job.precision)
    from tqdm import tqdm

    # Streaming: the weightless module and where its weights are, read and checked where the graph
    # needs them before tracing (fp16 row scales), so a checkpoint fp16 cannot hold is refused here.
    hollow = _weightless(job) if job.stream else None
    stages = ["trace"] + (["rewrite"] if job.precision.quantized else []) + ["hash"]
    stages += [] if job.skip_check else ["verify"]
    bar = tqdm(total=len(stages), desc=f"{job.graph:<12} {job.precision}", unit="step", file=sys.stderr)
    try:
        path = job.staging / f"{job.graph}.onnx"
        facts, module = _trace(job, path, bar, hollow)
        del hollow
        held = [module] if module is not None and job.precision.is_float32 else []  # the check's fp32 module
        del module
        bar.update()
        kept_float32 = _float32_matmuls(path, job.component, job.precision.traced)
        report = new_report(job.precision)
        traced_bytes = _data_bytes(path)
        if job.precision.quantized:
            bar.set_postfix_str(f"{job.precision} rewrite of the written graph")
            report[job.precision.name] = _quantize(job, path)
            facts["nodes"] = _node_count(path)
            bar.update()
        if job.shares_weights_with:
            from export.writing.shared_weights import share_weights

            bar.set_postfix_str(f"pointing its weights at {job.shares_weights_with}")
            # fp16/bf16 graphs keep torch's scopes: engines.check holds their float32 products to them.
            keep = ("pkg.torch.onnx.name_scopes",) if job.precision.traced.lists_float32_matmuls else ()
            facts["shared"] = share_weights(job.staging / job.shares_weights_with, path, keep)
            report["shared_weights"] = {k: v for k, v in facts["shared"].items() if k != "files"}
        bar.set_postfix_str("sha256")
        entry = _record(job, path, facts, kept_float32)
        bar.update()
        if job.skip_check:
            report["note"] = "numerics check skipped (--skip-check)"
        else:
            bar.set_postfix_str("checking against PyTorch fp32")
            target = CheckTarget(
                path, job.spec, job.precision, traced_bytes, job.checkpoint, job.geometry, job.shapes, job.reference
            )
            verify_graph(target, report, held)
            bar.update()
    finally:
        bar.close()
    if job.folder_precision.quantized and not job.precision.quantized:
        folder = job.folder_precision
        report["note"] = (
            f"{job.precision} in an {folder} export: {folder} applies to the transformer "
            f"(and --text-encoder-precision {folder})"
        )
    return entry, report


def _weightless(job: ComponentJob):
    from export.writing.streaming import build_weightless_graph

    return build_weightless_graph(job.component, job.checkpoint, job.geometry, job.shapes, job.precision.traced.name)


def _trace(job: ComponentJob, path: Path, bar, hollow) -> tuple[dict, object]:
    """Write the traced graph; (facts for the manifest, the loaded module or None when streamed)."""
    traced = job.precision.traced
    if hollow is not None:
        from export.writing.streaming import export_streaming

        bar.set_postfix_str("tracing without weights, streaming them into ONNX")
        return export_streaming(hollow, job.spec, path), None
    bar.set_postfix_str("loading weights")
    module = COMPONENTS[job.component].graph_module(job.checkpoint, job.geometry, job.shapes, traced)
    bar.set_postfix_str("tracing and writing ONNX")
    return export_graph(module, example_inputs(job.spec), job.spec, path), module


def _quantize(job: ComponentJob, path: Path) -> dict:
    """The precision's rewrite of the written graph (`Precision.rewrite` names it); its report part."""
    rewrite = REWRITES[job.precision.rewrite]
    return rewrite(path, job.fp8, job.component, (job.checkpoint, job.geometry, job.shapes))


# Precision.rewrite -> the post-pass that realises it on a written graph, in place.
REWRITES = {"fp8": fp8_export.quantize, "nvfp4": fp8_export.quantize_nvfp4}


def _data_bytes(path: Path) -> int:
    data = path.with_name(data_file_name(path.name))
    return data.stat().st_size if data.exists() else 0


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _record(job: ComponentJob, path: Path, facts: dict, kept_float32: list[str]) -> ComponentRecord:
    data = data_file_name(path.name)
    files = [path.name] + ([data] if (path.parent / data).exists() else [])
    if "shared" in facts:  # the first size's data file, then what is the graph's own
        files = [path.name, *facts["shared"]["files"]]
    return ComponentRecord(
        file=path.name,
        files=tuple(files),
        sha256={name: sha256_file(path.parent / name) for name in files},
        bytes={name: (path.parent / name).stat().st_size for name in files},
        key=job.key,
        precision=job.precision.name,
        opset=int(facts["opset"]),
        nodes=int(facts["nodes"]),
        inputs=job.spec.inputs,
        outputs=job.spec.outputs,
        float32_matmuls=tuple(kept_float32) if job.precision.traced.lists_float32_matmuls else None,
    )


def _float32_matmuls(path: Path, component: str, precision: Precision) -> list[str]:
    """The matrix multiplies an fp16/bf16 graph keeps in float32, all of them on purpose, or the export fails.

    Recorded in the manifest, so that `engines.check` can hold TensorRT's network to "every other
    matrix multiply in the graph's precision".
    """
    if not precision.lists_float32_matmuls:
        return []
    import onnx

    from common.onnx_checks import FLOAT32_MATMUL_SCOPES, float32_matmuls

    found = float32_matmuls(onnx.load(str(path), load_external_data=False))
    stray = [
        f"{name} ({scope or 'no scope'})" for name, scope in found if not any(s in scope for s in FLOAT32_MATMUL_SCOPES)
    ]
    if stray:
        raise InternalError(
            f"the {precision} {component} graph {path.name} computes matrix multiplies in float32 outside attention: "
            f"{', '.join(stray[:5])}; this is an exporter bug, please report it with the checkpoint's configs"
        )
    return [name for name, _ in found]
