"""The float32 twin of a bf16, FP8 or NVFP4 graph: what ONNX Runtime's CPU provider can run.

ONNX Runtime's CPU provider has no bf16 kernels, no FP4 `DequantizeLinear` and no TensorRT
operators. The twin is the same graph with

- every bf16 tensor, Cast target and constant turned into float32 (bf16 values are exact in float32);
- FP8 Q/DQ kept as it is (ONNX Runtime runs FLOAT8E4M3FN QuantizeLinear/DequantizeLinear);
- each NVFP4 weight (`DequantizeLinear(FLOAT4E2M1 codes, DequantizeLinear(E4M3 scales, global))`)
  replaced by the float32 weight that chain computes, bit for bit (`common.nvfp4.dequantize`);
- each `trt::TRT_FP4DynamicQuantize` and its two DequantizeLinears replaced by the same fake
  quantization in standard operators: per block of 16 along the last axis, scale amax / 6 / global
  rounded to E4M3 (a Cast), values rounded to the E2M1 grid (Round, ties to even, at three
  spacings) and multiplied back.

Its error against fp32 PyTorch is the quantization error alone; the bf16 graph adds bf16 rounding
on top. It is made where it is needed (the export's check, the CPU runtime) and never shipped: a
float32 twin of the 32B transformer would be 128 GB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import nvfp4
from common.external_data import TensorReader, copy_with_external_data

TRT_DOMAIN = "trt"
DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"


def fp32_twin(source: Path, target: Path) -> None:
    """Write the float32 twin of the graph at `source` to `target` (+ `.data`)."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    reader = TensorReader(Path(source).parent)
    weights = _fold_fp4_weights(model, reader)
    _decompose_dynamic_quantize(model)
    _widen(model)

    def transform(tensor, tensors: TensorReader):
        from onnx import TensorProto, numpy_helper

        if tensor.name in weights:
            values = weights.pop(tensor.name)()
            if not tensor.external_data:
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
                return None
            tensor.data_type = TensorProto.FLOAT
            return values
        if tensor.data_type != TensorProto.BFLOAT16:
            return None
        values = tensors.array(tensor).astype(np.float32)
        if not tensor.external_data:
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
            return None
        tensor.data_type = TensorProto.FLOAT
        return values

    copy_with_external_data(model, Path(source).parent, target, transform)


def _widen(model) -> None:
    from onnx import AttributeProto, TensorProto, numpy_helper

    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT

    def widen_tensor_proto(tensor):  # an inline tensor (node attribute)
        if tensor.data_type != bf16:
            return
        array = numpy_helper.to_array(tensor).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype", "output_dtype") and attr.type == AttributeProto.INT and attr.i == bf16:
                attr.i = f32
            elif attr.type == AttributeProto.TENSOR:
                widen_tensor_proto(attr.t)
            elif attr.type == AttributeProto.TENSORS:
                for tensor in attr.tensors:
                    widen_tensor_proto(tensor)
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32


