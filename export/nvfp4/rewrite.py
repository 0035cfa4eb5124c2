"""NVFP4 linear layers as ONNX TensorRT parses them: rewrite an exported bf16 graph, and audit the result.

For each `nn.Linear` chosen for NVFP4 (common/nvfp4.py for the numbers), its MatMul/Gemm becomes

    x (bf16) ──trt::TRT_FP4DynamicQuantize(g_x)──┬─ x_fp4 ───────────────DequantizeLinear(block 16)──Cast(bf16)──┐
                                                 └─ x_scales (E4M3) ──DequantizeLinear(g_x)──┘               MatMul
    W_fp4 [N, K] (FLOAT4E2M1) ──DequantizeLinear(block 16, axis 1)──[Transpose]──Cast(bf16)────────────────────┘
    W_scales [N, K/16] (E4M3) ──DequantizeLinear(g_w)──┘

Weights are stored [N, K] (blocks along K, the reduction axis), whatever orientation the exporter
gave the bf16 weight; a Transpose after the DequantizeLinear puts them back where the graph wants
[K, N]. `g_w` comes from the weight (amax / 2688), `g_x` from calibration (the input amax, same
prompts and cache as FP8); the activation's block scales are computed by TensorRT at run time
(`TRT_FP4DynamicQuantize`, a TensorRT operator in domain "trt", the form NVIDIA's Model Optimizer
exports). FP4 `DequantizeLinear` needs opset 23: the rewritten graph declares it.

The rewrite streams as the FP8 one does: each weight is read from the data file, quantized and
appended to the new data file, its block scales written right after it, one tensor at a time.
ONNX Runtime's CPU provider runs neither FP4 `DequantizeLinear` nor TensorRT's operator: the CPU
check and the CPU runtime run `common.cpu_twin`'s float32 twin of this graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import nvfp4
from common.external_data import TensorReader, copy_with_external_data
from common.precision import PRECISIONS
from common.precision import precision as declared
from export.fp8.rewrite import (
    Fp8GraphError,
    GraphEdits,
    LayerRecord,
    abs_max,
    is_excluded,
    linear_path,
    linears_by_path,
    make_node,
    mismatches,
    scalar_initializer,
)

NVFP4 = PRECISIONS["nvfp4"]
OPSET = 23  # FLOAT4E2M1 in DequantizeLinear (and block_size, from 21)
TRT_DOMAIN = "trt"
DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"


def plan_precisions(paths, exclude: tuple[str, ...]) -> dict[str, str]:
    """Module path -> "nvfp4", or the precision nvfp4 graphs are traced at ("bf16") for an excluded one."""
    return {path: (NVFP4.traced.name if is_excluded(path, exclude) else NVFP4.name) for path in paths}


@dataclass
class _Edits(GraphEdits):
    weights: dict = field(default_factory=dict)  # bf16 weight -> (fp4 name, scales name, g_w, transpose, file key)
    scales_after: dict = field(default_factory=dict)  # fp4 weight name -> its block scales' TensorProto
    value_infos: list = field(default_factory=list)
    shapes: dict = field(default_factory=dict)  # value name -> static shape
    imported: object = None  # export.nvfp4.published.PublishedTransformer, or None: quantize here


def quantize_graph(
    source: Path,
    target: Path,
    *,
    input_amax: dict[str, float],
    exclude: tuple[str, ...],
    module_prefix: str = "",
    imported=None,
) -> list[LayerRecord]:
    """Rewrite the graph at `source` into `target` with NVFP4 on every non-excluded linear; one record per linear.

    `imported` (an export.nvfp4.published.PublishedTransformer) replaces calibration and quantization:
    its NVFP4 layers are the graph's, with their own codes and scales; the rest stay bf16.
    """
    import onnx

    source, target = Path(source), Path(target)
    model = onnx.load(str(source), load_external_data=False)
    by_path = linears_by_path(model, source, module_prefix, "NVFP4")
    if imported is not None:
        nvfp4_weights = set(imported.nvfp4_names)
        plan = {path: NVFP4.name if f"{path}.weight" in nvfp4_weights else NVFP4.traced.name for path in by_path}
        unplaced = sorted(nvfp4_weights - {f"{path}.weight" for path in by_path})
        if unplaced:  # an NVFP4 layer of the file that is no linear of the graph would be silently dropped
            raise Fp8GraphError(
                f"{len(unplaced)} NVFP4 weight(s) of {imported.path} are no linear of the graph, e.g. {unplaced[0]}"
            )
    else:
        plan = plan_precisions(by_path, exclude)
    needed = set(plan)
    if imported is not None:  # the file's static input_scale, else a calibrated amax
        needed -= {layer.removesuffix(".weight") for layer in imported.static_input_names}
    missing = [p for p, name in plan.items() if declared(name).quantized and p in needed and p not in input_amax]
    if missing:
        raise Fp8GraphError(f"no calibrated input amax for {len(missing)} NVFP4 layer(s), e.g. {missing[:3]}")
    edits = _Edits(model.graph, TensorReader(source.parent), shapes=_activation_shapes(model), imported=imported)
    records = []
    for path, path_uses in by_path.items():
        weight_proto = edits.initializers[path_uses[0].weight]
        record = LayerRecord(path, plan[path], tuple(weight_proto.dims), len(path_uses))
        records.append(record)
        if record.quantized:
            _quantize_linear(record, path_uses, input_amax.get(path), edits)
        elif imported is not None:
            record.reason = f"bf16 in {imported.path.name}"
        else:
            record.reason = f"excluded by {next(p for p in exclude if is_excluded(path, (p,)))!r}"
    _apply(model, edits)
    copy_with_external_data(model, source.parent, target, _weight_writer(edits))
    return records


def _activation_shapes(model) -> dict[str, list[int]]:
    """Static shapes of the graph's values, by name (from its value_info, else ONNX shape inference)."""
    import onnx

    def shapes_of(values):
        return {
            v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in values
            if v.type.tensor_type.HasField("shape")
            and all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
        }

    found = shapes_of(list(model.graph.input) + list(model.graph.value_info))
    if len(found) < len(model.graph.node) // 2:
        inferred = onnx.shape_inference.infer_shapes(model)
        found.update(shapes_of(inferred.graph.value_info))
    return found


