"""The FP8 Q/DQ rewrite on a toy graph: exact E4M3 semantics, structure, and where layers are kept bf16."""

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from common.cpu_twin import fp32_twin, ort_session
from common.metrics import psnr
from common.specs import ComponentSpec, TensorSpec
from export.fp8.rewrite import (
    DEFAULT_TRANSFORMER_EXCLUDE,
    audit_qdq,
    find_linear_uses,
    plan_precisions,
    quantize_graph,
    weight_bytes,
)
from export.verify.onnx_run import compare, run_graph
from export.writing.trace import export_graph


class Toy(nn.Module):
    """Two linears as FLUX.2 uses them: bf16 inside, float32 at the graph boundary."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(64, 48, bias=False)
        self.proj_out = nn.Linear(48, 16, bias=True)

    def forward(self, x):
        hidden = torch.nn.functional.gelu(self.body(x.to(self.body.weight.dtype)))
        return self.proj_out(hidden).float()


SPEC = ComponentSpec("toy", (TensorSpec("x", (1, 8, 64), "float32"),), (TensorSpec("y", (1, 8, 16), "float32"),))


def _export_toy(folder, optimize=True):
    module = Toy().to(torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1)) * 3
    path = folder / "toy.onnx"
    if optimize:
        export_graph(module, [x], SPEC, path)
    else:  # the raw graph: weights by parameter path, Transpose nodes between them and the MatMul
        program = torch.onnx.export(module, (x,), dynamo=True, optimize=False, input_names=["x"], output_names=["y"])
        program.save(str(path), external_data=True)
    return module, x, path


def _fp8(values: torch.Tensor, scale: float) -> torch.Tensor:
    """E4M3 quantize-dequantize with torch's own float8 type: an implementation independent of ml_dtypes."""
    return (values.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _bf16_scale(amax: float) -> float:
    return float(torch.tensor(amax / 448.0).to(torch.bfloat16).float())


@pytest.mark.parametrize("optimize", [True, False])
def test_qdq_linear_computes_e4m3_exactly(tmp_path, optimize):
    module, x, bf16_path = _export_toy(tmp_path, optimize)
    model = onnx.load(str(bf16_path), load_external_data=False)
    assert sorted({use.path for use in find_linear_uses(model)}) == ["body", "proj_out"]
    amax = {"body": float(x.abs().max()), "proj_out": 1.0}
    fp8_path = tmp_path / "fp8" / "toy.onnx"
    fp8_path.parent.mkdir()
    records = quantize_graph(bf16_path, fp8_path, input_amax=amax, exclude=("proj_out",))
    assert {r.path: r.precision for r in records} == {"body": "fp8", "proj_out": "bf16"}

    audit = audit_qdq(onnx.load(str(fp8_path), load_external_data=False))
    assert (audit["body"]["weight_dq_fp8"], audit["body"]["activation_qdq"]) == (1, 1)
    assert (audit["proj_out"]["weight_dq_fp8"], audit["proj_out"]["activation_qdq"]) == (0, 0)
    assert audit["proj_out"]["weight_dtype"] == "bfloat16"
    # Every type entry names a value of the graph: a renamed weight's entry follows it.
    written = onnx.load(str(fp8_path), load_external_data=False)
    values = {t.name for t in written.graph.initializer} | {out for node in written.graph.node for out in node.output}
    assert {info.name for info in written.graph.value_info} <= values

    # The FP8 initializer holds exactly torch's E4M3 rounding of the bf16 weight.
    weight = module.body.weight.detach().float()  # bf16 values, [out, in]
    weight_scale = _bf16_scale(float(weight.abs().max()))
    loaded = onnx.load(str(fp8_path))
    (stored,) = [t for t in loaded.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN and t.dims]
    stored_values = np.frombuffer(stored.raw_data, dtype=ml_dtypes.float8_e4m3fn).astype(np.float32)
    stored_values = stored_values.reshape(tuple(stored.dims))
    if tuple(stored.dims) == (64, 48):  # the optimizer pre-transposes weights to [in, out]
        stored_values = stored_values.T
    expected_codes = (weight / weight_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(stored_values, expected_codes)

    # The fp32 twin in ONNX Runtime computes Q/DQ(x) @ Q/DQ(W)^T, then the bf16-weight proj_out.
    twin = tmp_path / "twin" / "toy.onnx"
    twin.parent.mkdir()
    fp32_twin(fp8_path, twin)
    (got,) = ort_session(twin).run(None, {"x": x.numpy()})
    hidden = torch.nn.functional.gelu(_fp8(x, _bf16_scale(amax["body"])) @ _fp8(weight, weight_scale).T)
    want = (hidden @ module.proj_out.weight.float().T + module.proj_out.bias.float()).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    # ... which really is FP8: a few percent from the unquantized layer, as E4M3's 3 mantissa bits give.
    exact = module.float()(x).detach().numpy()
    assert 5e-3 < compare(got, exact)["rel_l2"] < 8e-2
    # The bf16 graph itself (onnx's reference evaluator) agrees with the twin to bf16 rounding.
    bf16_run = run_graph(fp8_path, {"x": x.numpy()}, "onnx-reference-evaluator")["y"]
    assert compare(bf16_run, got)["rel_l2"] < 2e-2


def test_saturating_scale_is_visible(tmp_path):
    """The check must be able to fail: an amax 64x too small clips activations and the error jumps."""
    module, x, bf16_path = _export_toy(tmp_path)
    exact = module.float()(x).detach().numpy()
    errors = []
    for factor in (1.0, 1 / 64):
        out = tmp_path / f"f{factor}" / "toy.onnx"
        out.parent.mkdir()
        quantize_graph(bf16_path, out, input_amax={"body": float(x.abs().max()) * factor}, exclude=("proj_out",))
        fp32_twin(out, out.with_name("twin.onnx"))
        (got,) = ort_session(out.with_name("twin.onnx")).run(None, {"x": x.numpy()})
        errors.append(compare(got, exact)["rel_l2"])
    assert errors[1] > 5 * errors[0], errors


def test_missing_amax_is_an_error(tmp_path):
    from export.fp8.rewrite import Fp8GraphError

    _, _, bf16_path = _export_toy(tmp_path)
    with pytest.raises(Fp8GraphError, match="no calibrated input amax.*body"):
        quantize_graph(bf16_path, tmp_path / "out.onnx", input_amax={}, exclude=("proj_out",))


def test_default_exclusions_follow_nvidia_recipe(tiny_checkpoint):
    from export.checkpoint import load_transformer, open_checkpoint

    model = load_transformer(open_checkpoint(tiny_checkpoint), torch.float32)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = plan_precisions(linears, DEFAULT_TRANSFORMER_EXCLUDE)
    kept = sorted(name for name, precision in plan.items() if precision == "bf16")
    assert kept == sorted(
        [
            "context_embedder",
            "double_stream_modulation_img.linear",
            "double_stream_modulation_txt.linear",
            "norm_out.linear",
            "proj_out",
            "single_stream_modulation.linear",
            "time_guidance_embed.guidance_embedder.linear_1",
            "time_guidance_embed.guidance_embedder.linear_2",
            "time_guidance_embed.timestep_embedder.linear_1",
            "time_guidance_embed.timestep_embedder.linear_2",
            "x_embedder",
        ]
    )
    assert all(plan[name] == "fp8" for name in linears if ".attn." in name or ".ff" in name)


def test_full_flux2_dev_weights_halve():
    """FLUX.2 [dev]'s real config (diffusers' defaults), built on the meta device: FP8 bytes <= 0.55 x bf16."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel()
    sizes = weight_bytes(model, DEFAULT_TRANSFORMER_EXCLUDE)
    assert 32.0e9 < sizes["params"] < 32.5e9
    assert sizes["ratio"] <= 0.55, sizes
    assert weight_bytes(model, ())["ratio"] == pytest.approx(0.5, abs=1e-6)


def test_psnr():
    a = np.zeros((4, 4, 3))
    assert psnr(a, a) == float("inf")
    assert psnr(a + 0.1, a) == pytest.approx(20.0)


def test_fp32_twin_widens_every_bf16_tensor_cast_and_constant(tmp_path):
    """Cast targets, Constant attributes, inline and external initializers: all float32, values unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)  # 8 KiB: external data
    bias = rng.standard_normal(16).astype(ml_dtypes.bfloat16)  # 32 bytes: stays inline
    half = numpy_helper.from_array(np.array(0.5, dtype=ml_dtypes.bfloat16), "half")
    bf16 = TensorProto.BFLOAT16
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=bf16),
        helper.make_node("MatMul", ["x16", "w"], ["h"]),
        helper.make_node("Constant", [], ["c"], value=half),
        helper.make_node("Mul", ["h", "c"], ["s"]),
        helper.make_node("Slice", ["s", "starts", "ends", "axes"], ["s16"]),
        helper.make_node("Add", ["s16", "b"], ["a"]),
        helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT),
    ]
    initializers = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(bias, "b"),
        *(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("starts", 0), ("ends", 16), ("axes", 1))),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        initializers,
        value_info=[helper.make_tensor_value_info("h", bf16, [4, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    source = tmp_path / "g.onnx"
    onnx.save_model(model, str(source), save_as_external_data=True, location="g.onnx.data", size_threshold=1024)

    twin = tmp_path / "twin" / "g.onnx"
    twin.parent.mkdir()
    fp32_twin(source, twin)
    written = onnx.load(str(twin), load_external_data=False)
    types = [t.data_type for t in written.graph.initializer] + [
        v.type.tensor_type.elem_type for v in written.graph.value_info
    ]
    types += [a.t.data_type for n in written.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    types += [a.i for n in written.graph.node for a in n.attribute if a.name == "to"]
    assert bf16 not in types and TensorProto.FLOAT in types
    x = rng.standard_normal((4, 64)).astype(np.float32)
    (got,) = ort_session(twin).run(None, {"x": x})
    want = (x @ weight.astype(np.float32) * 0.5)[:, :16] + bias.astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
