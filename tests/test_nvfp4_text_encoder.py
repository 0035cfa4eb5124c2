"""`--text-encoder-precision nvfp4` on the tiny default: the text encoder's linears in NVFP4 too.

The transformer's NVFP4 form is tested in tests/test_nvfp4_export.py; here the same rewrite on the
text encoder, with its own exclusions (none by default), calibration (the same prompts and cache)
and report entries, and the folder that results running on the CPU.
"""

import json
import shutil

import onnx
import pytest

from common.manifest import read_manifest
from export.components import COMPONENTS
from export.nvfp4.rewrite import DYNAMIC_QUANTIZE, TRT_DOMAIN, audit_nvfp4
from tests.support import run_cli

# Measured on the tiny default (tiny text encoder: 6 layers x 7 linears, no exclusions; see
# docs/nvfp4.md): 42 NVFP4 linears; the fp32 twin is 1.1e-3 rel L2 from PyTorch fp32, the NVFP4
# graph in onnx's evaluator 3.2e-3. A float32 twin without quantization would sit near 1e-6.
LINEARS = 42
MIN_REL_L2 = 2e-4


@pytest.fixture(scope="module")
def nvfp4_text_encoder(nvfp4_tiny):
    return nvfp4_tiny  # conftest's shared nvfp4 export, text encoder included


def _read(out, name):
    return json.loads((out / "reports" / name).read_text())


@pytest.mark.slow
def test_text_encoder_graph_is_nvfp4_where_the_report_says(nvfp4_text_encoder):
    model = onnx.load(str(nvfp4_text_encoder / "text_encoder.onnx"), load_external_data=False)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] >= 23 and opsets[TRT_DOMAIN] == 1
    layers = _read(nvfp4_text_encoder, "nvfp4_layers.json")["text_encoder"]
    assert layers["exclude"] == [] and layers["counts"] == {"nvfp4": LINEARS, "bf16": 0}
    fp4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1]
    e4m3 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    quantizers = [n for n in model.graph.node if n.op_type == DYNAMIC_QUANTIZE and n.domain == TRT_DOMAIN]
    assert len(fp4) == len(e4m3) == len(quantizers) == layers["counts"]["nvfp4"]
    listed = {layer["path"]: layer["precision"] for layer in layers["layers"]}
    audit = audit_nvfp4(model, COMPONENTS["text_encoder"].initializer_prefix)
    assert set(audit) == set(listed)
    for path, precision in listed.items():
        assert precision == "nvfp4" and (audit[path]["weight_dq_fp4"], audit[path]["activation_fp4"]) == (1, 1), path
    for layer in layers["layers"]:  # global scales amax / (6 * 448), the activation's from calibration
        assert layer["input_scale"] == pytest.approx(layer["input_amax"] / 2688, rel=1e-6)
        assert layer["weight_scale"] == pytest.approx(layer["weight_amax"] / 2688, rel=1e-6)
        assert layer["input_amax"] > 0
    assert read_manifest(nvfp4_text_encoder).components["text_encoder"].precision == "nvfp4"


@pytest.mark.slow
def test_text_encoder_check_passes_with_the_reported_numbers(nvfp4_text_encoder):
    report = _read(nvfp4_text_encoder, "export_check.json")["components"]["text_encoder"]
    check = _read(nvfp4_text_encoder, "nvfp4_check.json")["text_encoder"]
    assert report["method"] == check["method"] == "onnxruntime-cpu-fp32-twin"
    assert report["passed"] is check["passed"] is True
    twin = check["outputs"]["prompt_embeds"]
    graph = check["bf16_graph"]["outputs"]["prompt_embeds"]  # the NVFP4 graph itself, TensorRT's operator in
    assert check["bf16_graph"]["method"] == "onnx-reference-evaluator"
    assert twin == report["outputs"]["prompt_embeds"]
    for metrics in (twin, graph):
        assert metrics["finite"] and metrics["rel_l2"] <= check["tolerance"]["max_rel_l2"], metrics
        assert metrics["cosine"] >= check["tolerance"]["min_cosine"], metrics
    assert twin["rel_l2"] > MIN_REL_L2  # quantized, not a float32 copy
    sizes = check["sizes"]
    assert 0 < sizes["nvfp4_data_bytes"] < sizes["bf16_data_bytes"]


