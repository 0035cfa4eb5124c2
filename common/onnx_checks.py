"""Structural checks on an ONNX graph that TensorRT needs and ONNX Runtime does not enforce.

Shared by export (which refuses to write a graph that fails them) and `engines.check`.
Works on a ModelProto loaded without external data: it never touches weight bytes.
"""

from __future__ import annotations

FLOAT64 = 11  # onnx.TensorProto.DOUBLE


def _attr_tensors(node):
    from onnx import AttributeProto

    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR:
            yield attr.name, attr.t
        elif attr.type == AttributeProto.TENSORS:
            for tensor in attr.tensors:
                yield attr.name, tensor


def float64_uses(model) -> list[str]:
    """Every place a float64 tensor appears: initializers, values, Cast targets, constants."""
    graph = model.graph
    found = [f"initializer {t.name}" for t in graph.initializer if t.data_type == FLOAT64]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == FLOAT64:
            found.append(f"value {value.name}")
    for node in graph.node:
        for attr in node.attribute:
            if (
                node.op_type in ("Cast", "CastLike", "RandomNormal", "RandomUniform", "EyeLike")
                and attr.name in ("to", "dtype")
                and attr.i == FLOAT64
            ):
                found.append(f"node {node.name} ({node.op_type} to float64)")
        for name, tensor in _attr_tensors(node):
            if tensor.data_type == FLOAT64:
                found.append(f"node {node.name} ({node.op_type} attribute {name} is float64)")
    return found


def dynamic_dims(model) -> list[str]:
    """Graph inputs/outputs with a symbolic or unknown dimension."""
    found = []
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                label = dim.dim_param or "?"
                found.append(f"{value.name} axis {axis} is {label!r}")
    return found


def external_data_files(model) -> set[str]:
    """The external-data file names the initializers point to."""
    files = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(entry.value)
    return files


# Where a reduced-precision graph may compute a matrix multiply in float32 on purpose. None since
# issue 21: the fp16 transformer's attention (Q K^T and P V) was float32 until then and is float16
# now, V scaled per channel into range (export/graphs/fp16_linear.py, docs/export.md "fp16 past
# 65504"). A float32 product in an fp16/bf16 graph is an exporter bug, refused at export.
FLOAT32_MATMUL_SCOPES: tuple[str, ...] = ()
FLOAT = 1  # onnx.TensorProto.FLOAT


def float32_matmuls(model) -> list[tuple[str, str]]:
    """(node name, module scope) of every MatMul/Gemm whose output is float32, by ONNX shape inference.

    `model` is loaded without external data; inference reads no weight bytes.
    """
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    found = []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and types.get(node.output[0]) == FLOAT:
            meta = {p.key: p.value for p in node.metadata_props}
            found.append((node.name, meta.get("pkg.torch.onnx.name_scopes", "")))
    return found