def _fold_fp4_weights(model, reader: TensorReader) -> dict:
    """Replace each FP4 weight chain by a float32 initializer; {its name: a function giving its values}."""
    from onnx import TensorProto

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    dropped_nodes, dropped_tensors, weights = set(), set(), {}
    for node in model.graph.node:
        codes = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is None or codes.data_type != TensorProto.FLOAT4E2M1:
            continue
        scale_node = producers.get(node.input[1])
        if scale_node is None or scale_node.op_type != "DequantizeLinear":
            raise ValueError(f"FP4 weight {codes.name}: its scale is not a DequantizeLinear of E4M3 block scales")
        scales, global_scale = initializers[scale_node.input[0]], initializers[scale_node.input[1]]
        shape = tuple(codes.dims)
        codes_copy, scales_copy, global_copy = (TensorProto(), TensorProto(), TensorProto())
        codes_copy.CopyFrom(codes)
        scales_copy.CopyFrom(scales)
        global_copy.CopyFrom(global_scale)

        def values(codes=codes_copy, scales=scales_copy, global_scale=global_copy, shape=shape):
            packed = reader.packed(codes).reshape(shape[0], shape[1] // 2)
            tensor = nvfp4.Nvfp4Tensor(packed, reader.array(scales), np.float32(reader.array(global_scale)))
            return nvfp4.dequantize(tensor)

        weights[node.output[0]] = values
        dropped_nodes |= {node.name, scale_node.name}
        dropped_tensors.add(scales.name)
        codes.name = node.output[0]  # the tensor's slot now holds the float32 weight
        codes.data_type = TensorProto.FLOAT
    users = {name for node in model.graph.node if node.name not in dropped_nodes for name in node.input}
    kept = [t for t in model.graph.initializer if not (t.name in dropped_tensors and t.name not in users)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = [n for n in model.graph.node if n.name not in dropped_nodes]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return weights


def _decompose_dynamic_quantize(model) -> None:
    """Each TRT_FP4DynamicQuantize -> DQ(scales) -> DQ(values) chain becomes standard operators."""
    consumers: dict = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced, inserted, constants = set(), {}, False
    for node in model.graph.node:
        if node.op_type != DYNAMIC_QUANTIZE or node.domain != TRT_DOMAIN:
            continue
        values_out, scales_out = node.output
        (scale_dq,) = consumers[scales_out]
        (value_dq,) = consumers[values_out]
        if scale_dq.op_type != "DequantizeLinear" or value_dq.op_type != "DequantizeLinear":
            raise ValueError(
                f"{node.name}: expected DequantizeLinear consumers, got {scale_dq.op_type}, {value_dq.op_type}"
            )
        replaced |= {node.name, scale_dq.name, value_dq.name}
        inserted[node.name] = _fake_quantize_nodes(node.name, node.input[0], node.input[1], value_dq.output[0])
        constants = True
    if not replaced:
        return
    nodes = []
    for node in model.graph.node:
        nodes.extend(inserted.get(node.name, ()))
        if node.name not in replaced:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if constants:
        model.graph.initializer.extend(_constants())
    kept = [o for o in model.opset_import if o.domain != TRT_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


_C = "nvfp4_twin."  # the constants the decomposition shares


def _constants():
    from onnx import numpy_helper

    values = {
        "block_shape": np.array([-1, nvfp4.BLOCK], np.int64),
        "last_axis": np.array([1], np.int64),
        "six": np.float32(nvfp4.E2M1_MAX),
        "e4m3_max": np.float32(nvfp4.E4M3_MAX),
        "zero": np.float32(0.0),
        "half": np.float32(0.5),
        "two": np.float32(2.0),
        "four": np.float32(4.0),
    }
    return [numpy_helper.from_array(np.asarray(v), _C + k) for k, v in values.items()]


def _fake_quantize_nodes(name: str, x: str, global_scale: str, y: str) -> list:
    """Standard operators computing `y` = NVFP4 fake quantization of `x` (common.nvfp4.fake_quantize)."""
    from onnx import TensorProto, helper

    steps = []

    def op(op_type, inputs, **attributes):
        output = f"{name}/twin/{len(steps)}_{op_type}"
        steps.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    c = {k: _C + k for k in ("block_shape", "last_axis", "six", "e4m3_max", "zero", "half", "two", "four")}
    x32 = op("Cast", [x], to=TensorProto.FLOAT)
    blocks = op("Reshape", [x32, c["block_shape"]])  # [blocks, 16]
    amax = op("ReduceMax", [op("Abs", [blocks]), c["last_axis"]], keepdims=1)
    wanted = op("Min", [op("Div", [op("Div", [amax, c["six"]]), global_scale]), c["e4m3_max"]])
    e4m3 = op("Cast", [op("Cast", [wanted], to=TensorProto.FLOAT8E4M3FN)], to=TensorProto.FLOAT)
    scale = op("Mul", [e4m3, global_scale])  # float32(e4m3) * global, as DequantizeLinear rounds it
    zero_scale = op("Equal", [scale, c["zero"]])
    scaled = op("Where", [zero_scale, c["zero"], op("Div", [blocks, scale])])
    magnitude = op("Min", [op("Abs", [scaled]), c["six"]])
    # E2M1's grid: steps of 0.5 below 2, of 1 from 2 to 4, of 2 from 4 to 6; Round is ties-to-even,
    # which is E2M1's tie rule at each spacing (the even neighbour has the zero mantissa bit).
    fine = op("Mul", [op("Round", [op("Mul", [magnitude, c["two"]])]), c["half"]])
    middle = op("Round", [magnitude])
    coarse = op("Mul", [op("Round", [op("Mul", [magnitude, c["half"]])]), c["two"]])
    rounded = op(
        "Where",
        [op("Less", [magnitude, c["two"]]), fine, op("Where", [op("Less", [magnitude, c["four"]]), middle, coarse])],
    )
    blocks_back = op("Mul", [op("Mul", [rounded, op("Sign", [scaled])]), scale])
    steps.append(helper.make_node("Reshape", [blocks_back, op("Shape", [x])], [y], name=f"{name}/twin/reshape_back"))
    return steps


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ONNX Runtime's extended optimisations fuse Q/DQ + MatMul into MatMulIntegerToFloat, which has
    # no float8 kernel ("Type 'tensor(float8e4m3fn)' ... is invalid"): keep the basic level.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
