"""export.nvfp4.reference: NVFP4 fake quantization in PyTorch, and the export's check against it."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch

from common import nvfp4
from common.errors import VerificationError
from export.nvfp4 import reference
from export.nvfp4.reference import LayerQuant, apply_nvfp4, fake_quantize, layers_from_graph
from export.verify.fake_quant import NVFP4_METHOD, NVFP4_TOLERANCE


def _activations(seed: int = 0) -> np.ndarray:
    """[4, 64, 256] float32 over many magnitudes, with all-zero, subnormal and exact-tie blocks."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((4, 64, 256)) * np.exp(rng.uniform(-12, 8, (4, 64, 1)))
    values[0, 0, :16] = 0.0
    values[0, 1, :16] *= 1e-38
    values[0, 2, :16] = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -0.0]
    return values.astype(np.float32)


def _bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("relative", [1.0, 1 / 64, 1e4])  # 1/64: blocks saturate at E4M3 448 and E2M1 6
def test_torch_fake_quantize_is_numpy_bit_for_bit_with_a_static_global(relative):
    x = _activations()
    static = np.float32(nvfp4.global_scale(np.abs(x).max()) * relative)
    expected = nvfp4.fake_quantize(x, static)
    actual = fake_quantize(torch.from_numpy(x), float(static)).numpy()
    assert np.array_equal(_bits(actual), _bits(expected))
    if relative < 1:
        assert np.abs(actual).max() == pytest.approx(6 * 448 * float(static), rel=1e-6)


def test_torch_fake_quantize_is_numpy_bit_for_bit_with_a_dynamic_global():
    for seed in range(3):
        x = _activations(seed)
        expected = nvfp4.fake_quantize(x, nvfp4.global_scale(np.abs(x).max()))
        actual = fake_quantize(torch.from_numpy(x), None).numpy()
        assert np.array_equal(_bits(actual), _bits(expected)), seed
    zeros = fake_quantize(torch.zeros(2, 32), None)  # global 1: no division by zero
    assert torch.equal(zeros, torch.zeros(2, 32))


