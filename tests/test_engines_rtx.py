"""Real TensorRT-RTX on the tiny exports: every component of [dev] and [klein] parsed by its ONNX parser,
what the precision promises checked in TensorRT's own network, and built into plans (no GPU needed)."""

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from common.engine_manifest import engines_dir, read_engine_manifest
from common.manifest import read_manifest, sha256_file
from common.specs import Shapes
from common.tensorrt_env import module_status
from engines.build import build_engines
from engines.check import run_check
from engines.trt_parse import parse_artifacts, parse_component, read_layers_report
from tests.support import run_cli

HAS_RTX, RTX_REASON = module_status("rtx")
pytestmark = pytest.mark.skipif(not HAS_RTX, reason=f"needs tensorrt_rtx (the dev extra installs it): {RTX_REASON}")
# Small graphs: what is checked is structure and types, which do not depend on the image size. 128
# tokens: export refuses a length the tiny [dev] chat template (111 tokens) alone fills.
TINY = Shapes(height=128, width=128, max_sequence_length=128)
MATMUL = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16", "fp8": "BF16"}


@pytest.fixture(scope="module")
def api():
    from engines.trt_parse import parser_api

    found, reason = parser_api()
    assert found is not None and found.target == "rtx", reason  # no enterprise TensorRT in CI
    return found


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory, export_tiny, export_klein, tiny_checkpoint, tiny_klein_checkpoint, tiny_klein_distilled_checkpoint
):
    """(model, precision) -> artifacts; all but fp8 are the suite's shared exports."""
    from export.fp8.calibrate import CalibrationSettings
    from export.fp8.run import Fp8Options
    from export.run import export_artifacts

    checkpoints = {
        "dev": tiny_checkpoint,
        "klein": tiny_klein_checkpoint,
        "klein-distilled": tiny_klein_distilled_checkpoint,
    }
    done = {}

    def get(model: str, precision: str):
        if model == "dev" and precision != "fp8":
            return export_tiny(precision)
        if model != "dev" and precision != "fp8":
            return export_klein({"klein": "base", "klein-distilled": "distilled"}[model], precision)
        if (model, precision) not in done:
            out = tmp_path_factory.mktemp(f"rtx-{model}-{precision}") / "artifacts"
            fp8 = Fp8Options(calibration=CalibrationSettings(prompts=1, steps=1)) if precision == "fp8" else None
            export_artifacts(
                model=str(checkpoints[model]), out=out, precision=precision, shapes=TINY, skip_check=True,
                fp8=fp8, log=lambda m: None,
            )  # fmt: skip
            done[(model, precision)] = out
        return done[(model, precision)]

    return get


