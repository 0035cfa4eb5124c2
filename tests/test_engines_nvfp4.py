"""NVFP4 artifacts through engines.check and engines.build: the static form, TensorRT-RTX's real parser
and builder on a hand-made tiny graph (one or two NVFP4 linears, [1, 32, 64] x [64, 32]), and the
tensorrt target's Blackwell-only refusal against the fake TensorRT."""

import io
import json

import pytest

from common.engine_manifest import engines_dir, read_engine_manifest
from common.errors import UsageError
from common.manifest import sha256_file
from common.precision import precision
from common.tensorrt_env import RTX_COMPUTE_CAPABILITIES, Platform, cc_tuple, module_status
from engines.build import BuildConfig, build_engines
from engines.check import check_graph, run_check
from tests.fake_trt import FakeTrt
from tests.nvfp4_graph import layers_report, nvfp4_model, save, specs
from tests.support import artifacts_manifest, assert_one_line_error, component_record, run_cli

HAS_RTX, RTX_REASON = module_status("rtx")
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason=f"needs tensorrt_rtx (the dev extra installs it): {RTX_REASON}")
NVFP4 = precision("nvfp4")


def _artifacts(folder, dims=(64, 32), report: dict | None = None):
    """An nvfp4 artifacts folder holding one hand-made NVFP4 transformer and its layers report."""
    folder.mkdir(parents=True)
    path = save(nvfp4_model(dims=dims), folder / "transformer.onnx")
    inputs, outputs = specs(dims=dims)
    record = component_record("transformer", {path.name: sha256_file(path)}, inputs, outputs, "nvfp4")
    artifacts_manifest({"transformer": record}, "nvfp4", folder)
    (folder / "reports").mkdir()
    report = report if report is not None else layers_report("transformer", len(dims) - 1, kept=1)
    (folder / "reports" / NVFP4.layers_report).write_text(json.dumps(report), encoding="utf-8")
    return folder


def test_the_declaration_says_where_nvfp4_builds():
    assert NVFP4.layers_report == "nvfp4_layers.json" and precision("fp8").layers_report == "fp8_layers.json"
    assert precision("bf16").layers_report is None
    assert set(NVFP4.rtx_compute_capabilities) <= set(RTX_COMPUTE_CAPABILITIES)
    assert all(NVFP4.runs_on(cc_tuple(c)) for c in NVFP4.rtx_compute_capabilities)
    # every TensorRT-RTX target it leaves out is one its tensor cores lack
    assert not any(
        NVFP4.runs_on(cc_tuple(c)) for c in set(RTX_COMPUTE_CAPABILITIES) - set(NVFP4.rtx_compute_capabilities)
    )
    assert NVFP4.capability_need() == "NVFP4 needs compute capability 10.0 or newer (Blackwell)"


def test_the_nvfp4_form_passes_the_static_checks_and_a_wrong_block_is_named(tmp_path):
    for dims in ((64, 32), (64, 64, 32)):
        _, findings = check_graph(save(nvfp4_model(dims=dims), tmp_path / "g.onnx"))
        assert findings == [], [str(f) for f in findings]
    _, findings = check_graph(save(nvfp4_model(block_size=32), tmp_path / "bad.onnx"))
    assert [(f.check, f.where) for f in findings] == [
        ("nvfp4 q/dq", "node linear0.weight/DequantizeLinear (DequantizeLinear)")
    ]
    assert "block_size 32" in findings[0].message and "NVFP4 wants block_size 16" in findings[0].message


# -- TensorRT-RTX's real parser and builder ----------------------------------------------------------


@pytest.fixture(scope="module")
def api():
    if not HAS_RTX:
        pytest.skip(RTX_REASON)
    from engines.trt_parse import parser_api

    found, reason = parser_api()
    assert found is not None and found.target == "rtx", reason
    return found


def test_rtx_parses_the_form_into_fp4_quantizers_and_weights(api, tmp_path):
    from engines.trt_parse import parse_component

    path = save(nvfp4_model(dims=(64, 64, 32)), tmp_path / "g.onnx")
    report = parse_component(api, "transformer", path, "nvfp4", layers_report("transformer", 2)["transformer"])
    assert report.parsed and report.findings == [], [str(f) for f in report.findings]
    census = dict(report.census)
    per_linear = {
        ("DYNAMIC_QUANTIZE", "FP4"): 1,  # values FP4, block scales FP8 (its second output)
        ("CONSTANT", "FP4"): 1,  # the weight
        ("CONSTANT", "FP8"): 1,  # its block scales
        ("DEQUANTIZE", "FLOAT"): 4,  # weight scales, weight, activation scales, activation
        ("CAST", "BF16"): 2,
        ("MATRIX_MULTIPLY", "BF16"): 1,
    }
    for key, count in per_linear.items():
        assert census[key] == 2 * count, (key, census)
    assert report.quantized_linears == 2


