"""common.nvfp4: the E2M1 grid, the packing, the two-level scales (docs/nvfp4.md)."""

import ml_dtypes
import numpy as np
import pytest

from common import nvfp4


def test_e2m1_rounds_to_nearest_even_and_saturates():
    values = np.array([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 1e9, -0.75, -5.0], np.float32)
    got = nvfp4.E2M1_VALUES[nvfp4.e2m1_codes(values)]
    want = np.array([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -1.0, -4.0], np.float32)
    assert np.array_equal(got, want)


def test_pack_puts_the_even_element_in_the_low_nibble():
    codes = np.array([[0x1, 0xF, 0x7, 0x8]], np.uint8)
    packed = nvfp4.pack(codes)
    assert packed.tolist() == [[0xF1, 0x87]]
    assert np.array_equal(nvfp4.unpack(packed), codes)


def test_quantize_bounds_every_block_and_dequantize_is_the_onnx_order():
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((48, 64)) * np.logspace(-3, 2, 64)).astype(np.float32)
    tensor = nvfp4.quantize(weight)
    assert tensor.codes.shape == (48, 32) and tensor.block_scales.shape == (48, 4)
    assert tensor.global_scale == np.float32(np.abs(weight).max() / 2688)
    assert float(tensor.block_scales.astype(np.float32).max()) == 448.0  # the largest block uses E4M3's top
    back = nvfp4.dequantize(tensor)
    # Per block the error is at most half a step of the largest E2M1 spacing (2 of 6) times the scale.
    blocks = weight.reshape(48, 4, 16)
    step = np.abs(blocks).max(-1, keepdims=True) / 6.0 * 1.0625  # E4M3 rounds the scale by <= 1/16
    assert np.all(np.abs(back.reshape(48, 4, 16) - blocks) <= step + 1e-12)
    rel = np.linalg.norm(back - weight) / np.linalg.norm(weight)
    assert 0.02 < rel < 0.12, rel  # 4 bits: a few percent, not zero and not garbage
    by_hand = (
        nvfp4.E2M1_VALUES[nvfp4.unpack(tensor.codes)].reshape(48, 4, 16)
        * (tensor.block_scales.astype(np.float32) * tensor.global_scale)[..., None]
    )
    assert np.array_equal(back, by_hand.reshape(48, 64))


def test_fake_quantize_of_activations_is_the_weight_rule_per_block():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((2, 5, 32)).astype(np.float32) * 40
    scale = nvfp4.global_scale(np.abs(values).max())
    weight_rule = nvfp4.dequantize(nvfp4.quantize(values.reshape(10, 32), scale)).reshape(values.shape)
    assert np.array_equal(nvfp4.fake_quantize(values, scale), weight_rule)


def test_block_scales_saturate_instead_of_becoming_nan():
    # A global scale calibrated too small: E4M3 has no infinity, a plain cast would give NaN.
    scales = nvfp4.block_scales_for(np.array([1e6], np.float32), np.float32(1e-3))
    assert scales.dtype == ml_dtypes.float8_e4m3fn and float(scales.astype(np.float32)[0]) == 448.0


def test_a_weight_that_is_not_in_blocks_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(np.zeros((4, 24), np.float32))
