"""The one numerics check of a written graph against the fp32 PyTorch module, for every precision.

The precision's declaration (`common.precision`) says how its graphs run on a CPU: fp32 and fp16
in ONNX Runtime, bf16 in onnx's reference evaluator (small graphs only), FP8 Q/DQ through its
float32 twin in ONNX Runtime plus, where small enough, the bf16 graph itself in the reference
evaluator, and for the transformer an image through diffusers' pipeline. Whatever the path, the
outputs are judged by the precision's tolerance and the report has one shape. A rewrite with a
fake-quantized PyTorch reference (NVFP4: `export.verify.fake_quant`) also holds the twin to that
reference, under a bound tight enough that a layout error of the graph's weights fails it.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import VerificationError
from common.precision import FP32_TWIN, REFERENCE_EVALUATOR, Precision
from common.specs import RESIDUAL_OF, ComponentSpec
from export.components import COMPONENTS
from export.verify import fake_quant as fake_quant_references
from export.verify.onnx_run import REFERENCE_EVALUATOR_MAX_BYTES, method_for, run_graph

# The fp32 twin doubles the bf16 weights in memory; beyond this it is not run on a CPU here.
TWIN_MAX_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class CheckTarget:
    """A written graph and what it is checked against."""

    path: Path  # the .onnx file
    spec: ComponentSpec
    precision: Precision  # the graph's own (an fp8 folder's VAE is bf16)
    traced_bytes: int  # bytes of weights at the traced precision (the FP8 rewrite's input for fp8)
    checkpoint: object  # export.checkpoint.Checkpoint
    geometry: object
    shapes: object
    reference: object  # export.verify.reference.ReferenceInputs


def new_report(precision: Precision) -> dict:
    return {"method": None, "outputs": {}, "tolerance": dataclasses.asdict(precision.tolerance), "passed": None}


def verify_graph(target: CheckTarget, report: dict, held: list | None = None) -> None:
    """Fill `report` with the check of `target`; raise VerificationError when it misses the bounds.

    `held` may hand over the fp32 PyTorch module the caller loaded (the plain fp32 export): it is
    taken out of the list, so it is freed before the graph runs.
    """
    if target.precision.cpu_check == FP32_TWIN:
        _verify_twin(target, report)
        return
    method = method_for(target.precision, target.traced_bytes)
    report["method"] = method
    if method is None:
        report["note"] = (
            f"{target.precision} graph with {target.traced_bytes} bytes of weights is too large for onnx's reference "
            "evaluator on a CPU and ONNX Runtime's CPU provider has no bf16 kernels: not checked here"
        )
        return
    feeds, expected = _expected(target, held or [])
    actual = run_graph(target.path, feeds, method)
    tolerance = target.precision.tolerance
    report["outputs"] = judge_outputs(tolerance, actual, expected, feeds)
    report["passed"] = all(m["passed"] for m in report["outputs"].values())
    if not report["passed"]:
        worst = ", ".join(tolerance.describe(n, m) for n, m in report["outputs"].items())
        raise VerificationError(
            f"{target.spec.name} {target.precision} graph does not match PyTorch fp32 ({method}): {worst}"
        )


def judge_outputs(tolerance, actual: dict, expected: dict, feeds: dict) -> dict:
    """{output: metrics}; a residual output (`common.specs.RESIDUAL_OF`) as its stream plus itself."""
    judged = {}
    for name, value in expected.items():
        stream = RESIDUAL_OF.get(name)
        base = expected.get(stream, feeds.get(stream)) if stream else None
        if base is None:
            judged[name] = tolerance.judge(actual[name], value)
        else:
            alone = {k: v for k, v in tolerance.judge(actual[name], value).items() if k != "passed"}
            judged[name] = {**tolerance.judge(actual[name] + base, value + base), "judged_as": f"{stream} + {name}"}
            judged[name]["alone"] = alone  # reported: the cache's decision reads the residual itself
    return judged


def _expected(target: CheckTarget, held: list) -> tuple[dict, dict]:
    """(feeds, {output: fp32 PyTorch value}); refuses NaN/Inf from the checkpoint's own weights."""
    import torch

    component = COMPONENTS[target.spec.name]
    feeds = target.reference.feeds(target.spec)
    module = held.pop() if held else component.graph_module(target.checkpoint, target.geometry, target.shapes, "fp32")
    with torch.no_grad():
        values = module(*[torch.from_numpy(feeds[t.name]) for t in target.spec.inputs])
    values = values if isinstance(values, tuple) else (values,)  # the step cache's graphs have several outputs
    expected = {t.name: value.numpy() for t, value in zip(target.spec.outputs, values)}
    for name, array in expected.items():
        if bad := int(array.size - np.count_nonzero(np.isfinite(array))):
            raise VerificationError(
                f"{target.spec.name}: PyTorch fp32 on the checkpoint's own weights gives {bad} NaN/Inf values in "
                f"{name}; the weights in {component.weights_dir(target.checkpoint)} are damaged: restore them"
            )
    return feeds, expected