def test_rtx_census_names_a_count_the_report_does_not_have(api, tmp_path):
    from engines.trt_parse import parse_component

    path = save(nvfp4_model(), tmp_path / "g.onnx")
    report = parse_component(api, "transformer", path, "nvfp4", layers_report("transformer", 2)["transformer"])
    assert sorted(f.where for f in report.findings) == ["FP4 activation quantizers (DYNAMIC_QUANTIZE)", "FP4 weights"]
    assert all("1 in TensorRT's network for 2 NVFP4 linears" in f.message for f in report.findings)


def test_check_prints_the_nvfp4_census_and_passes(api, tmp_path):
    printed = io.StringIO()
    run_check(folder=_artifacts(tmp_path / "a"), out=printed)
    text = printed.getvalue()
    assert "1 / 1 linears" in text and "FP4 2" in text and text.count(" pass") == 2, text


@needs_rtx
def test_rtx_builds_nvfp4_for_blackwell_by_default(tmp_path):
    import tensorrt_rtx

    folder = _artifacts(tmp_path / "a")
    manifest = build_engines(artifacts=folder, target="rtx", trt=tensorrt_rtx, log=lambda m: None)
    platform = manifest.engines["transformer"].platform
    assert platform.compute_capabilities == ("12.0", "12.1")
    assert platform.compute_capabilities_from == "nvfp4 default"
    plan = engines_dir(folder, "rtx") / "transformer.plan"
    assert plan.stat().st_size == manifest.engines["transformer"].plan_bytes > 100_000  # kernels for two targets


@needs_rtx
def test_rtx_builds_nvfp4_for_sm120_and_its_builder_refuses_sm89(tmp_path):
    import tensorrt_rtx

    from engines.trt_build import EngineBuildError, TrtApi, build_plan

    folder = _artifacts(tmp_path / "a")
    built = build_engines(
        artifacts=folder, target="rtx", trt=tensorrt_rtx, build=BuildConfig(compute_capabilities=("12.0",)),
        log=lambda m: None,
    )  # fmt: skip
    assert read_engine_manifest(folder, "rtx").engines["transformer"].platform.compute_capabilities == ("12.0",)
    assert built.engines["transformer"].plan_bytes > 0
    # Why engines.build refuses 89 itself: TensorRT-RTX's builder fails it (its log: "Cannot compile for
    # target(s) sm89, because the model contains HW-specific datatypes: fp4_e2m1").
    inputs, _ = specs()
    with pytest.raises(EngineBuildError, match="failed to build"), open(tmp_path / "plan", "wb") as sink:
        api = TrtApi(tensorrt_rtx, "rtx")
        build_plan(api, folder / "transformer.onnx", BuildConfig(compute_capabilities=("8.9",)), inputs, None,
                   lambda m: None, sink)  # fmt: skip


@needs_rtx
def test_cli_refuses_nvfp4_below_blackwell_in_one_line(tmp_path):
    folder = _artifacts(tmp_path / "a")
    result = run_cli(
        "-m", "engines.build", "--artifacts", str(folder), "--target", "rtx", "--compute-capability", "89,120"
    )
    assert_one_line_error(result, "--compute-capability 89 cannot run nvfp4 engines", "NVFP4", "Blackwell", "120,121")
    assert not engines_dir(folder, "rtx").exists()


# -- the tensorrt target (a GPU node's): the fake ----------------------------------------------------


def test_tensorrt_target_refuses_a_gpu_before_blackwell_and_builds_on_b200(tmp_path):
    folder = _artifacts(tmp_path / "a")
    hopper = Platform("tensorrt", "10.15.1.29", gpu="NVIDIA H200", compute_capability="9.0")
    with pytest.raises(
        UsageError,
        match=r"this node's NVIDIA H200 \(compute capability 9.0\) cannot run nvfp4 engines "
        r"\(NVFP4 needs compute capability 10.0 or newer \(Blackwell\)\)",
    ):
        build_engines(artifacts=folder, target="tensorrt", trt=FakeTrt(), platform=hopper, log=lambda m: None)
    assert not engines_dir(folder, "tensorrt").exists()
    b200 = Platform("tensorrt", "10.15.1.29", gpu="NVIDIA B200", compute_capability="10.0")
    trt = FakeTrt()
    built = build_engines(artifacts=folder, target="tensorrt", trt=trt, platform=b200, log=lambda m: None)
    assert set(built.engines) == {"transformer"}
    assert not [c for c in trt.calls if c[0] == "set_compute_capability"]  # TensorRT builds for its own GPU
