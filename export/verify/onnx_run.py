"""Run an exported graph on the CPU and compare it with the PyTorch module it came from.

fp32 and fp16 graphs run in ONNX Runtime's CPU provider. bf16 graphs, which that provider cannot
run (no bf16 kernels for Mul and friends), run in onnx's reference evaluator (numpy with
ml_dtypes' bfloat16), which is exact to the graph but slow: it is used up to a size limit and
the report says so when it was skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.metrics import compare  # noqa: F401  (re-exported for callers of export.verify.onnx_run)
from common.precision import ORT_CPU, REFERENCE_EVALUATOR, Precision
from common.precision import precision as declared

# Above this many bytes of weights the reference evaluator would take too long on a CPU.
REFERENCE_EVALUATOR_MAX_BYTES = 64 * 1024 * 1024


def method_for(precision: str | Precision, weight_bytes: int) -> str | None:
    """How a graph of `precision` (a traced one: fp32, fp16 or bf16) is run here; None: too large."""
    method = declared(precision).cpu_check
    if method == REFERENCE_EVALUATOR and weight_bytes > REFERENCE_EVALUATOR_MAX_BYTES:
        return None
    return method


# numpy reduces bfloat16 arrays in bfloat16: a mean over 4096 values stalls once the running sum
# outgrows 8 mantissa bits (measured: a GroupNorm variance off by 2x, a VAE image at rel L2 4.6).
# GPUs, TensorRT and PyTorch accumulate these ops in float32 and round the result to bf16, so
# the reference evaluator is given the same: float32 inside, bf16 out.
_ACCUMULATING_OPS = (
    "MatMul",
    "Conv",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
    "ReduceMean_18",
    "ReduceSum_13",
    "ReduceSumSquare_18",
    "Softmax",
    "Einsum",
)


def _bf16_accumulating_ops():
    import ml_dtypes
    import onnx.reference.ops._op_list as op_list

    bf16 = np.dtype(ml_dtypes.bfloat16)

    def make(base):
        def _run(self, *inputs, **attributes):
            is_bf16 = any(getattr(x, "dtype", None) == bf16 for x in inputs)
            if not is_bf16:
                return base._run(self, *inputs, **attributes)
            upcast = [x.astype(np.float32) if getattr(x, "dtype", None) == bf16 else x for x in inputs]
            outputs = base._run(self, *upcast, **attributes)
            return tuple(y.astype(bf16) if getattr(y, "dtype", None) == np.float32 else y for y in outputs)

        return type(base.__name__.split("_")[0], (base,), {"_run": _run, "op_domain": ""})

    return [make(getattr(op_list, name)) for name in _ACCUMULATING_OPS]


def _trt_fp4_dynamic_quantize():
    """TensorRT's `trt::TRT_FP4DynamicQuantize` for onnx's evaluator: common.nvfp4's block rule."""
    import ml_dtypes
    from onnx.reference.op_run import OpRun

    from common import nvfp4

    def _run(self, x, global_scale, axis=-1, block_size=nvfp4.BLOCK, scale_type=None):
        if axis not in (-1, x.ndim - 1) or block_size != nvfp4.BLOCK:
            raise NotImplementedError(f"TRT_FP4DynamicQuantize axis={axis} block_size={block_size}")
        blocks = np.asarray(x, dtype=np.float32).reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
        codes, scales = nvfp4.quantize_blocks(blocks, np.float32(global_scale))
        values = nvfp4.E2M1_VALUES[codes].reshape(x.shape).astype(ml_dtypes.float4_e2m1fn)
        return values, scales

    return type("TRT_FP4DynamicQuantize", (OpRun,), {"_run": _run, "op_domain": "trt"})


def run_graph(path: Path, feeds: dict[str, np.ndarray], method: str) -> dict[str, np.ndarray]:
    if method == ORT_CPU:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))
    if method == REFERENCE_EVALUATOR:
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(path), load_external_data=True)
        evaluator = ReferenceEvaluator(model, new_ops=_bf16_accumulating_ops() + [_trt_fp4_dynamic_quantize()])
        names = [o.name for o in model.graph.output]
        return dict(zip(names, evaluator.run(names, feeds)))
    raise ValueError(f"unknown verification method {method!r}")
