"""FP8 (E4M3) linear layers as standard ONNX Q/DQ: rewrite an exported bf16 graph, and audit the result.

For each `nn.Linear` chosen for FP8, its MatMul/Gemm in the graph becomes

    x ──QuantizeLinear(s_x)──DequantizeLinear(s_x)──┐
                                                    MatMul ──> y (bf16)
    W_fp8 (FLOAT8E4M3FN initializer)──DequantizeLinear(s_w)──┘

with per-tensor scales s = amax / 448 (448 is E4M3's largest finite value): s_w from the weight
itself, s_x from calibration. These are plain opset-19 operators that ONNX Runtime's CPU provider
executes and from which TensorRT's strongly typed builder takes FP8 GEMMs. The scales have the
activation's type (bf16 in a bf16 graph), because opset 19-22 QuantizeLinear requires the scale to
have the input's type and DequantizeLinear's output takes the scale's type: the DQ output then
feeds the bf16 MatMul with no Cast in between, the pattern TensorRT fuses.

The rewrite streams: `onnx_ir` loads the graph with its weights memory-mapped, an FP8 layer's
weight becomes a lazy tensor that quantizes when `ir.save` writes it, and every other weight is
copied file to file, so memory stays at one tensor however large the model (measured in
docs/fp8.md).

Linear layers are found through the metadata the dynamo exporter puts on every node
(`pkg.torch.onnx.name_scopes` and `class_hierarchy`): the node that computes `aten.linear` inside
a `torch.nn.Linear` carries the module path. The optimizer renames most weight initializers
(`val_76` for the pre-transposed weight of `...attn.to_q`), so names alone cannot be trusted.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from export.writing.trace import data_file_name

FP8_E4M3_MAX = 448.0
# Temporaries while converting one tensor stay at ~64 MiB per float32 copy.
CHUNK_ELEMENTS = 1 << 24

# NVIDIA's FLUX.2 recipe (Model Optimizer) keeps these in high precision: the embedders see raw
# latents and text features, the modulation linears produce the scale/shift/gate of every block
# (small layers whose error multiplies every activation), and the output layers write the
# velocity. fnmatch patterns over module paths relative to the transformer.
DEFAULT_TRANSFORMER_EXCLUDE = (
    "x_embedder",
    "context_embedder",
    "time_guidance_embed.*",
    "*modulation*",
    "norm_out.*",
    "proj_out",
)
DEFAULT_TEXT_ENCODER_EXCLUDE = ()

_LINEAR_CLASS = "torch.nn.modules.linear.Linear"
_LINEAR_OPS = ("MatMul", "Gemm")
# Ops a weight may pass through between its initializer and the MatMul (exports with optimize=False).
_WEIGHT_PASSTHROUGH = ("Transpose", "Identity")
_E4M3 = ml_dtypes.float8_e4m3fn


class Fp8GraphError(Exception):
    """The graph does not have the structure the rewrite expects (an internal error, not user input)."""


@dataclass(frozen=True)
class LinearUse:
    """One call of an `nn.Linear` in an `ir.Model`."""

    path: str  # module path relative to the exported model, e.g. "transformer_blocks.0.attn.to_q"
    node: ir.Node  # the MatMul/Gemm
    weight: ir.Value  # the weight's initializer (possibly pre-transposed by the optimizer)
    via: tuple[ir.Node, ...]  # Transpose/Identity nodes between the weight and the node, nearest first


def is_excluded(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def plan_precisions(paths, exclude: tuple[str, ...]) -> dict[str, str]:
    """Module path -> "fp8" or "bf16" (excluded)."""
    return {path: ("bf16" if is_excluded(path, exclude) else "fp8") for path in paths}


def _module_path(metadata_props: dict[str, str], module_prefix: str) -> str | None:
    """The `nn.Linear` a node was traced from, from the exporter's metadata; None for any other node."""
    try:
        classes = ast.literal_eval(metadata_props.get("pkg.torch.onnx.class_hierarchy", "[]"))
        scopes = ast.literal_eval(metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return None
    # [..., 'torch.nn.modules.linear.Linear', 'aten.linear.default'] with scopes [..., '<path>', '<op>']
    if len(classes) < 2 or classes[-2] != _LINEAR_CLASS or len(scopes) < 2:
        return None
    path = scopes[-2]
    if module_prefix and path.startswith(module_prefix):
        path = path[len(module_prefix) :]
    return path


def find_linear_uses(model: ir.Model, module_prefix: str = "") -> list[LinearUse]:
    """Every MatMul/Gemm that the exporter traced from an `nn.Linear`, with its weight initializer."""
    uses = []
    for node in model.graph:
        if node.op_type not in _LINEAR_OPS:
            continue
        path = _module_path(node.metadata_props, module_prefix)
        if path is None:
            continue
        weight, via = node.inputs[1], []
        while not weight.is_initializer():
            producer = weight.producer()
            if producer is None or producer.op_type not in _WEIGHT_PASSTHROUGH:
                raise Fp8GraphError(f"weight of linear {path} (node {node.name}) is not an initializer: {weight.name}")
            via.append(producer)
            weight = producer.inputs[0]
        uses.append(LinearUse(path, node, weight, tuple(via)))
    return uses


# ---------------------------------------------------------------------------------------------
# Quantization


def scale_for(amax: float, dtype) -> np.ndarray:
    """The per-tensor scale amax / 448 as a scalar of `dtype`; 1 for an all-zero tensor."""
    value = float(amax) / FP8_E4M3_MAX if amax > 0 else 1.0
    return np.asarray(value, dtype=np.float32).astype(dtype)


def flat_chunks(values: np.ndarray):
    """(start, chunk) views over a tensor's elements, CHUNK_ELEMENTS at a time."""
    flat = values.reshape(-1)
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        yield start, flat[start : start + CHUNK_ELEMENTS]


def abs_max(values: np.ndarray) -> float:
    return max((float(np.abs(chunk.astype(np.float32)).max()) for _, chunk in flat_chunks(values)), default=0.0)


def quantize_e4m3(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """QuantizeLinear with saturation, as ONNX defines it: x / scale in float32, round to nearest even.

    Chunked, so a large weight costs its FP8 result plus one chunk of float32 temporaries.
    """
    result = np.empty(values.shape, dtype=_E4M3)
    flat = result.reshape(-1)
    for start, chunk in flat_chunks(values):
        scaled = chunk.astype(np.float32) / np.float32(scale)
        flat[start : start + chunk.size] = np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(_E4M3)
    return result


@dataclass
class LayerRecord:
    path: str
    precision: str  # "fp8" | "bf16"
    weight_shape: tuple[int, ...]  # as stored in the graph: [in, out] where the optimizer pre-transposed it
    calls: int
    input_amax: float | None = None
    input_scale: float | None = None
    weight_amax: float | None = None
    weight_scale: float | None = None
    reason: str = ""

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def quantize_graph(
    source: Path,
    target: Path,
    *,
    input_amax: dict[str, float],
    exclude: tuple[str, ...],
    module_prefix: str = "",
) -> list[LayerRecord]:
    """Rewrite the graph at `source` into `target` with FP8 Q/DQ on every non-excluded linear.

    `input_amax` maps module paths (relative, as `find_linear_uses` reports them) to calibrated
    activation amax. A linear chosen for FP8 without a calibrated amax is an error: nothing falls
    back silently. Returns one record per linear found, in graph order.
    """
    source, target = Path(source), Path(target)
    model = ir.load(source)
    uses = find_linear_uses(model, module_prefix)
    if not uses:
        raise Fp8GraphError(f"{source} has no nn.Linear nodes the exporter labelled; cannot place FP8 Q/DQ")
    by_path: dict[str, list[LinearUse]] = {}
    for use in uses:
        by_path.setdefault(use.path, []).append(use)
    plan = plan_precisions(by_path, exclude)
    missing = [p for p, precision in plan.items() if precision == "fp8" and p not in input_amax]
    if missing:
        raise Fp8GraphError(f"no calibrated input amax for {len(missing)} FP8 layer(s), e.g. {missing[:3]}")

    graph = model.graph
    zero_point = _initializer(graph, "fp8_zero_point", np.zeros((), _E4M3))
    records = []
    for path, path_uses in by_path.items():
        first = path_uses[0]
        weight = first.weight
        record = LayerRecord(path, plan[path], tuple(weight.shape), len(path_uses))
        records.append(record)
        if plan[path] != "fp8":
            record.reason = f"excluded by {next(p for p in exclude if is_excluded(path, (p,)))!r}"
            continue
        if len({u.weight.name for u in path_uses}) != 1:
            raise Fp8GraphError(
                f"linear {path} uses different weight initializers: {[u.weight.name for u in path_uses]}"
            )
        # MatMul and Gemm take A and B of one type, and Transpose/Identity keep it: the weight's
        # type is the activation's, which the scales must have.
        scale_dtype = weight.dtype.numpy()
        record.weight_amax = _weight_amax(weight.const_value)
        weight_scale = scale_for(record.weight_amax, scale_dtype)
        record.weight_scale = float(weight_scale.astype(np.float32))
        record.input_amax = float(input_amax[path])
        input_scale = scale_for(record.input_amax, scale_dtype)
        record.input_scale = float(input_scale.astype(np.float32))
        w_scale = _initializer(graph, f"{path}.weight_scale", weight_scale)
        x_scale = _initializer(graph, f"{path}.input_scale", input_scale)

        # The DQ sits directly on the initializer; a Transpose between it and the MatMul is
        # kept (TensorRT propagates DQ through Transpose). Shared weights are not expected.
        if len(weight.uses()) != len(path_uses):
            raise Fp8GraphError(f"weight {weight.name} of linear {path} is also used outside that linear")
        weight_consumers = [(use.via[-1], 0) if use.via else (use.node, 1) for use in path_uses]
        _to_fp8(weight, weight_scale)
        weight.name = f"{path}.weight_fp8"
        weight_dq = _node("DequantizeLinear", [weight, w_scale, zero_point], f"{path}.weight_dequantized", path)
        # Right before the first node that reads the weight (the MatMul, or the Transpose in front
        # of it), so the node list stays topologically sorted.
        graph.insert_before(weight_consumers[0][0], weight_dq)
        for index, use in enumerate(path_uses):
            suffix = f".{index}" if len(path_uses) > 1 else ""
            quantize = _node(
                "QuantizeLinear", [use.node.inputs[0], x_scale, zero_point], f"{path}.input_fp8{suffix}", path
            )
            dequantize = _node(
                "DequantizeLinear",
                [quantize.outputs[0], x_scale, zero_point],
                f"{path}.input_dequantized{suffix}",
                path,
            )
            graph.insert_before(use.node, [quantize, dequantize])
            use.node.replace_input_with(0, dequantize.outputs[0])
            consumer, input_index = weight_consumers[index]
            consumer.replace_input_with(input_index, weight_dq.outputs[0])
    if not zero_point.uses():  # every linear excluded
        graph.initializers.pop(zero_point.name)
    ir.save(model, target, external_data=data_file_name(target.name))
    return records


def _weight_amax(tensor) -> float:
    amax = abs_max(tensor.numpy())
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()  # unmap the data file: pages of every weight would otherwise stay mapped
    return amax


def _to_fp8(weight: ir.Value, scale: np.ndarray) -> None:
    """Make the weight's initializer FP8, quantized only when it is written, so one weight is in memory at once."""
    source = weight.const_value

    def quantized():
        values = quantize_e4m3(source.numpy(), scale)
        if isinstance(source, ir.ExternalTensor):
            source.release()
        return ir.Tensor(values)

    weight.const_value = ir.LazyTensor(quantized, dtype=ir.DataType.FLOAT8E4M3FN, shape=source.shape)
    weight.dtype = ir.DataType.FLOAT8E4M3FN


def _initializer(graph: ir.Graph, name: str, value: np.ndarray) -> ir.Value:
    initializer = ir.val(name, const_value=ir.Tensor(value, name=name))
    graph.register_initializer(initializer)
    return initializer


def _node(op_type: str, inputs: list[ir.Value], output: str, path: str) -> ir.Node:
    # The metadata is for a reader; audit_qdq does not trust it.
    return ir.node(
        op_type,
        inputs,
        outputs=[ir.Value(name=output)],
        name=f"{output}/{op_type}",
        metadata_props={"flux2_trt.fp8_layer": path},
    )


# ---------------------------------------------------------------------------------------------
# Audit: what the graph actually holds, independent of what the rewrite meant to do


def audit_qdq(model, module_prefix: str = "") -> dict[str, dict]:
    """Per linear: weight DQs fed by an FP8 initializer, and activation Q->DQ pairs feeding it.

    Walks the graph structure only (no metadata written by the rewrite is trusted): a linear's
    weight path is followed back from its MatMul/Gemm through DequantizeLinear and Transpose.
    """
    from onnx import TensorProto

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    result: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in _LINEAR_OPS:
            continue
        path = _module_path({p.key: p.value for p in node.metadata_props}, module_prefix)
        if path is None:
            continue
        entry = result.setdefault(
            path, {"calls": 0, "weight_dq_fp8": 0, "activation_qdq": 0, "weight_dtype": None, "weight_dq_nodes": set()}
        )
        entry["calls"] += 1
        # weight side
        name = node.input[1]
        while name not in initializers:
            producer = producers.get(name)
            if producer is None:
                break
            if producer.op_type == "DequantizeLinear":
                source = initializers.get(producer.input[0])
                if source is not None and source.data_type == TensorProto.FLOAT8E4M3FN:
                    entry["weight_dq_nodes"].add(producer.name)
                    entry["weight_dtype"] = "float8e4m3fn"
                break
            if producer.op_type not in _WEIGHT_PASSTHROUGH:
                break
            name = producer.input[0]
        if name in initializers:
            entry["weight_dtype"] = TensorProto.DataType.Name(initializers[name].data_type).lower()
        # activation side: DQ <- Q with FP8 output
        dq = producers.get(node.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[1] == dq.input[1]:
                zp = initializers.get(q.input[2]) if len(q.input) > 2 else None
                if zp is not None and zp.data_type == TensorProto.FLOAT8E4M3FN:
                    entry["activation_qdq"] += 1
    for entry in result.values():
        entry["weight_dq_fp8"] = len(entry.pop("weight_dq_nodes"))
    return result


def weight_bytes(model, exclude: tuple[str, ...]) -> dict:
    """Bytes of a module's parameters at bf16 and in an FP8 export with `exclude` (meta modules work).

    Each FP8 linear's weight takes one byte per element; every other parameter stays bf16. The
    graph adds constants of its own (RoPE tables, scales) that this does not count.
    """
    import torch

    fp8_params = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not is_excluded(name, exclude):
            fp8_params += module.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    bf16_bytes = 2 * total
    fp8_bytes = fp8_params + 2 * (total - fp8_params)
    return {
        "params": total,
        "fp8_params": fp8_params,
        "bf16_bytes": bf16_bytes,
        "fp8_bytes": fp8_bytes,
        "ratio": fp8_bytes / bf16_bytes if bf16_bytes else 0.0,
    }