def _verify_twin(target: CheckTarget, report: dict) -> None:
    """A Q/DQ graph: its float32 twin in ONNX Runtime, the graph itself where the evaluator can."""
    from common.cpu_twin import fp32_twin, ort_session
    from export.fp8.twin import end_to_end

    if target.traced_bytes * 2 > TWIN_MAX_BYTES:
        report["note"] = f"{target.traced_bytes} bytes of bf16 weights: the fp32 twin is too large to run on a CPU here"
        return
    component = COMPONENTS[target.spec.name]
    module = component.graph_module(target.checkpoint, target.geometry, target.shapes, "fp32")
    feeds, expected = _expected(target, [module])
    output, value = next(iter(expected.items()))  # the fake-quant reference holds the first output
    # Computed before the twin runs, so the fp32 module is freed first (as _expected frees it).
    fake_quant = fake_quant_references.REFERENCES.get(target.precision.rewrite)
    if fake_quant is not None:
        inputs = [feeds[t.name] for t in target.spec.inputs]
        fake_quant = fake_quant(getattr(module, component.wrapper_attribute), module, target.path, inputs)
    del module
    tolerance = target.precision.tolerance
    with tempfile.TemporaryDirectory(prefix="flux2-fp8-twin-") as folder:
        twin = Path(folder) / target.path.name
        fp32_twin(target.path, twin)
        twin_outputs = dict(zip(expected, ort_session(twin).run(list(expected), feeds)))
        actual_twin = twin_outputs[output]
        report["method"] = FP32_TWIN
        report["outputs"] = judge_outputs(tolerance, twin_outputs, expected, feeds)
        passed = all(m["passed"] for m in report["outputs"].values())
        if target.traced_bytes <= REFERENCE_EVALUATOR_MAX_BYTES:
            actual = run_graph(target.path, feeds, REFERENCE_EVALUATOR)
            judged = judge_outputs(tolerance, actual, expected, feeds)
            report["bf16_graph"] = {"method": REFERENCE_EVALUATOR, "outputs": judged}
            passed &= all(m["passed"] for m in judged.values())
        else:
            report["bf16_graph"] = {"method": None, "note": "too large for onnx's reference evaluator here"}
        if fake_quant is not None:
            report["fake_quant_reference"] = fake_quant.judge(output, actual_twin)
            passed &= report["fake_quant_reference"]["passed"]
        report["passed"] = bool(passed)
        if component.drives_pipeline:
            name = target.precision.name
            print(f"{name}: end-to-end check against the bf16 pipeline", file=sys.stderr)
            report["end_to_end"] = end_to_end(target.checkpoint, target.geometry, target.shapes, twin, name=name)
    if not report["passed"]:
        worst = []
        for label, outputs in (
            ("fp32 twin", report["outputs"]),
            ("bf16 graph", report["bf16_graph"].get("outputs", {})),
        ):
            worst += [tolerance.describe(f"{label} {name}", metrics) for name, metrics in outputs.items()]
        if fake_quant is not None and not report["fake_quant_reference"]["passed"]:
            worst += fake_quant.describe(report["fake_quant_reference"])
        raise VerificationError(
            f"{target.spec.name} {target.precision} graph does not match PyTorch fp32: {'; '.join(worst)}"
        )