def test_ties_round_to_the_even_e2m1_value():
    x = torch.tensor([[6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0]])
    got = fake_quantize(x, 1 / 448).numpy()  # block scale 6 / 6 / (1/448) -> 448, times 1/448: exactly 1
    assert got.tolist() == [[6, 0, 1, 1, 2, 2, 4, 4, -0, -1, -1, -2, -2, -4, -4, 0]]
    assert np.array_equal(got, np.asarray(x, np.float32).astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


def _linear_and_quant(input_scale):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    weight = nvfp4.quantize(linear.weight.detach().numpy())
    return torch.nn.Sequential(linear), LayerQuant(weight, input_scale)


@pytest.mark.parametrize("input_scale", [0.002, None])
def test_apply_nvfp4_computes_the_hand_written_linear_and_restores_it(input_scale):
    model, quant = _linear_and_quant(input_scale)
    x = torch.randn(3, 5, 64) * 4
    before = model(x)
    with apply_nvfp4(model, {"0": quant}):
        got = model(x).detach().numpy()
    x_np = x.numpy()
    g = nvfp4.global_scale(np.abs(x_np).max()) if input_scale is None else np.float32(input_scale)
    by_hand = nvfp4.fake_quantize(x_np, g) @ nvfp4.dequantize(quant.weight).T + model[0].bias.detach().numpy()
    np.testing.assert_allclose(got, by_hand, rtol=0, atol=1e-5)
    assert np.abs(got - before.detach().numpy()).max() > 1e-2  # 4 bits: it did change
    assert torch.equal(model(x), before)  # nn.Linear.forward is back


def test_apply_nvfp4_refuses_a_layer_it_cannot_place_and_still_restores():
    model, quant = _linear_and_quant(None)
    with pytest.raises(ValueError, match=r"'1': the transformer has no nn.Linear there"):
        with apply_nvfp4(model, {"0": quant, "1": quant}):
            pass
    assert "forward" not in vars(model[0])
    small = LayerQuant(nvfp4.quantize(np.ones((8, 64), np.float32)), None)
    with pytest.raises(ValueError, match=r"weight \(8, 64\) does not fit the linear's \(24, 64\)"):
        with apply_nvfp4(model, {"0": small}):
            pass


# ---------------------------------------------------------------------------------------------
# On the tiny nvfp4 export (the check runs inside it)


def _transformer_report(out) -> dict:
    return json.loads((out / "reports" / "export_check.json").read_text())["components"]["transformer"]


@pytest.mark.slow
def test_layers_from_graph_are_the_reported_layers(nvfp4_tiny):
    layers = layers_from_graph(nvfp4_tiny / "transformer.onnx")
    report = json.loads((nvfp4_tiny / "reports" / "nvfp4_layers.json").read_text())["transformer"]["layers"]
    quantized = {r["path"]: r for r in report if r["precision"] == "nvfp4"}
    assert set(layers) == set(quantized) and len(layers) == 28
    for path, quant in layers.items():
        assert quant.input_scale == pytest.approx(quantized[path]["input_scale"], rel=1e-7)
        assert float(quant.weight.global_scale) == pytest.approx(quantized[path]["weight_scale"], rel=1e-7)
        shape = tuple(quantized[path]["weight_shape"])  # as the bf16 graph held it: [N, K] or [K, N]
        assert quant.weight.shape in (shape, shape[::-1])


@pytest.mark.slow
def test_the_twin_matches_the_fake_quantized_module_far_closer_than_fp32(nvfp4_tiny):
    transformer = _transformer_report(nvfp4_tiny)
    part = transformer["fake_quant_reference"]
    assert part["method"] == NVFP4_METHOD and part["passed"] is True and transformer["passed"] is True
    fake_quant, fp32 = part["outputs"]["velocity"], transformer["outputs"]["velocity"]
    assert fake_quant["rel_l2"] <= NVFP4_TOLERANCE.max_rel_l2
    assert fake_quant["rel_l2"] < fp32["rel_l2"] / 3, (fake_quant, fp32)  # not the quantization error


@pytest.mark.slow
def test_a_nibble_order_error_fails_the_check(nvfp4_tiny, tiny_checkpoint, small_shapes, monkeypatch):
    """The reference reading the weights' nibbles the other way round (the published file's order) fails."""
    from common.precision import precision
    from common.specs import component_specs
    from export import checkpoint as ckpt
    from export.verify import check
    from export.verify.onnx_run import REFERENCE_EVALUATOR_MAX_BYTES
    from export.verify.reference import ReferenceInputs

    def swapped(path):
        def flip(q):
            codes = ((q.weight.codes >> 4) | (q.weight.codes << 4)).astype(np.uint8)
            return LayerQuant(nvfp4.Nvfp4Tensor(codes, q.weight.block_scales, q.weight.global_scale), q.input_scale)

        return {name: flip(q) for name, q in layers_from_graph(path).items()}

    monkeypatch.setattr(reference, "layers_from_graph", swapped)
    monkeypatch.setattr("export.fp8.twin.end_to_end", lambda *a, **k: {})  # the image is not what this tests
    checkpoint = ckpt.open_checkpoint(tiny_checkpoint)
    geometry = checkpoint.geometry()
    spec = component_specs(geometry, small_shapes)["transformer"]
    # Past the reference evaluator's size: the bf16 graph's (slow) run is not what this tests.
    traced_bytes = REFERENCE_EVALUATOR_MAX_BYTES + 1
    target = check.CheckTarget(
        nvfp4_tiny / "transformer.onnx", spec, precision("nvfp4"), traced_bytes, checkpoint, geometry, small_shapes,
        ReferenceInputs(checkpoint, geometry, small_shapes),
    )  # fmt: skip
    report = check.new_report(target.precision)
    with pytest.raises(VerificationError, match=r"fake-quant reference velocity: rel_l2"):
        check.verify_graph(target, report)
    assert report["passed"] is False
    assert report["fake_quant_reference"]["outputs"]["velocity"]["rel_l2"] > 5 * NVFP4_TOLERANCE.max_rel_l2