def _weight_orientation(use, edits: _Edits) -> bool:
    """Whether the weight initializer is [N, K] (nn.Linear's own) rather than [K, N] (MatMul's B)."""
    transposes = sum(1 for name in use.via if edits.nodes_by_name[name].op_type == "Transpose")
    node = edits.nodes_by_name[use.node]
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
    return (transposes + trans_b) % 2 == 1


def _scales(record: LayerRecord, weight_proto, shape: tuple[int, int], input_amax: float | None, edits: _Edits):
    """(weight global scale, input global scale) of one NVFP4 linear whose weight is `shape` [N, K]."""
    if edits.imported is None:
        record.weight_amax = abs_max(edits.reader.array(weight_proto))
        record.input_amax = float(input_amax)
        weight_global, input_global = nvfp4.global_scale(record.weight_amax), nvfp4.global_scale(record.input_amax)
    else:
        layer = edits.imported.tensor(f"{record.path}.weight")  # one layer's codes, read again when written
        weight_global, input_global = layer.value.global_scale, layer.input_scale
        record.reason = f"imported from {edits.imported.path.name}"
        if input_global is None:  # TensorRT takes the activation's global scale as a constant only
            if input_amax is None:
                raise Fp8GraphError(f"linear {record.path} has no input_scale in the file and no calibrated amax")
            record.input_amax = float(input_amax)
            input_global = nvfp4.global_scale(record.input_amax)
            record.reason += "; no input_scale there: the activation's global scale is calibrated"
        if layer.value.shape != shape:
            raise Fp8GraphError(f"linear {record.path}: the file's weight is {layer.value.shape}, the graph's {shape}")
    record.weight_scale = float(weight_global)
    record.input_scale = float(input_global)
    return np.float32(weight_global), np.float32(input_global)


