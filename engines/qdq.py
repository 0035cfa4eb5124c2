"""FP8 Q/DQ structure TensorRT's strongly typed build expects, checked without weight bytes.

TensorRT builds FP8 from explicit quantization (onnx-tensorrt's operators list: QuantizeLinear
and DequantizeLinear, zero points must be zero; FP8 only through Q/DQ from a wider float type).
What FLUX.2's recipe writes, and what is checked here:

- activations: QuantizeLinear -> DequantizeLinear, the quantized tensor FLOAT8E4M3FN (zero point of
  that type, or opset 21's `output_dtype`), a per-tensor (scalar) scale, consumed only by DQ;
- weights: DequantizeLinear whose input is a FLOAT8E4M3FN initializer, with a scalar scale.
"""

from __future__ import annotations

from engines.graph_checks import Finding, Graph, node_label, type_name

FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN


def _is_scalar(graph: Graph, name: str) -> bool:
    shape = graph.shapes.get(name)
    if shape is None:
        return False
    return len(shape) == 0 or (len(shape) == 1 and shape[0] == 1)


def _zero_point_is_nonzero(graph: Graph, name: str) -> bool:
    tensor = graph.constant(name)
    if tensor is None or not tensor.HasField("raw_data"):
        return False  # not readable without weights: TensorRT's parser checks it at build time
    return any(tensor.raw_data)


def _check_scale_and_zero_point(graph: Graph, node, label: str) -> list[Finding]:
    found = []
    if len(node.input) < 2 or not _is_scalar(graph, node.input[1]):
        shape = graph.shapes.get(node.input[1]) if len(node.input) > 1 else None
        found.append(
            Finding(
                "fp8 q/dq",
                label,
                f"scale {node.input[1] if len(node.input) > 1 else '(none)'!r} has shape {shape}; FP8 uses one per-tensor (scalar) scale",
            )
        )
    if len(node.input) > 2 and node.input[2]:
        zero_point = node.input[2]
        if graph.types.get(zero_point) != FLOAT8E4M3FN:
            found.append(Finding("fp8 q/dq", label, f"zero point {zero_point!r} is not FLOAT8E4M3FN"))
        elif _zero_point_is_nonzero(graph, zero_point):
            found.append(Finding("fp8 q/dq", label, f"zero point {zero_point!r} is not zero; TensorRT needs zero"))
    return found


def check_fp8_qdq(graph: Graph, table: dict) -> list[Finding]:
    import onnx

    from engines.nvfp4_qdq import nvfp4_dequantizers

    found = []
    graph_outputs = {o.name for o in graph.model.graph.output}
    nvfp4 = nvfp4_dequantizers(graph)  # engines.nvfp4_qdq checks those
    for index, node in enumerate(graph.model.graph.node):
        label = node_label(node, index)
        if node.op_type == "DequantizeLinear" and node.output[0] in nvfp4:
            continue
        if node.op_type == "QuantizeLinear":
            found += _check_scale_and_zero_point(graph, node, label)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            has_zero_point = len(node.input) > 2 and bool(node.input[2])
            if not has_zero_point and attrs.get("output_dtype", 0) != FLOAT8E4M3FN:
                found.append(
                    Finding("fp8 q/dq", label, "no FLOAT8E4M3FN zero point or output_dtype: it quantizes to uint8")
                )
            quantized = node.output[0]
            if graph.types.get(quantized, FLOAT8E4M3FN) != FLOAT8E4M3FN:
                found.append(Finding("fp8 q/dq", label, f"output {quantized!r} is not FLOAT8E4M3FN"))
            consumers = graph.consumers.get(quantized, [])
            if not consumers or quantized in graph_outputs:
                found.append(Finding("fp8 q/dq", label, f"output {quantized!r} feeds no DequantizeLinear"))
            for consumer in consumers:
                if consumer.op_type != "DequantizeLinear":
                    found.append(
                        Finding(
                            "fp8 q/dq",
                            label,
                            f"output {quantized!r} feeds {consumer.op_type} {consumer.name!r}; only DequantizeLinear may read FP8",
                        )
                    )
        elif node.op_type == "DequantizeLinear":
            found += _check_scale_and_zero_point(graph, node, label)
            source = node.input[0]
            producer = graph.producers.get(source)
            if source in graph.initializers or (producer is not None and producer.op_type == "Constant"):
                if graph.types.get(source) != FLOAT8E4M3FN:
                    found.append(
                        Finding(
                            "fp8 q/dq",
                            label,
                            f"weight {source!r} is {type_name(graph.types.get(source, 0))}, not a FLOAT8E4M3FN initializer",
                        )
                    )
            elif producer is None or producer.op_type != "QuantizeLinear":
                found.append(
                    Finding(
                        "fp8 q/dq",
                        label,
                        f"input {source!r} comes from neither a QuantizeLinear nor an FP8 initializer",
                    )
                )
    return found
