"""What TensorRT's ONNX parser needs from one graph, checked on a CPU without loading weights.

Each check takes a `Graph` (a ModelProto loaded with `load_external_data=False` plus its shape
inference) and returns `Finding`s that name the node (or tensor) at fault. The operator and type
rules come from `tensorrt_ops.json` (see `engines.ops_table`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from common.onnx_checks import dynamic_dims, external_data_files, float64_uses
from engines.ops_table import ONNX_TO_TABLE_TYPE, TRT_DOMAIN, operator_entry

DEFAULT_DOMAINS = ("", "ai.onnx")
CHECKS = (
    "opset", "operators", "types", "limits", "float64", "static", "external data", "fp8 q/dq", "nvfp4 q/dq", "io",
)  # fmt: skip


@dataclass(frozen=True)
class Finding:
    check: str
    where: str  # "node NAME (OpType)", "initializer NAME", "input NAME", "file NAME"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Graph:
    """A model without its weight bytes, with every value's element type and shape inferred."""

    model: object  # onnx.ModelProto
    path: Path
    opset: int
    types: dict[str, int] = field(default_factory=dict)  # value name -> onnx.TensorProto element type
    shapes: dict[str, tuple | None] = field(default_factory=dict)  # None: unknown rank; entries None: symbolic
    producers: dict[str, object] = field(default_factory=dict)
    consumers: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Graph:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
        graph = cls(model=model, path=Path(path), opset=opset)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:  # an op shape inference cannot handle: the checks below name what is unknown
            inferred = model
        values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
        for value in values:
            tensor = value.type.tensor_type
            graph.types[value.name] = tensor.elem_type
            if tensor.HasField("shape"):
                graph.shapes[value.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
                )
            else:
                graph.shapes.setdefault(value.name, None)
        for tensor in model.graph.initializer:
            graph.initializers[tensor.name] = tensor
            graph.types[tensor.name] = tensor.data_type
            graph.shapes[tensor.name] = tuple(tensor.dims)
        for node in model.graph.node:
            for name in node.output:
                graph.producers[name] = node
            for name in node.input:
                if name:
                    graph.consumers[name].append(node)
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        graph.types[node.output[0]] = attr.t.data_type
                        graph.shapes[node.output[0]] = tuple(attr.t.dims)
        return graph

    def constant(self, name: str):
        """The TensorProto behind `name` when it is an initializer or a Constant node's output."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            return next((a.t for a in node.attribute if a.name == "value"), None)
        return None


def node_label(node, index: int | None = None) -> str:
    name = node.name or (f"#{index}" if index is not None else "(unnamed)")
    return f"node {name} ({node.op_type})"


def type_name(elem_type: int) -> str:
    from onnx import TensorProto

    onnx_name = TensorProto.DataType.Name(elem_type) if elem_type else "UNKNOWN"
    return ONNX_TO_TABLE_TYPE.get(onnx_name, onnx_name)


def check_opset(graph: Graph, table: dict) -> list[Finding]:
    low, high = table["opset"]["min"], table["opset"]["max"]
    found = []
    if not low <= graph.opset <= high:
        found.append(
            Finding(
                "opset",
                f"file {graph.path.name}",
                f"opset {graph.opset} is outside TensorRT {table['tensorrt_version']}'s {low}..{high}; re-export with an opset in that range",
            )
        )
    for entry in graph.model.opset_import:
        if entry.domain not in (*DEFAULT_DOMAINS, TRT_DOMAIN):  # "trt": TensorRT's own operators
            found.append(
                Finding(
                    "opset",
                    f"file {graph.path.name}",
                    f"imports custom domain {entry.domain!r}, which TensorRT's parser does not know",
                )
            )
    return found


def check_operators(graph: Graph, table: dict) -> list[Finding]:
    found = []
    local_functions = {(f.domain, f.name) for f in graph.model.functions}
    for index, node in enumerate(graph.model.graph.node):
        if (node.domain, node.op_type) in local_functions:
            continue  # a model-local function: the parser inlines it, its body's nodes are what counts
        entry = operator_entry(table, node.domain, node.op_type)
        if entry is None:
            domain = f" in domain {node.domain!r}" if node.domain not in DEFAULT_DOMAINS else ""
            found.append(
                Finding(
                    "operators",
                    node_label(node, index),
                    f"operator{domain} is not in TensorRT {table['tensorrt_version']}'s ONNX operator list",
                )
            )
        elif not entry["supported"]:
            found.append(
                Finding(
                    "operators",
                    node_label(node, index),
                    f"TensorRT {table['tensorrt_version']} does not support {node.op_type}",
                )
            )
    return found


# Inputs whose type the "Supported Types" column describes, where the op schema does not say it:
# Q/DQ list the type of x; ConstantOfShape the type of the value it fills with (its output).
_DATA_INPUTS = {"QuantizeLinear": (0,), "DequantizeLinear": (0,)}
_CHECK_OUTPUT = ("ConstantOfShape", "Cast", "CastLike", "Constant")


def _data_inputs(node, opset: int) -> list[int]:
    """Indices of the inputs that carry the op's data type: those sharing a type constraint with output 0."""
    import onnx

    if node.op_type in _DATA_INPUTS:
        return [i for i in _DATA_INPUTS[node.op_type] if i < len(node.input)]
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return [0] if node.input else []
    out_type = schema.outputs[0].type_str if schema.outputs else None
    formals = schema.inputs
    picked = [i for i in range(len(node.input)) if formals and formals[min(i, len(formals) - 1)].type_str == out_type]
    return picked or ([0] if node.input else [])


