"""`python -m export --precision nvfp4` on the tiny default: the graph, its numbers, the CPU runtime, TensorRT-RTX."""

import json

import numpy as np
import onnx
import pytest
import torch

from common import nvfp4
from common.external_data import TensorReader
from common.manifest import read_manifest
from export.fp8.rewrite import DEFAULT_TRANSFORMER_EXCLUDE
from export.nvfp4.rewrite import audit_nvfp4, weight_bytes
from tests.support import run_cli

# The shared export (tests/conftest.py `nvfp4_tiny`) calibrates on 3 prompts x 2 steps, as the fp8 tests do.
# Measured on the tiny default (8 steps, 256^2): the twin's image 29.7 dB from diffusers fp32 and
# 29.3 dB from diffusers bf16 (bf16 itself is 38.3 dB from fp32). 4-bit weights and activations on a
# random model: the bar says it draws the same picture, not a near-copy (docs/nvfp4.md).
MIN_PSNR_DB = 25.0


def _reports(out):
    read = lambda name: json.loads((out / "reports" / name).read_text())  # noqa: E731
    return read("export_check.json"), read("nvfp4_layers.json"), read("nvfp4_check.json")


@pytest.mark.slow
def test_nvfp4_transformer_matches_pytorch_fp32_within_its_bounds(nvfp4_tiny):
    report, _, check = _reports(nvfp4_tiny)
    transformer = report["components"]["transformer"]
    assert transformer["method"] == "onnxruntime-cpu-fp32-twin" and transformer["passed"] is True
    twin = transformer["outputs"]["velocity"]
    bf16_graph = transformer["bf16_graph"]["outputs"]["velocity"]
    assert transformer["bf16_graph"]["method"] == "onnx-reference-evaluator"  # TensorRT's operator included
    for metrics in (twin, bf16_graph):
        assert metrics["cosine"] >= 0.97 and metrics["rel_l2"] <= 0.25, metrics
    assert twin["rel_l2"] > 0.02  # 4 bits: quantized, not a bf16 graph in disguise
    assert abs(twin["rel_l2"] - bf16_graph["rel_l2"]) < 0.02  # the twin computes what the graph computes
    e2e = check["end_to_end"]
    assert e2e["psnr_db"]["nvfp4_vs_fp32"] >= MIN_PSNR_DB, e2e
    for component in ("text_encoder", "vae"):
        assert report["components"][component]["passed"] is True


@pytest.mark.slow
def test_every_nvfp4_linear_is_where_the_report_says_in_trt_form(nvfp4_tiny):
    model = onnx.load(str(nvfp4_tiny / "transformer.onnx"), load_external_data=False)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] >= 23 and opsets["trt"] == 1
    _, layers, _ = _reports(nvfp4_tiny)
    listed = {layer["path"]: layer["precision"] for layer in layers["transformer"]["layers"]}
    audit = audit_nvfp4(model, "model.")
    assert set(audit) == set(listed)
    for path, precision in listed.items():
        want = (1, 1) if precision == "nvfp4" else (0, 0)
        assert (audit[path]["weight_dq_fp4"], audit[path]["activation_fp4"]) == want, (path, precision)
    kept = {p for p, precision in listed.items() if precision == "bf16"}
    assert {"x_embedder", "context_embedder", "proj_out", "norm_out.linear"} <= kept
    assert len(listed) - len(kept) == 28 == layers["transformer"]["counts"]["nvfp4"]
    for layer in layers["transformer"]["layers"]:
        if layer["precision"] == "nvfp4":  # global scales amax / (6 * 448)
            assert layer["input_scale"] == pytest.approx(layer["input_amax"] / 2688, rel=1e-6)
            assert layer["weight_scale"] == pytest.approx(layer["weight_amax"] / 2688, rel=1e-6)