@pytest.mark.slow
def test_folder_with_an_nvfp4_text_encoder_checks_on_the_cpu(nvfp4_text_encoder, tmp_path):
    artifacts = shutil.copytree(nvfp4_text_encoder, tmp_path / "artifacts")  # runtime.check writes its report there
    check = run_cli("-m", "runtime.check", "--artifacts", str(artifacts), "--backend", "ort")
    output = check.stdout + check.stderr
    assert check.returncode == 0 and "overall: PASS" in output, output
    (row,) = [line.split() for line in output.splitlines() if line.startswith("text_encoder")]
    assert row[-1] == "pass" and float(row[2]) > MIN_REL_L2  # the twin of the NVFP4 graph ran, not bf16


@pytest.mark.slow
def test_tensorrt_rtx_parses_every_nvfp4_linear_and_builds_for_blackwell(nvfp4_text_encoder, tmp_path):
    artifacts = shutil.copytree(nvfp4_text_encoder, tmp_path / "artifacts")
    check = run_cli("-m", "engines.check", str(artifacts))
    assert check.returncode == 0, check.stdout + check.stderr
    (row,) = [line for line in check.stdout.splitlines() if line.startswith("text_encoder ") and "linears" in line]
    assert f"{LINEARS} / {LINEARS} linears" in row and row.endswith("pass"), row  # TensorRT's census vs the report
    built = run_cli("-m", "engines.build", "--artifacts", str(artifacts), "--target", "rtx")
    assert built.returncode == 0, built.stderr
    platform = json.loads((artifacts / "engines" / "rtx" / "manifest.json").read_text())["engines"]["text_encoder"]
    assert platform["platform"]["compute_capabilities"] == ["12.0", "12.1"]
    assert (artifacts / "engines" / "rtx" / "text_encoder.plan").stat().st_size > 0


def test_text_encoder_choices_follow_the_folder():
    """An nvfp4 folder's text encoder may be fp8 (its GPUs run FP8); an fp8 folder's may not be nvfp4."""
    from common.precision import precision
    from export.fp8.run import text_encoder_choices

    assert text_encoder_choices(precision("nvfp4")) == ("bf16", "fp8", "nvfp4")
    assert text_encoder_choices(precision("fp8")) == ("bf16", "fp8")
    result = run_cli("-m", "export", "--model", "tiny", "--out", "/tmp/never-written", "--precision", "fp8",
                     "--text-encoder-precision", "nvfp4")  # fmt: skip
    assert result.returncode == 2 and "is not one of bf16, fp8 (with --precision fp8)" in result.stderr, result.stderr


@pytest.mark.slow
def test_an_nvfp4_folder_with_an_fp8_text_encoder(tiny_checkpoint, small_shapes, tmp_path):
    from export.fp8.calibrate import CalibrationSettings
    from export.fp8.run import Fp8Options
    from export.run import export_artifacts

    options = Fp8Options(
        precision="nvfp4", text_encoder_precision="fp8", calibration=CalibrationSettings(prompts=3, steps=2)
    )
    out = tmp_path / "tiny"
    export_artifacts(model=str(tiny_checkpoint), out=out, precision="nvfp4", shapes=small_shapes, fp8=options,
                     components=("text_encoder",), log=lambda m: None)  # fmt: skip
    assert read_manifest(out).components["text_encoder"].precision == "fp8"
    layers = _read(out, "fp8_layers.json")["text_encoder"]
    assert (
        layers["counts"]["fp8"] == LINEARS and _read(out, "export_check.json")["components"]["text_encoder"]["passed"]
    )
    check = run_cli("-m", "engines.check", str(out))
    assert check.returncode == 0 and f"{LINEARS} / {LINEARS} linears" in check.stdout, check.stdout + check.stderr