def check_types(graph: Graph, table: dict) -> list[Finding]:
    found = []
    for index, node in enumerate(graph.model.graph.node):
        entry = operator_entry(table, node.domain, node.op_type)
        if not entry or not entry["supported"]:
            continue  # reported by check_operators
        names = [node.input[i] for i in _data_inputs(node, graph.opset) if node.input[i]]
        if node.op_type in _CHECK_OUTPUT or not node.input:
            names += list(node.output[:1])
        for name in dict.fromkeys(names):
            elem = graph.types.get(name, 0)
            if elem == 0:
                found.append(Finding("types", node_label(node, index), f"type of {name!r} could not be inferred"))
            elif type_name(elem) not in entry["types"]:
                listed = ", ".join(entry["types"])
                note = f" ({entry['note']})" if entry.get("note") else ""
                found.append(
                    Finding(
                        "types",
                        node_label(node, index),
                        f"{name!r} is {type_name(elem)}; TensorRT {table['tensorrt_version']} lists {listed} for {node.op_type}{note}",
                    )
                )
    return found


_RESIZE_ALLOWED = {
    "mode": ("nearest", ("nearest", "linear")),
    "coordinate_transformation_mode": (
        "half_pixel",
        ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"),
    ),
    "nearest_mode": ("round_prefer_floor", ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")),
    "keep_aspect_ratio_policy": ("stretch", ("stretch",)),
}


def check_limits(graph: Graph, table: dict) -> list[Finding]:
    """The machine-checkable restrictions of operators.md for the ops FLUX.2 graphs use."""
    import onnx

    found = []
    for index, node in enumerate(graph.model.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        label = node_label(node, index)
        if node.op_type == "Resize":
            for name, (default, allowed) in _RESIZE_ALLOWED.items():
                value = attrs.get(name, default)
                value = value.decode() if isinstance(value, bytes) else value
                if value not in allowed:
                    found.append(Finding("limits", label, f"{name}={value!r}; TensorRT supports {', '.join(allowed)}"))
            if attrs.get("antialias", 0):
                found.append(Finding("limits", label, "antialias=1; TensorRT does not support antialiasing"))
        elif node.op_type.startswith("Reduce") or node.op_type in ("Squeeze", "Unsqueeze"):
            if len(node.input) > 1 and node.input[1] and graph.constant(node.input[1]) is None:
                found.append(
                    Finding(
                        "limits", label, f"axes {node.input[1]!r} is computed at run time; TensorRT needs it constant"
                    )
                )
        elif node.op_type == "LayerNormalization":
            used = [
                name
                for name in node.output[1:]
                if name and (graph.consumers.get(name) or name in {o.name for o in graph.model.graph.output})
            ]
            if used:
                found.append(
                    Finding("limits", label, f"uses outputs {used}; TensorRT supports only the first output Y")
                )
    return found


def check_float64(graph: Graph, table: dict) -> list[Finding]:
    return [
        Finding("float64", where, "float64; TensorRT has no float64, compute it in float32")
        for where in float64_uses(graph.model)
    ]


def check_static(graph: Graph, table: dict) -> list[Finding]:
    found = [
        Finding("static", f"input/output {d.split(' axis')[0]}", f"dynamic dimension: {d}")
        for d in dynamic_dims(graph.model)
    ]
    for index, node in enumerate(graph.model.graph.node):
        for name in node.output:
            if not name or name in {o.name for o in graph.model.graph.output}:
                continue
            shape = graph.shapes.get(name, None)
            if shape is None or any(d is None or d <= 0 for d in shape):
                shown = (
                    "unknown" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
                )
                found.append(
                    Finding(
                        "static",
                        node_label(node, index),
                        f"output {name!r} has shape {shown}; engines are built for fully static shapes",
                    )
                )
    return found


def check_external_data(graph: Graph, table: dict) -> list[Finding]:
    where = f"file {graph.path.name}"
    # Several files are fine (each tensor names its own, resolved beside the model): a further size of a
    # --resolutions folder reads the first size's weights and holds its own small tables in a second file.
    files = sorted(external_data_files(graph.model))
    found = []
    for name in files:
        location = Path(name)
        if location.is_absolute() or len(location.parts) != 1:
            found.append(
                Finding(
                    "external data",
                    where,
                    f"external data {name!r} is not a file name beside the model; TensorRT resolves it relative to the model's folder",
                )
            )
            continue
        data = graph.path.parent / name
        if not data.is_file():
            found.append(Finding("external data", where, f"external data file {data} does not exist; re-export"))
            continue
        needed = 0
        for tensor in graph.model.graph.initializer:
            entries = {e.key: e.value for e in tensor.external_data}
            if entries and entries.get("location") == name:
                needed = max(needed, int(entries.get("offset", 0)) + int(entries.get("length", 0)))
        if data.stat().st_size < needed:
            found.append(
                Finding(
                    "external data",
                    where,
                    f"{data} holds {data.stat().st_size} bytes, the model points up to byte {needed}: truncated, re-export",
                )
            )
    return found
