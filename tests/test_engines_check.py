"""engines.check: the tiny exports pass; hand-built bad graphs fail naming the offending node."""

import io

import onnx
import pytest
from onnx import TensorProto, helper

from common.errors import EngineCompatibilityError
from common.specs import TensorSpec
from engines.check import check_graph, run_check
from engines.ops_table import load_table, parse_operators_md
from tests.support import artifacts_manifest, component_record, run_cli

FP8 = TensorProto.FLOAT8E4M3FN


def _save(model, folder, name="g.onnx"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(model, str(path))
    return path


def _model(nodes, inputs, outputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _where(findings, check):
    return [f.where for f in findings if f.check == check]


def _relu(elem=TensorProto.FLOAT, dims=(1, 4)):
    return _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", elem, list(dims))],
        [helper.make_tensor_value_info("y", elem, list(dims))],
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tiny_exports_pass(export_tiny, precision):
    out = export_tiny(precision)
    printed = io.StringIO()
    reports = run_check(folder=out, out=printed, parse=False)  # the real parser: tests/test_engines_rtx.py
    assert [r.component for r in reports] == ["text_encoder", "transformer", "vae"]
    assert all(r.findings == [] for r in reports), [str(f) for r in reports for f in r.findings]
    assert printed.getvalue().count(" pass") == 3
    # The VAE's nearest upsampling is done in float32 at every precision: TensorRT has no bf16 Resize.
    graph, _ = check_graph(out / "vae.onnx")
    resizes = [n for n in graph.model.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 3  # tiny VAE: 4 blocks, 3 upsamplers
    assert {graph.types[n.input[0]] for n in resizes} == {TensorProto.FLOAT}


def test_clean_graph_has_no_findings(tmp_path):
    _, findings = check_graph(_save(_relu(), tmp_path))
    assert findings == []


def test_float64_named(tmp_path):
    model = _model(
        [helper.make_node("Cast", ["x"], ["y"], name="cast_to_double", to=TensorProto.DOUBLE)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 4])],
    )
    _, findings = check_graph(_save(model, tmp_path))
    assert any("cast_to_double" in where for where in _where(findings, "float64"))
    assert any("cast_to_double" in where for where in _where(findings, "types"))  # DOUBLE is no Cast type either


def test_dynamic_dimension_named(tmp_path):
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["mid"], name="relu_dyn"),
            helper.make_node("Neg", ["mid"], ["y"], name="neg"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    _, findings = check_graph(_save(model, tmp_path))
    static = [f for f in findings if f.check == "static"]
    assert any("'batch'" in f.message and "input/output x" in f.where for f in static)
    assert any("relu_dyn" in f.where and "'mid'" in f.message for f in static)  # the node whose output is not static


def test_unsupported_operators_named(tmp_path):
    model = _model(
        [
            helper.make_node("Unique", ["x"], ["u"], name="unique_node"),
            helper.make_node("FusedGelu", ["x"], ["y"], name="custom_gelu", domain="com.example"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [
            helper.make_tensor_value_info("u", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
        ],
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    _, findings = check_graph(_save(model, tmp_path))
    where = _where(findings, "operators")
    assert any("unique_node (Unique)" in w for w in where)
    assert any("custom_gelu (FusedGelu)" in w for w in where)
    assert _where(findings, "opset")  # the custom domain itself


def test_bf16_resize_and_unsupported_mode_named(tmp_path):
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    model = _model(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize_bf16", mode="cubic")],
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 2, 8, 8])],
        initializers=[scales],
    )
    _, findings = check_graph(_save(model, tmp_path))
    types = [f for f in findings if f.check == "types"]
    assert len(types) == 1 and "resize_bf16" in types[0].where and "BF16" in types[0].message
    assert any("resize_bf16" in w for w in _where(findings, "limits"))


def test_opset_outside_range(tmp_path):
    low = load_table()["opset"]["min"]
    model = _relu()
    model.opset_import[0].version = low - 1
    _, findings = check_graph(_save(model, tmp_path))
    assert [f.check for f in findings] == ["opset"]
    assert f"opset {low - 1}" in findings[0].message


def _with_external_data(tmp_path, locations):
    model = _relu()
    for index, location in enumerate(locations):
        tensor = helper.make_tensor(f"w{index}", TensorProto.FLOAT, [4], b"\0" * 16, raw=True)
        onnx.external_data_helper.set_external_data(tensor, location=location, offset=0, length=16)
        tensor.ClearField("raw_data")
        model.graph.initializer.append(tensor)
    return _save(model, tmp_path)


def test_external_data_files_beside_the_model(tmp_path):
    path = _with_external_data(tmp_path, ["g.onnx.data"])
    _, findings = check_graph(path)
    assert any("does not exist" in f.message for f in findings if f.check == "external data")
    (tmp_path / "g.onnx.data").write_bytes(b"\0" * 8)
    _, findings = check_graph(path)
    assert any("truncated" in f.message for f in findings if f.check == "external data")
    (tmp_path / "g.onnx.data").write_bytes(b"\0" * 16)
    assert check_graph(path)[1] == []
    # Two files beside the model (a further --resolutions size reads the first size's weights): each is checked.
    two = _with_external_data(tmp_path / "two", ["a.data", "b.data"])
    (two.parent / "a.data").write_bytes(b"\0" * 16)
    _, findings = check_graph(two)
    assert [f.message for f in findings if f.check == "external data"] == [
        f"external data file {two.parent / 'b.data'} does not exist; re-export"
    ]
    (two.parent / "b.data").write_bytes(b"\0" * 16)
    assert check_graph(two)[1] == []
    _, findings = check_graph(_with_external_data(tmp_path / "sub", ["weights/g.data"]))
    assert any("beside the model" in f.message for f in findings)


def _fp8_linear(zero_point_type=FP8, scale_dims=(), weight_type=FP8, q_consumer="DequantizeLinear"):
    """x -> Q -> DQ -> MatMul(., DQ(weight)): the shape ModelOpt's FP8 recipe writes for a linear layer."""
    scale = helper.make_tensor("x_scale", TensorProto.FLOAT, list(scale_dims), [0.5] * max(1, int(sum(scale_dims))))
    zero = helper.make_tensor("x_zero", zero_point_type, [], [0])
    weight = helper.make_tensor("w_fp8", weight_type, [4, 4], [0] * 16)
    w_scale = helper.make_tensor("w_scale", TensorProto.FLOAT, [], [0.25])
    w_zero = helper.make_tensor("w_zero", FP8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="act_q")]
    if q_consumer == "DequantizeLinear":
        nodes.append(helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="act_dq"))
    else:
        nodes.append(helper.make_node("Identity", ["x_q"], ["x_dq"], name="fp8_identity"))
    nodes += [
        helper.make_node("DequantizeLinear", ["w_fp8", "w_scale", "w_zero"], ["w"], name="weight_dq"),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="matmul"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializers=[scale, zero, weight, w_scale, w_zero],
    )