def _quantize_linear(record: LayerRecord, path_uses: list, input_amax: float | None, edits: _Edits) -> None:
    from onnx import TensorProto

    path, first = record.path, path_uses[0]
    if len({u.weight for u in path_uses}) != 1:
        raise Fp8GraphError(f"linear {path} uses different weight initializers: {[u.weight for u in path_uses]}")
    if edits.weight_users.get(first.weight, 0) != len(path_uses):
        raise Fp8GraphError(f"weight {first.weight} of linear {path} is also used outside that linear")
    weight_proto = edits.initializers[first.weight]
    compute_type = weight_proto.data_type
    stored_nk = _weight_orientation(first, edits)
    rows, columns = tuple(weight_proto.dims) if stored_nk else tuple(reversed(weight_proto.dims))
    if columns % nvfp4.BLOCK:
        raise Fp8GraphError(f"linear {path}: K = {columns} is not a multiple of {nvfp4.BLOCK}")
    weight_global, input_global = _scales(record, weight_proto, (rows, columns), input_amax, edits)

    fp4_name, scales_name = f"{path}.weight_fp4", f"{path}.weight_block_scales"
    w_global, x_global = f"{path}.weight_global_scale", f"{path}.input_global_scale"
    source = f"{path}.weight" if edits.imported is not None else None
    edits.weights[first.weight] = (fp4_name, scales_name, weight_global, not stored_nk, source)
    scales_proto = TensorProto(
        name=scales_name, data_type=TensorProto.FLOAT8E4M3FN, dims=[rows, columns // nvfp4.BLOCK]
    )
    edits.scales_after[fp4_name] = scales_proto
    edits.new_initializers += [
        scalar_initializer(w_global, weight_global, TensorProto.FLOAT),
        scalar_initializer(x_global, input_global, TensorProto.FLOAT),
    ]
    # Weight side: DQ(scales) -> DQ(codes) [N, K] float32 -> Transpose where the graph wants [K, N]
    # -> Cast to the compute type, into the first node that read the bf16 weight.
    chain = [
        make_node("DequantizeLinear", [scales_name, w_global], f"{path}.weight_scales_dequantized", path),
        make_node(
            "DequantizeLinear",
            [fp4_name, f"{path}.weight_scales_dequantized"],
            f"{path}.weight_dequantized",
            path,
            axis=1,
            block_size=nvfp4.BLOCK,
        ),
    ]
    weight_out = f"{path}.weight_dequantized"
    if not stored_nk:  # stored [N, K] now; the graph read [K, N]
        chain.append(make_node("Transpose", [weight_out], f"{path}.weight_transposed", path, perm=[1, 0]))
        weight_out = f"{path}.weight_transposed"
    chain.append(make_node("Cast", [weight_out], f"{path}.weight_cast", path, to=compute_type))
    weight_consumer = edits.nodes_by_name[first.via[-1]] if first.via else edits.nodes_by_name[first.node]
    weight_consumer.input[0 if first.via else 1] = f"{path}.weight_cast"
    edits.new_nodes.setdefault(weight_consumer.name, [])[:0] = chain
    _quantize_inputs(path, path_uses, x_global, compute_type, edits)


def _quantize_inputs(path: str, path_uses: list, x_global: str, compute_type: int, edits: _Edits) -> None:
    """Activation side, per call: TensorRT's dynamic FP4 quantize -> DQ(scales) -> DQ(values) -> Cast.

    The block scales are each call's own (TensorRT computes them); the global scale must be a
    constant (TensorRT-RTX 1.7.1: "Scale input must be an initializer"): calibrated, or the file's
    input_scale.
    """
    from onnx import TensorProto, helper

    for index, use in enumerate(path_uses):
        suffix = f".{index}" if len(path_uses) > 1 else ""
        call_global = x_global
        values, block_scales = f"{path}.input_fp4{suffix}", f"{path}.input_block_scales{suffix}"
        quantize = helper.make_node(
            DYNAMIC_QUANTIZE,
            [use.activation, call_global],
            [values, block_scales],
            name=f"{values}/{DYNAMIC_QUANTIZE}",
            domain=TRT_DOMAIN,
            axis=-1,
            block_size=nvfp4.BLOCK,
            scale_type=TensorProto.FLOAT8E4M3FN,
        )
        entry = quantize.metadata_props.add()
        entry.key, entry.value = "flux2_trt.nvfp4_layer", path
        # ONNX shape inference does not know TensorRT's operator: its outputs' types are declared.
        shape = edits.shapes.get(use.activation)
        if shape is None or shape[-1] % nvfp4.BLOCK:
            raise Fp8GraphError(f"linear {path}: input {use.activation} has shape {shape}, not [..., 16 k]")
        edits.value_infos += [
            helper.make_tensor_value_info(values, TensorProto.FLOAT4E2M1, shape),
            helper.make_tensor_value_info(
                block_scales, TensorProto.FLOAT8E4M3FN, [*shape[:-1], shape[-1] // nvfp4.BLOCK]
            ),
        ]
        edits.new_nodes.setdefault(use.node, []).extend(
            [
                quantize,
                make_node("DequantizeLinear", [block_scales, call_global], f"{path}.input_scales{suffix}", path),
                make_node(
                    "DequantizeLinear",
                    [values, f"{path}.input_scales{suffix}"],
                    f"{path}.input_dequantized{suffix}",
                    path,
                    axis=-1,
                    block_size=nvfp4.BLOCK,
                ),
                make_node(
                    "Cast", [f"{path}.input_dequantized{suffix}"], f"{path}.input_cast{suffix}", path, to=compute_type
                ),
            ]
        )
        edits.nodes_by_name[use.node].input[0] = f"{path}.input_cast{suffix}"


def _apply(model, edits: _Edits) -> None:
    """Insert the nodes in order, put each FP4 weight's scales right after it, declare opset 23 and domain trt."""
    from onnx import helper

    ordered = []
    for node in model.graph.node:
        ordered.extend(edits.new_nodes.get(node.name, ()))
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    initializers = []
    for tensor in model.graph.initializer:
        initializers.append(tensor)
        if tensor.name in edits.weights:
            fp4_name, scales_name = edits.weights[tensor.name][:2]
            initializers.append(edits.scales_after[fp4_name])
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers + edits.new_initializers)
    model.graph.value_info.extend(edits.value_infos)
    for info in list(model.graph.value_info):  # a renamed weight's old type entry would name nothing
        if info.name in edits.weights:
            model.graph.value_info.remove(info)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)
    if not any(opset.domain == TRT_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))


