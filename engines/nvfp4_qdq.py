"""NVFP4's Q/DQ structure, as TensorRT's strongly typed build takes it, checked without weight bytes.

The form (common/nvfp4.py has the numbers; TensorRT-RTX 1.7.1 parses and builds it for SM120,
docs/engines.md#nvfp4), per quantized linear, opset 23:

- weight: a FLOAT4E2M1 initializer [N, K] -> DequantizeLinear(block_size=16 along K) whose scale is
  DequantizeLinear(FLOAT8E4M3FN block scales [N, K/16], scalar float32 global scale);
- activation: trt::TRT_FP4DynamicQuantize(x, scalar global scale; axis=-1, block_size=16,
  scale_type=FLOAT8E4M3FN) -> its FP4 values through DequantizeLinear(block_size=16, axis -1) whose
  scale is DequantizeLinear(its FP8 block scales, the same global scale).

Everything else about those DequantizeLinears (where they lead) is TensorRT's business: its network
census (engines.trt_parse) counts what reaches a matrix multiply.
"""

from __future__ import annotations

from engines.graph_checks import Finding, Graph, node_label, type_name

FLOAT4E2M1 = 23  # onnx.TensorProto.FLOAT4E2M1
FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN
FLOAT = 1
BLOCK = 16  # common.nvfp4.BLOCK; not imported: engines' static checks stay numpy-free
DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
CHECK = "nvfp4 q/dq"


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _is_scalar(graph: Graph, name: str) -> bool:
    shape = graph.shapes.get(name)
    return shape is not None and (len(shape) == 0 or tuple(shape) == (1,))


def _last_axis(graph: Graph, name: str, axis: int) -> bool:
    shape = graph.shapes.get(name)
    return axis == -1 or (shape is not None and axis == len(shape) - 1)


def nvfp4_dequantizers(graph: Graph) -> set[str]:
    """Output names of the DequantizeLinears that belong to NVFP4: those of FP4 values and those whose
    output is an FP4 DequantizeLinear's scale (the fp8 check leaves them to this one)."""
    found = set()
    for node in graph.model.graph.node:
        if node.op_type == "DequantizeLinear" and graph.types.get(node.input[0]) == FLOAT4E2M1:
            found.add(node.output[0])
            if len(node.input) > 1:
                scale = graph.producers.get(node.input[1])
                if scale is not None and scale.op_type == "DequantizeLinear":
                    found.add(scale.output[0])
    return found


def _check_block_scale(graph: Graph, fp4_dq, label: str, expected_source) -> list[Finding]:
    """The FP4 DequantizeLinear's scale: DequantizeLinear(FP8 block scales, scalar float32 global)."""
    scale_name = fp4_dq.input[1] if len(fp4_dq.input) > 1 else ""
    scale = graph.producers.get(scale_name)
    if scale is None or scale.op_type != "DequantizeLinear":
        return [Finding(CHECK, label, f"scale {scale_name!r} is not a DequantizeLinear of FP8 block scales")]
    found = []
    source = scale.input[0]
    if graph.types.get(source) != FLOAT8E4M3FN or not expected_source(source):
        found.append(Finding(CHECK, label, f"block scales {source!r} are {type_name(graph.types.get(source, 0))} "
                                           f"from the wrong place; NVFP4 wants FLOAT8E4M3FN ones"))  # fmt: skip
    if len(scale.input) < 2 or not _is_scalar(graph, scale.input[1]) or graph.types.get(scale.input[1]) != FLOAT:
        found.append(Finding(CHECK, label, f"global scale of {scale_name!r} is not a scalar float32"))
    values, blocks = graph.shapes.get(fp4_dq.input[0]), graph.shapes.get(source)
    if values and blocks and tuple(blocks) != (*values[:-1], values[-1] // BLOCK):
        found.append(Finding(CHECK, label, f"block scales {source!r} have shape {blocks} for values {values}; "
                                           f"NVFP4 wants one per {BLOCK} along the last axis"))  # fmt: skip
    return found


def _check_fp4_dequantize(graph: Graph, node, label: str) -> list[Finding]:
    attrs = _attrs(node)
    found = []
    if attrs.get("block_size") != BLOCK or not _last_axis(graph, node.input[0], attrs.get("axis", 1)):
        found.append(Finding(CHECK, label, f"block_size {attrs.get('block_size')} axis {attrs.get('axis', 1)}; "
                                           f"NVFP4 wants block_size {BLOCK} along the last axis"))  # fmt: skip
    source = node.input[0]
    producer = graph.producers.get(source)
    if graph.constant(source) is not None:  # a weight: its block scales are an initializer too
        return found + _check_block_scale(graph, node, label, lambda s: graph.constant(s) is not None)
    if producer is None or producer.op_type != DYNAMIC_QUANTIZE or producer.output[0] != source:
        return found + [Finding(CHECK, label, f"FP4 input {source!r} is neither an initializer nor the values "
                                              f"of a {DYNAMIC_QUANTIZE}")]  # fmt: skip
    return found + _check_block_scale(graph, node, label, lambda s: s == producer.output[1])


def _check_dynamic_quantize(graph: Graph, node, label: str) -> list[Finding]:
    attrs = _attrs(node)
    found = []
    wanted = {"axis": -1, "block_size": BLOCK, "scale_type": FLOAT8E4M3FN}
    wrong = {k: attrs.get(k) for k, v in wanted.items() if attrs.get(k) != v}
    if wrong and not (set(wrong) == {"axis"} and _last_axis(graph, node.input[0], attrs.get("axis", 0))):
        found.append(Finding(CHECK, label, f"attributes {wrong}; NVFP4 wants {wanted}"))
    if len(node.input) < 2 or not _is_scalar(graph, node.input[1]) or graph.types.get(node.input[1]) != FLOAT:
        found.append(Finding(CHECK, label, "global scale is not a scalar float32"))
    for index, (output, want) in enumerate(zip(node.output, (FLOAT4E2M1, FLOAT8E4M3FN), strict=False)):
        if graph.types.get(output) != want:
            found.append(Finding(CHECK, label, f"output {index} {output!r} is {type_name(graph.types.get(output, 0))}, "
                                               f"not {type_name(want)} (declare it in value_info)"))  # fmt: skip
        readers = graph.consumers.get(output, [])
        if not readers or any(r.op_type != "DequantizeLinear" or r.input[0] != output for r in readers):
            found.append(Finding(CHECK, label, f"output {index} {output!r} must feed DequantizeLinear only"))
    return found


def check_nvfp4_qdq(graph: Graph, table: dict) -> list[Finding]:
    found = []
    for index, node in enumerate(graph.model.graph.node):
        label = node_label(node, index)
        if node.op_type == DYNAMIC_QUANTIZE:
            found += _check_dynamic_quantize(graph, node, label)
        elif node.op_type == "DequantizeLinear" and graph.types.get(node.input[0]) == FLOAT4E2M1:
            found += _check_fp4_dequantize(graph, node, label)
    return found
