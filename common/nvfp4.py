"""NVFP4, the numbers: 4-bit E2M1 values in blocks of 16, each block scaled by an FP8 E4M3 factor,
the whole tensor by one float32 global scale (docs/nvfp4.md).

    value = e2m1(code) * (float32(e4m3 block scale) * global_scale)

This is the order ONNX computes it in: `DequantizeLinear(block scales, global scale)` gives the
float32 block scale (one rounding), `DequantizeLinear(codes, that, block_size=16)` the value (a
second). `dequantize` here rounds the same way, so a weight read back from a graph equals this
module's result bit for bit.

One layout is canonical inside the project, ONNX's: `codes` uint8 [N, K/2] with element 2j of a row
in the LOW nibble and 2j+1 in the high one (ONNX packs 4-bit types so), `block_scales` float8_e4m3fn
[N, K/16] in plain row-major order, `global_scale` float32. Other layouts (the published FLUX.2
NVFP4 file: even element in the high nibble, block scales in cuBLAS' 128x4 tiles) are converted to
this one where they are read, and nowhere else.

Scales follow NVIDIA's recipe: global = amax / (6 * 448), so every block scale amax_block / 6 /
global fits E4M3 (<= 448); the published file's `weight_scale_2` and `input_scale` are such global
scales (amax / 2688).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 16  # elements sharing one E4M3 scale, along the reduction axis (K)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# code -> value; bit 3 is the sign. The order E2M1's 4 bits give (0, 0.5, 1, 1.5, 2, 3, 4, 6).
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
_ROWS_ELEMENTS = 1 << 22  # rows quantized at once: ~16 MiB of float32 temporaries per copy


@dataclass(frozen=True)
class Nvfp4Tensor:
    """One NVFP4 weight [N, K] in the canonical (ONNX) layout."""

    codes: np.ndarray  # uint8 [N, K/2]: element 2j in the low nibble
    block_scales: np.ndarray  # float8_e4m3fn [N, K/16]
    global_scale: np.float32

    @property
    def shape(self) -> tuple[int, int]:
        rows, half = self.codes.shape
        return rows, 2 * half


def global_scale(amax: float) -> np.float32:
    """amax / (6 * 448): the largest block then scales by exactly 448. 1 for an all-zero tensor."""
    return np.float32(float(amax) / (E2M1_MAX * E4M3_MAX)) if amax > 0 else np.float32(1.0)


def check_shape(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 2 or shape[1] % BLOCK:
        raise ValueError(f"{what}: NVFP4 needs a 2-d weight whose last axis is a multiple of {BLOCK}, got {shape}")


def e2m1_codes(values: np.ndarray) -> np.ndarray:
    """Round float32 values to E2M1 (nearest, ties to even, saturating at +-6); their 4-bit codes as uint8."""
    import ml_dtypes

    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F


def pack(codes: np.ndarray) -> np.ndarray:
    """[..., K] 4-bit codes -> [..., K/2] bytes, element 2j low (ONNX's order)."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    """[..., K/2] bytes -> [..., K] 4-bit codes (ONNX's order)."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def scales_float32(block_scales: np.ndarray, global_scale_value) -> np.ndarray:
    """The float32 scale of each block: float32(e4m3) * global, rounded once (ONNX's first DequantizeLinear)."""
    return block_scales.astype(np.float32) * np.float32(global_scale_value)


def block_scales_for(blocks_amax: np.ndarray, global_scale_value) -> np.ndarray:
    """E4M3 block scales amax / 6 / global, saturated at 448 (E4M3 has no infinity: a cast past it is NaN)."""
    import ml_dtypes

    wanted = blocks_amax.astype(np.float32) / np.float32(E2M1_MAX) / np.float32(global_scale_value)
    return np.minimum(wanted, np.float32(E4M3_MAX)).astype(ml_dtypes.float8_e4m3fn)


def quantize_blocks(blocks: np.ndarray, global_scale_value) -> tuple[np.ndarray, np.ndarray]:
    """[..., K/16, 16] float32 -> (4-bit codes [..., K/16, 16], E4M3 scales [..., K/16])."""
    scales = block_scales_for(np.abs(blocks).max(axis=-1), global_scale_value)
    divisor = scales_float32(scales, global_scale_value)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(divisor > 0, blocks / divisor, np.float32(0.0))
    return e2m1_codes(scaled), scales


def quantize(weight: np.ndarray, global_scale_value=None) -> Nvfp4Tensor:
    """A [N, K] weight in NVFP4 (global scale from its amax unless given); rows are done a slice at a time."""
    check_shape(tuple(weight.shape), "quantize")
    rows, columns = weight.shape
    if global_scale_value is None:
        global_scale_value = global_scale(_abs_max(weight))
    global_scale_value = np.float32(global_scale_value)
    import ml_dtypes

    codes = np.empty((rows, columns // 2), dtype=np.uint8)
    block_scales = np.empty((rows, columns // BLOCK), dtype=ml_dtypes.float8_e4m3fn)
    step = max(1, _ROWS_ELEMENTS // columns)
    for start in range(0, rows, step):
        part = np.asarray(weight[start : start + step], dtype=np.float32).reshape(-1, columns // BLOCK, BLOCK)
        part_codes, part_scales = quantize_blocks(part, global_scale_value)
        codes[start : start + step] = pack(part_codes.reshape(part.shape[0], columns))
        block_scales[start : start + step] = part_scales
    return Nvfp4Tensor(codes, block_scales, global_scale_value)


def dequantize(tensor: Nvfp4Tensor) -> np.ndarray:
    """The float32 [N, K] weight the ONNX DequantizeLinear pair computes from `tensor`."""
    rows, columns = tensor.shape
    values = E2M1_VALUES[unpack(tensor.codes)].reshape(rows, columns // BLOCK, BLOCK)
    return (values * scales_float32(tensor.block_scales, tensor.global_scale)[..., None]).reshape(rows, columns)


def fake_quantize(values: np.ndarray, global_scale_value) -> np.ndarray:
    """Activations through NVFP4 and back along the last axis, as `trt::TRT_FP4DynamicQuantize` and
    its two DequantizeLinears compute them: per block of 16, scale amax / 6 / global in E4M3."""
    values = np.asarray(values, dtype=np.float32)
    blocks = values.reshape(values.shape[:-1] + (values.shape[-1] // BLOCK, BLOCK))
    codes, scales = quantize_blocks(blocks, global_scale_value)
    return (E2M1_VALUES[codes] * scales_float32(scales, global_scale_value)[..., None]).reshape(values.shape)


def _abs_max(values: np.ndarray) -> float:
    flat = values.reshape(-1)
    return max(
        (
            float(np.abs(np.asarray(flat[i : i + _ROWS_ELEMENTS], dtype=np.float32)).max())
            for i in range(0, flat.size, _ROWS_ELEMENTS)
        ),
        default=0.0,
    )
