"""Hand-made NVFP4 graphs in the form the export writes (engines/nvfp4_qdq.py describes it), for the
engine tests: x bf16 [1, tokens, K] through one or more NVFP4 linears [K -> N], opset 23."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from common import nvfp4
from common.specs import TensorSpec

OPSET = [helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)]


def _linear(prefix: str, x: str, weight: np.ndarray, input_global: float, block_size: int = 16):
    """Nodes, initializers and value_info of `x @ weight.T` with NVFP4 weight and activation; its output name."""
    n, k = weight.shape
    q = nvfp4.quantize(weight)
    names = {s: f"{prefix}.{s}" for s in ("w_fp4", "w_scale", "w_global", "x_global", "x_fp4", "x_scale")}
    initializers = [
        helper.make_tensor(names["w_fp4"], TensorProto.FLOAT4E2M1, [n, k], q.codes.tobytes(), raw=True),
        helper.make_tensor(
            names["w_scale"], TensorProto.FLOAT8E4M3FN, [n, k // 16], q.block_scales.view(np.uint8).tobytes(), raw=True
        ),
        helper.make_tensor(names["w_global"], TensorProto.FLOAT, [], [float(q.global_scale)]),
        helper.make_tensor(names["x_global"], TensorProto.FLOAT, [], [input_global]),
    ]
    out = f"{prefix}.out"
    nodes = [
        helper.make_node("DequantizeLinear", [names["w_scale"], names["w_global"]], [f"{prefix}.S_w"],
                         name=f"{prefix}.weight_scale/DequantizeLinear"),
        helper.make_node("DequantizeLinear", [names["w_fp4"], f"{prefix}.S_w"], [f"{prefix}.W"], axis=1,
                         block_size=block_size, name=f"{prefix}.weight/DequantizeLinear"),
        helper.make_node("Transpose", [f"{prefix}.W"], [f"{prefix}.W_t"], perm=[1, 0], name=f"{prefix}.weight/Transpose"),
        helper.make_node("Cast", [f"{prefix}.W_t"], [f"{prefix}.B"], to=TensorProto.BFLOAT16, name=f"{prefix}.weight/Cast"),
        helper.make_node("TRT_FP4DynamicQuantize", [x, names["x_global"]], [names["x_fp4"], names["x_scale"]],
                         domain="trt", axis=-1, block_size=16, scale_type=TensorProto.FLOAT8E4M3FN,
                         name=f"{prefix}.input_nvfp4/TRT_FP4DynamicQuantize"),
        helper.make_node("DequantizeLinear", [names["x_scale"], names["x_global"]], [f"{prefix}.S_x"],
                         name=f"{prefix}.input_nvfp4/scale/DequantizeLinear"),
        helper.make_node("DequantizeLinear", [names["x_fp4"], f"{prefix}.S_x"], [f"{prefix}.X"], axis=-1,
                         block_size=16, name=f"{prefix}.input_nvfp4/DequantizeLinear"),
        helper.make_node("Cast", [f"{prefix}.X"], [f"{prefix}.A"], to=TensorProto.BFLOAT16, name=f"{prefix}.input_nvfp4/Cast"),
        helper.make_node("MatMul", [f"{prefix}.A", f"{prefix}.B"], [out], name=f"{prefix}/MatMul"),
    ]  # fmt: skip
    return nodes, initializers, (names["x_fp4"], names["x_scale"]), out


def nvfp4_model(tokens: int = 32, dims=(64, 32), block_size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x [1, tokens, dims[0]] -> linears dims[0] -> dims[1] -> ... -> y, each NVFP4 (one per step of `dims`)."""
    rng = np.random.default_rng(seed)
    nodes, initializers, value_info, x = [], [], [], "x"
    for index, (k, n) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        weight = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
        more, tensors, (x_fp4, x_scale), x_next = _linear(f"linear{index}", x, weight, 4.0 / 2688, block_size)
        nodes += more
        initializers += tensors
        # Shape inference knows no trt:: operator: the export declares its two outputs.
        value_info += [
            helper.make_tensor_value_info(x_fp4, TensorProto.FLOAT4E2M1, [1, tokens, k]),
            helper.make_tensor_value_info(x_scale, TensorProto.FLOAT8E4M3FN, [1, tokens, k // 16]),
        ]
        x = x_next
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "nvfp4", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, tokens, dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, tokens, dims[-1]])],
        initializer=initializers, value_info=value_info,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=OPSET, ir_version=11)


def specs(tokens: int = 32, dims=(64, 32)) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs as a manifest declares them."""
    return (TensorSpec("x", (1, tokens, dims[0]), "bfloat16"),), (TensorSpec("y", (1, tokens, dims[-1]), "bfloat16"),)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def layers_report(component: str, linears: int, kept: int = 0) -> dict:
    """reports/nvfp4_layers.json as the export writes it, for `linears` NVFP4 and `kept` bf16 linears."""
    layers = [{"path": f"linear{i}", "precision": "nvfp4"} for i in range(linears)]
    layers += [{"path": f"kept{i}", "precision": "bf16"} for i in range(kept)]
    return {component: {"exclude": [], "counts": {"nvfp4": linears, "bf16": kept}, "calibration": {}, "layers": layers}}
