import onnx
from onnx import TensorProto, helper

from common.onnx_checks import dynamic_dims, external_data_files, float64_uses


def _model(elem=TensorProto.FLOAT, dims=(1, 4), cast_to=None):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    if cast_to is not None:
        nodes = [helper.make_node("Cast", ["x"], ["y"], name="cast_node", to=cast_to)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, list(dims))],
        [helper.make_tensor_value_info("y", elem if cast_to is None else cast_to, list(dims))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_float64_found_in_values_and_casts():
    assert float64_uses(_model()) == []
    assert "value x" in float64_uses(_model(elem=TensorProto.DOUBLE))
    assert any("cast_node" in p for p in float64_uses(_model(cast_to=TensorProto.DOUBLE)))
    constant = helper.make_node(
        "Constant", [], ["c"], name="const64", value=helper.make_tensor("v", TensorProto.DOUBLE, [1], [1.0])
    )
    model = _model()
    model.graph.node.append(constant)
    assert any("const64" in p for p in float64_uses(model))


def test_dynamic_dims_named():
    assert dynamic_dims(_model()) == []
    found = dynamic_dims(_model(dims=("batch", 4)))
    assert found and "'batch'" in found[0] and "axis 0" in found[0]


def test_external_data_location():
    model = _model()
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [1], b"\0\0\0\0", raw=True)
    onnx.external_data_helper.set_external_data(tensor, location="w.onnx.data")
    model.graph.initializer.append(tensor)
    assert external_data_files(model) == {"w.onnx.data"}


def test_the_fp16_graphs_compute_no_product_in_float32(export_tiny):
    """Every matrix multiply of the fp16 graphs is float16, attention's Q K^T and P V included; the manifest's list is empty."""
    import json

    import onnx

    from common.onnx_checks import float32_matmuls

    folder = export_tiny("fp16")
    found = float32_matmuls(onnx.load(str(folder / "transformer.onnx"), load_external_data=False))
    listed = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["components"]["transformer"]
    assert found == [] and listed["float32_matmuls"] == []
    text_encoder = onnx.load(str(folder / "text_encoder.onnx"), load_external_data=False)
    assert float32_matmuls(text_encoder) == []