def test_fp8_qdq_well_formed_passes(tmp_path):
    assert check_graph(_save(_fp8_linear(), tmp_path))[1] == []


@pytest.mark.parametrize(
    ("kwargs", "node", "needle"),
    [
        ({"zero_point_type": TensorProto.INT8}, "act_q", "not FLOAT8E4M3FN"),
        ({"scale_dims": (4,)}, "act_q", "per-tensor"),
        ({"weight_type": TensorProto.FLOAT16}, "weight_dq", "not a FLOAT8E4M3FN initializer"),
        ({"q_consumer": "Identity"}, "act_q", "only DequantizeLinear"),
    ],
)
def test_fp8_qdq_malformed_named(tmp_path, kwargs, node, needle):
    _, findings = check_graph(_save(_fp8_linear(**kwargs), tmp_path))
    qdq = [f for f in findings if f.check == "fp8 q/dq"]
    assert any(node in f.where and needle in f.message for f in qdq), [str(f) for f in findings]


def _artifacts(folder, model, declared_shape=(1, 4)):
    _save(model, folder, "transformer.onnx")
    inputs = (TensorSpec("x", tuple(declared_shape), "float32"),)
    outputs = (TensorSpec("y", tuple(declared_shape), "float32"),)
    artifacts_manifest({"transformer": component_record("transformer", {}, inputs, outputs)}, folder=folder)
    return folder


def test_io_must_match_manifest(tmp_path):
    folder = _artifacts(tmp_path / "a", _relu(), declared_shape=(1, 8))
    with pytest.raises(EngineCompatibilityError, match=r"graph inputs \[io\]"):
        run_check(folder=folder, out=io.StringIO())


def test_cli_exit_code_and_node_name(tmp_path):
    good = _artifacts(tmp_path / "good", _relu())
    result = run_cli("-m", "engines.check", str(good))
    assert result.returncode == 0, result.stderr
    assert "transformer" in result.stdout and "pass" in result.stdout
    model = _model(
        [helper.make_node("Cast", ["x"], ["y"], name="cast_to_double", to=TensorProto.DOUBLE)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 4])],
    )
    bad = _artifacts(tmp_path / "bad", model)
    result = run_cli("-m", "engines.check", str(bad))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "cast_to_double" in errors[0]
    assert "FAIL" in result.stdout
    result = run_cli("-m", "engines.check", str(tmp_path / "missing"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_operators_md_parsing():
    text = (
        "TensorRT 10.99 supports operators in the inclusive range of opset 9 to opset 30.\n"
        "| Operator | Supported | Supported Types | Restrictions |\n|---|---|---|---|\n"
        "| ConstantOfShape | Y | FP32, INF64, BOOL |\n| Col2Im | N |\n"
        "| Resize | Y | FP32, FP16 | modes: `nearest`.<br />Antialiasing is not supported.|\n"
    )
    table = parse_operators_md(text)
    assert table["tensorrt_version"] == "10.99" and table["opset"] == {"min": 9, "max": 30}
    assert table["operators"]["ConstantOfShape"]["types"] == ["FP32", "INT64", "BOOL"]
    assert table["operators"]["Col2Im"] == {"supported": False, "types": [], "restrictions": ""}
    assert "Antialiasing" in table["operators"]["Resize"]["restrictions"]


def test_shipped_table_records_its_source():
    table = load_table()
    assert table["tensorrt_version"] == "10.15" and table["source"]["repository"] == "onnx/onnx-tensorrt"
    assert table["operators"]["SequenceAt"]["supported"] is False  # what the raw dynamo export emitted
    assert "BF16" not in table["operators"]["Resize"]["types"] and "Resize" in table["overrides"]
    assert "BF16" in table["operators"]["Resize"]["types_in_operators_md"]