@pytest.mark.slow
def test_fp4_weights_are_the_checkpoint_weights_quantized(nvfp4_tiny, tiny_checkpoint):
    """Every FP4 weight in the graph is common.nvfp4's quantization of the bf16 weight, byte for byte."""
    from export.checkpoint import load_transformer, open_checkpoint

    model = onnx.load(str(nvfp4_tiny / "transformer.onnx"), load_external_data=False)
    tensors = {t.name: t for t in model.graph.initializer}
    reader = TensorReader(nvfp4_tiny)
    weights = dict(load_transformer(open_checkpoint(tiny_checkpoint), torch.bfloat16).named_parameters())
    fp4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1]
    assert len(fp4) == 28
    for tensor in fp4:
        path = tensor.name.removesuffix(".weight_fp4")
        weight = weights[f"{path}.weight"].detach().float().numpy()  # [N, K], nn.Linear's own
        assert tuple(tensor.dims) == weight.shape
        scales = reader.array(tensors[f"{path}.weight_block_scales"])
        global_scale = np.float32(reader.array(tensors[f"{path}.weight_global_scale"]))
        expected = nvfp4.quantize(weight, global_scale)
        codes = reader.packed(tensor).reshape(expected.codes.shape)
        assert np.array_equal(codes, expected.codes) and np.array_equal(
            scales.view(np.uint8), expected.block_scales.view(np.uint8)
        )
        back = nvfp4.dequantize(nvfp4.Nvfp4Tensor(codes, scales, global_scale))
        assert 0.02 < np.linalg.norm(back - weight) / np.linalg.norm(weight) < 0.15, path


@pytest.mark.slow
def test_nvfp4_folder_runs_on_the_cpu_and_checks_against_diffusers(nvfp4_tiny, tmp_path):
    manifest = read_manifest(nvfp4_tiny)
    assert {c: e.precision for c, e in manifest.components.items()} == {
        "text_encoder": "nvfp4",  # the shared export quantizes it too (tests/test_nvfp4_text_encoder.py)
        "transformer": "nvfp4",
        "vae": "bf16",
    }
    out = tmp_path / "images"
    result = run_cli("-m", "runtime.generate", "--artifacts", str(nvfp4_tiny), "--backend", "ort", "--prompt", "a fox",
                     "--steps", "3", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    (png,) = out.glob("*.png")
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["backend"] == "ort-cpu" and sidecar["precision"] == "nvfp4"
    import shutil

    artifacts = shutil.copytree(nvfp4_tiny, tmp_path / "artifacts")  # runtime.check writes its report there
    check = run_cli("-m", "runtime.check", "--artifacts", str(artifacts), "--backend", "ort")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "overall: PASS" in check.stdout + check.stderr


@pytest.mark.slow
def test_engines_build_rtx_builds_nvfp4_for_blackwell_and_refuses_ada(nvfp4_tiny, tmp_path):
    import shutil

    from engines.check import check_artifacts

    for report in check_artifacts(nvfp4_tiny):
        assert report.findings == [], (report.component, report.findings)
    artifacts = tmp_path / "artifacts"
    shutil.copytree(nvfp4_tiny, artifacts)
    refused = run_cli(
        "-m", "engines.build", "--artifacts", str(artifacts), "--target", "rtx", "--compute-capability", "89"
    )
    assert refused.returncode == 2 and "NVFP4" in refused.stderr and "Blackwell" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (artifacts / "engines").exists()
    built = run_cli("-m", "engines.build", "--artifacts", str(artifacts), "--target", "rtx")
    assert built.returncode == 0, built.stderr
    plans = sorted(p.name for p in (artifacts / "engines").rglob("*.plan"))
    assert len(plans) >= 3, plans


def test_full_flux2_dev_nvfp4_weighs_under_a_third_of_bf16():
    """FLUX.2 [dev]'s real config on the meta device: the calibrated recipe's transformer <= 0.30 x bf16."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel()
    sizes = weight_bytes(model, DEFAULT_TRANSFORMER_EXCLUDE)
    assert 32.0e9 < sizes["params"] < 32.5e9
    assert sizes["ratio"] <= 0.30, sizes
    assert weight_bytes(model, ())["ratio"] == pytest.approx(9 / 32, abs=1e-6)