def _weight_writer(edits: _Edits):
    """copy_with_external_data's transform: an FP4 weight's packed codes, then its block scales."""
    from onnx import TensorProto

    pending: dict = {}

    def transform(tensor, tensors: TensorReader):
        if tensor.name in edits.weights:
            fp4_name, scales_name, weight_global, transpose, source = edits.weights[tensor.name]
            if source is not None:  # the file's own codes and scales, as they are
                quantized = edits.imported.tensor(source).value
            else:
                weight = tensors.array(tensor)
                weight = weight.T if transpose else weight  # [N, K]
                quantized = nvfp4.quantize(weight, weight_global)
            pending[scales_name] = quantized.block_scales
            tensor.name = fp4_name
            tensor.data_type = TensorProto.FLOAT4E2M1
            del tensor.dims[:]
            tensor.dims.extend(quantized.shape)
            return quantized.codes
        if tensor.name in pending:
            return pending.pop(tensor.name)
        return None

    return transform


# ---------------------------------------------------------------------------------------------
# Audit: what the graph holds, from its structure alone


def audit_nvfp4(model, module_prefix: str = "") -> dict[str, dict]:
    """Per linear: FP4 weight DequantizeLinears feeding it, and TRT_FP4DynamicQuantize chains on its input."""
    from onnx import TensorProto

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    result: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        path = linear_path(node, module_prefix)
        if path is None:
            continue
        entry = result.setdefault(path, {"calls": 0, "weight_dq_fp4": set(), "activation_fp4": 0})
        entry["calls"] += 1
        name = node.input[1]
        while (producer := producers.get(name)) is not None:
            if producer.op_type == "DequantizeLinear":
                source = initializers.get(producer.input[0])
                if source is not None and source.data_type == TensorProto.FLOAT4E2M1:
                    entry["weight_dq_fp4"].add(producer.name)
                break
            if producer.op_type not in ("Transpose", "Identity", "Cast"):
                break
            name = producer.input[0]
        name, hops = node.input[0], 0
        while (producer := producers.get(name)) is not None and hops < 4:
            if producer.op_type == DYNAMIC_QUANTIZE and producer.domain == TRT_DOMAIN:
                entry["activation_fp4"] += 1
                break
            if producer.op_type not in ("DequantizeLinear", "Cast"):
                break
            name, hops = producer.input[0], hops + 1
    for entry in result.values():
        entry["weight_dq_fp4"] = len(entry["weight_dq_fp4"])
    return result


def audit_problems(model, module_prefix: str, records: list[LayerRecord]) -> list[str]:
    """What the written graph holds that the records did not ask for (empty: as asked)."""
    audit = audit_nvfp4(model, module_prefix)
    return mismatches(
        audit, records, ("weight_dq_fp4", "activation_fp4"), "FP4 weight DQ / dynamic activation quantize"
    )


def weight_bytes(model, exclude: tuple[str, ...]) -> dict:
    """Bytes of a module's parameters at bf16 and with its non-excluded linears in NVFP4 (meta modules work).

    An NVFP4 weight element is 4 bits plus one E4M3 byte per 16 (4.5 bits); its two global scales are
    not counted. Everything else stays bf16.
    """
    import torch

    nvfp4_params = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not is_excluded(name, exclude)
    )
    total = sum(p.numel() for p in model.parameters())
    bf16_bytes = 2 * total
    nvfp4_bytes = nvfp4_params * 9 / 16 + 2 * (total - nvfp4_params)
    return {
        "params": total,
        "nvfp4_params": nvfp4_params,
        "bf16_bytes": bf16_bytes,
        "nvfp4_bytes": int(nvfp4_bytes),
        "ratio": nvfp4_bytes / bf16_bytes if bf16_bytes else 0.0,
    }