# [dev] at every precision; [klein] base and distilled share one architecture (the distilled flag
# changes the sampler, not a graph), so between them they cover every precision once.
CASES = [
    ("dev", "fp32"),
    ("dev", "fp16"),
    ("dev", "bf16"),
    ("dev", "fp8"),
    pytest.param("klein", "fp8", marks=pytest.mark.slow),
    pytest.param("klein", "bf16", marks=pytest.mark.slow),
    pytest.param("klein-distilled", "fp16", marks=pytest.mark.slow),
    pytest.param("klein-distilled", "fp32", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model,precision", CASES)
def test_every_component_parses_keeps_its_precision_and_builds(exported, api, model, precision):
    import tensorrt_rtx

    out = exported(model, precision)
    manifest = read_manifest(out)
    reports = {r.component: r for r in parse_artifacts(api, out, manifest)}
    assert set(reports) == {"text_encoder", "transformer", "vae"}
    for component, report in reports.items():
        assert report.parsed and report.layers > 100, (component, report.findings)
        assert report.findings == [], [str(f) for f in report.findings]
        matmuls = {dtype: n for (kind, dtype), n in report.census.items() if kind == "MATRIX_MULTIPLY"}
        want = MATMUL[manifest.components[component].precision]
        # What an export keeps in float32 on purpose, and only that (none since fp16 attention is float16).
        kept = manifest.components[component].float32_matmuls or ()
        assert matmuls.pop(want) > 0 and matmuls == ({"FLOAT": len(kept)} if kept and want != "FLOAT" else {})
    if precision == "fp8":
        linears = [r for r in read_layers_report(out, "fp8")["transformer"]["layers"] if r["precision"] == "fp8"]
        transformer = reports["transformer"]
        assert transformer.quantized_linears == len(linears) > 0
        assert transformer.census[("QUANTIZE", "FP8")] == len(linears)  # one per use; each linear used once here
        assert transformer.census[("CONSTANT", "FP8")] == len(linears)
    else:
        assert not any(dtype == "FP8" for _, dtype in reports["transformer"].census)

    engines = build_engines(artifacts=out, target="rtx", trt=tensorrt_rtx, log=lambda m: None).engines
    assert set(engines) == {"text_encoder", "transformer", "vae"}
    for entry in engines.values():
        plan = engines_dir(out, "rtx") / entry.plan
        # Streamed to the file as TensorRT serialized it: the record's size and hash are the file's.
        assert plan.stat().st_size == entry.plan_bytes > 0 and sha256_file(plan) == entry.plan_sha256
    assert not [p for p in engines_dir(out, "rtx").iterdir() if p.name.startswith(".")]  # no temporary left


def test_check_prints_the_parse_and_census_and_passes(exported):
    printed = io.StringIO()
    run_check(folder=exported("dev", "fp8"), out=printed)
    text = printed.getvalue()
    assert "TensorRT-RTX 1.7" in text and "ONNX parser" in text
    assert "transformer layer output types:" in text and "FP8 56" in text  # 28 quantized activations + 28 weights
    assert text.count(" pass") == 6  # three static rows, three parsed rows


def test_an_operator_tensorrt_lacks_fails_naming_the_node(api, tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["m"], name="relu0"),
            helper.make_node("Unique", ["m"], ["y"], name="unique_node"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    report = parse_component(api, "vae", path, "fp32", None)
    assert not report.parsed and len(report.findings) == 1
    assert "name: unique_node and operator: Unique" in report.findings[0].message
    assert "UNSUPPORTED_NODE" in report.findings[0].message  # TensorRT's own words


def test_a_float32_matrix_multiply_in_an_fp16_graph_is_named(api, tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="kept_fp32_matmul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[weight],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    report = parse_component(api, "transformer", path, "fp16", None)
    assert [(f.check, f.where) for f in report.findings] == [("precision", "layer kept_fp32_matmul (MATRIX_MULTIPLY)")]
    assert "computes in FLOAT; a fp16 graph promises HALF" in report.findings[0].message
    # ... unless the manifest lists it among the float32 matrix multiplies the export keeps on purpose.
    assert parse_component(api, "transformer", path, "fp16", None, ["kept_fp32_matmul"]).findings == []


def test_fp8_census_names_a_linear_quantized_against_the_report(exported, api):
    out = exported("dev", "fp8")
    report = read_layers_report(out, "fp8")["transformer"]
    first_fp8 = next(r for r in report["layers"] if r["precision"] == "fp8")
    doctored = {
        **report,
        "layers": [
            {**r, "precision": "bf16"} if r is first_fp8 else r for r in report["layers"]
        ] + [{"path": "transformer_blocks.9.ff.net.0.proj", "precision": "fp8"}],
    }  # fmt: skip
    parsed = parse_component(api, "transformer", out / "transformer.onnx", "fp8", doctored)
    messages = [str(f) for f in parsed.findings]
    assert any(first_fp8["path"] in m and "which the export keeps in bf16" in m for m in messages), messages
    assert any("transformer_blocks.9.ff.net.0.proj" in m and "no FP8 QUANTIZE" in m for m in messages), messages


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_an_unseen_configuration_builds_with_target_rtx(variant_artifacts, tmp_path, precision):
    checkpoint = variant_artifacts.parent / "checkpoint"
    out = tmp_path / f"variant-{precision}"
    calib = ["--calib-prompts", "1", "--calib-steps", "1"] if precision == "fp8" else []
    exported = run_cli("-m", "export", "--model", str(checkpoint), "--out", str(out), "--precision", precision,
                       "--height", "128", "--width", "192", "--max-sequence-length", "128", "--skip-check", *calib)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    built = run_cli("-m", "engines.build", "--artifacts", str(out), "--target", "rtx")
    assert built.returncode == 0, built.stderr
    engines = read_engine_manifest(out, "rtx").engines
    assert set(engines) == {"text_encoder", "transformer", "vae"}
    for entry in engines.values():
        assert (engines_dir(out, "rtx") / entry.plan).stat().st_size == entry.plan_bytes > 0


def test_network_census_counts_the_fp16_transformer(exported):
    """tools/network_census.py: every product float16 (attention's too), counted in its block's bucket."""
    import importlib.util
    from pathlib import Path

    from flux2_tiny.config import DEFAULT

    spec = importlib.util.spec_from_file_location(
        "census", Path(__file__).parent.parent / "tools" / "network_census.py"
    )
    census = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(census)
    out = exported("dev", "fp16")
    manifest = read_manifest(out)
    record = manifest.components["transformer"]
    result = census.census(out / record.file)
    layers = result["layers_by_output_type"]
    blocks = DEFAULT.num_layers + DEFAULT.num_single_layers
    # attention's Q K^T and P V in float16 too: two per block beside the linears
    assert "MATRIX_MULTIPLY FLOAT" not in layers and record.float32_matmuls == ()
    assert layers["MATRIX_MULTIPLY HALF"] > 2 * blocks
    per = result["per_bucket"]
    flops = {bucket: per[bucket].get("matmul_flops_HALF", 0) for bucket in per}
    assert all(flops[b] > 0 for b in ("outside", "double", "single")), flops
    full = census.scaled(result, 8, 48)
    assert full["matmul_flops_HALF"] == flops["outside"] + 8 * flops["double"] + 48 * flops["single"]
    assert full["float32_bytes"] > 0
