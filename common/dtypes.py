"""Every dtype correspondence in one place: numpy/ml_dtypes, torch, ONNX element types (precisions: common.precision).

Heavy libraries (torch, onnx, onnx_ir) are imported inside the functions that need them, so the
runtime can use the numpy side without them.
"""

from __future__ import annotations

import numpy as np

# onnx.TensorProto element types of the graph I/O dtypes the manifest records (numpy names).
ONNX_ELEMENT_TYPE = {"float32": 1, "int64": 7, "float16": 10, "bfloat16": 16}


def numpy_of_onnx(data_type: int) -> np.dtype:
    """The numpy dtype of an onnx.TensorProto element type; bf16 and fp8 through ml_dtypes (numpy has neither)."""
    import ml_dtypes
    from onnx import TensorProto, helper

    special = {
        TensorProto.BFLOAT16: ml_dtypes.bfloat16,
        TensorProto.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
        TensorProto.FLOAT8E5M2: ml_dtypes.float8_e5m2,
    }
    if data_type in special:
        return np.dtype(special[data_type])
    return helper.tensor_dtype_to_np_dtype(data_type)


def numpy_view(tensor) -> np.ndarray:
    """A CPU torch tensor as a numpy array without a copy; bf16/fp8 reinterpreted through ml_dtypes."""
    import ml_dtypes
    import torch

    tensor = tensor.detach().contiguous()
    special = {
        torch.bfloat16: (torch.uint16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if tensor.dtype in special:
        carrier, dtype = special[tensor.dtype]
        return tensor.view(carrier).numpy().view(np.dtype(dtype))
    return tensor.numpy()


def torch_of_ir() -> dict:
    """onnx_ir.DataType -> torch dtype, for the element types the exporter writes."""
    import onnx_ir as ir
    import torch

    return {
        ir.DataType.FLOAT: torch.float32,
        ir.DataType.FLOAT16: torch.float16,
        ir.DataType.BFLOAT16: torch.bfloat16,
        ir.DataType.FLOAT8E4M3FN: torch.float8_e4m3fn,
        ir.DataType.FLOAT8E5M2: torch.float8_e5m2,
        ir.DataType.DOUBLE: torch.float64,
        ir.DataType.INT64: torch.int64,
        ir.DataType.INT32: torch.int32,
        ir.DataType.BOOL: torch.bool,
    }
