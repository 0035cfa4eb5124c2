"""FP8 (E4M3) linear layers as standard ONNX Q/DQ: rewrite an exported bf16 graph, and audit the result.

For each `nn.Linear` chosen for FP8, its MatMul/Gemm in the graph becomes

    x ──QuantizeLinear(s_x)──DequantizeLinear(s_x)──┐
                                                    MatMul ──> y (bf16)
    W_fp8 (FLOAT8E4M3FN initializer)──DequantizeLinear(s_w)──┘

with per-tensor scales s = amax / 448 (448 is E4M3's largest finite value): s_w from the weight
itself, s_x from calibration. These are plain opset-19 operators that ONNX Runtime's CPU provider
executes and from which TensorRT's strongly typed builder takes FP8 GEMMs. The scales have the
activation's type (bf16 in a bf16 graph), because opset 19-22 QuantizeLinear requires the scale to
have the input's type and DequantizeLinear's output takes the scale's type: the DQ output then
feeds the bf16 MatMul with no Cast in between, the pattern TensorRT fuses.

The rewrite streams: the source graph is read without its external data, and each weight is read
from the data file, converted if it is an FP8 layer's, and appended to the new data file, one
tensor at a time, so memory stays at one tensor however large the model.

Linear layers are found through the metadata the dynamo exporter puts on every node
(`pkg.torch.onnx.name_scopes` and `class_hierarchy`): the node that computes `aten.linear` inside
a `torch.nn.Linear` carries the module path. The optimizer renames most weight initializers
(`val_76` for the pre-transposed weight of `...attn.to_q`), so names alone cannot be trusted.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.dtypes import numpy_of_onnx
from common.external_data import TensorReader, copy_with_external_data, flat_chunks
from common.precision import PRECISIONS
from common.precision import precision as declared
from common.specs import LORA_A, LORA_B

FP8_E4M3_MAX = 448.0

# NVIDIA's FLUX.2 recipe (Model Optimizer) keeps these in high precision: the embedders see raw
# latents and text features, the modulation linears produce the scale/shift/gate of every block
# (small layers whose error multiplies every activation), and the output layers write the
# velocity. fnmatch patterns over module paths relative to the transformer.
DEFAULT_TRANSFORMER_EXCLUDE = (
    "x_embedder",
    "context_embedder",
    "time_guidance_embed.*",
    "*modulation*",
    "norm_out.*",
    "proj_out",
)
DEFAULT_TEXT_ENCODER_EXCLUDE = ()

_LINEAR_CLASS = "torch.nn.modules.linear.Linear"
_LINEAR_OPS = ("MatMul", "Gemm")
# Ops a weight may pass through between its initializer and the MatMul (exports with optimize=False).
_WEIGHT_PASSTHROUGH = ("Transpose", "Identity")


class Fp8GraphError(Exception):
    """The graph does not have the structure the rewrite expects (an internal error, not user input)."""


@dataclass(frozen=True)
class LinearUse:
    """One call of an `nn.Linear` in the graph."""

    path: str  # module path relative to the exported model, e.g. "transformer_blocks.0.attn.to_q"
    node: str  # name of the MatMul/Gemm node
    activation: str  # value name of the input activation
    weight: str  # initializer name of the weight (possibly pre-transposed by the optimizer)
    via: tuple[str, ...]  # names of Transpose/Identity nodes between the weight and the node


def is_excluded(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def plan_precisions(paths, exclude: tuple[str, ...]) -> dict[str, str]:
    """Module path -> "fp8", or the precision fp8 graphs are traced at ("bf16") for an excluded one."""
    fp8 = PRECISIONS["fp8"]
    return {path: (fp8.traced.name if is_excluded(path, exclude) else fp8.name) for path in paths}


def linear_path(node, module_prefix: str) -> str | None:
    props = {p.key: p.value for p in node.metadata_props}
    try:
        classes = ast.literal_eval(props.get("pkg.torch.onnx.class_hierarchy", "[]"))
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return None
    # [..., 'torch.nn.modules.linear.Linear', 'aten.linear.default'] with scopes [..., '<path>', '<op>']
    if len(classes) < 2 or classes[-2] != _LINEAR_CLASS or len(scopes) < 2:
        return None
    path = scopes[-2]
    if module_prefix and path.startswith(module_prefix):
        path = path[len(module_prefix) :]
    return path


def find_linear_uses(model, module_prefix: str = "") -> list[LinearUse]:
    """Every MatMul/Gemm that the exporter traced from an `nn.Linear`, with its weight initializer."""
    initializers = {t.name for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    graph_inputs = {i.name for i in model.graph.input}
    uses = []
    for node in model.graph.node:
        if node.op_type not in _LINEAR_OPS:
            continue
        path = linear_path(node, module_prefix)
        if path is None or _is_lora_branch(node.input[1], producers, graph_inputs):
            continue
        weight, via = node.input[1], []
        while weight not in initializers:
            producer = producers.get(weight)
            if producer is None or producer.op_type not in _WEIGHT_PASSTHROUGH:
                raise Fp8GraphError(f"weight of linear {path} (node {node.name}) is not an initializer: {weight}")
            via.append(producer.name)
            weight = producer.input[0]
        uses.append(LinearUse(path, node.name, node.input[0], weight, tuple(via)))
    return uses


def _is_lora_branch(weight: str, producers: dict, graph_inputs: set) -> bool:
    """A LoRA slot's matrix multiply (export/graphs/lora_slots.py), traced inside its linear's scope: its
    'weight' is a slot input (through Cast/Transpose), which stays in the compute dtype and is not quantized."""
    while weight not in graph_inputs:
        producer = producers.get(weight)
        if producer is None or producer.op_type not in ("Cast", *_WEIGHT_PASSTHROUGH):
            return False
        weight = producer.input[0]
    return weight.startswith((LORA_A, LORA_B))


# ---------------------------------------------------------------------------------------------
# Quantization


def scale_for(amax: float, dtype) -> np.ndarray:
    """The per-tensor scale amax / 448 as a scalar of `dtype`; 1 for an all-zero tensor."""
    value = float(amax) / FP8_E4M3_MAX if amax > 0 else 1.0
    return np.asarray(value, dtype=np.float32).astype(dtype)


def abs_max(values: np.ndarray) -> float:
    return max((float(np.abs(chunk.astype(np.float32)).max()) for _, chunk in flat_chunks(values)), default=0.0)


def quantize_e4m3(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """QuantizeLinear with saturation, as ONNX defines it: x / scale in float32, round to nearest even.

    Chunked, so a large weight costs its FP8 result plus one chunk of float32 temporaries.
    """
    import ml_dtypes

    result = np.empty(values.shape, dtype=ml_dtypes.float8_e4m3fn)
    flat = result.reshape(-1)
    for start, chunk in flat_chunks(values):
        scaled = chunk.astype(np.float32) / np.float32(scale)
        flat[start : start + chunk.size] = np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return result


@dataclass
class LayerRecord:
    path: str
    precision: str  # "fp8" | "bf16" (excluded)

    @property
    def quantized(self) -> bool:
        return declared(self.precision).quantized

    weight_shape: tuple[int, ...]  # as stored in the graph: [in, out] where the optimizer pre-transposed it
    calls: int
    input_amax: float | None = None
    input_scale: float | None = None
    weight_amax: float | None = None
    weight_scale: float | None = None
    reason: str = ""

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class GraphEdits:
    """What a rewrite inserts, gathered per linear and applied to the graph at the end (FP8, NVFP4)."""

    graph: object  # the onnx.GraphProto being rewritten
    reader: TensorReader
    new_nodes: dict = field(default_factory=dict)  # node name -> nodes to insert before it
    new_initializers: list = field(default_factory=list)

    def __post_init__(self):
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.nodes_by_name = {node.name: node for node in self.graph.node}
        self.weight_users = count_users(self.graph)


@dataclass
class _Edits(GraphEdits):
    zero_point: object = None  # the shared FLOAT8E4M3FN zero point initializer
    fp8_weights: dict = field(default_factory=dict)  # original weight name -> (fp8 name, scale)


def quantize_graph(
    source: Path,
    target: Path,
    *,
    input_amax: dict[str, float],
    exclude: tuple[str, ...],
    module_prefix: str = "",
) -> list[LayerRecord]:
    """Rewrite the graph at `source` into `target` with FP8 Q/DQ on every non-excluded linear.

    `input_amax` maps module paths (relative, as `find_linear_uses` reports them) to calibrated
    activation amax. A linear chosen for FP8 without a calibrated amax is an error: nothing falls
    back silently. Returns one record per linear found, in graph order.
    """
    import onnx
    from onnx import TensorProto, helper

    source, target = Path(source), Path(target)
    model = onnx.load(str(source), load_external_data=False)
    by_path, plan = _plan_linears(model, source, input_amax, exclude, module_prefix)
    zero_point = helper.make_tensor("fp8_zero_point", TensorProto.FLOAT8E4M3FN, [], [0.0])
    edits = _Edits(model.graph, TensorReader(source.parent), zero_point=zero_point)
    records = []
    for path, path_uses in by_path.items():
        weight_proto = edits.initializers[path_uses[0].weight]
        record = LayerRecord(path, plan[path], tuple(weight_proto.dims), len(path_uses))
        records.append(record)
        if record.quantized:
            _quantize_linear(record, path_uses, input_amax[path], edits)
        else:
            record.reason = f"excluded by {next(p for p in exclude if is_excluded(path, (p,)))!r}"
    _apply(model, edits)
    fp8_weights = edits.fp8_weights

    def transform(tensor, tensors: TensorReader):
        # Quantized while writing (read a second time), so only one weight is in memory at once.
        if tensor.name not in fp8_weights:
            return None
        fp8_name, weight_scale = fp8_weights.pop(tensor.name)
        values = quantize_e4m3(tensors.array(tensor), weight_scale)
        tensor.name = fp8_name
        tensor.data_type = TensorProto.FLOAT8E4M3FN
        return values

    copy_with_external_data(model, source.parent, target, transform)
    return records


def linears_by_path(model, source: Path, module_prefix: str, what: str) -> dict[str, list[LinearUse]]:
    """{module path: its uses}, in graph order; refuses a graph with no labelled linear to place `what` on."""
    uses = find_linear_uses(model, module_prefix)
    if not uses:
        raise Fp8GraphError(f"{source} has no nn.Linear nodes the exporter labelled; cannot place {what}")
    by_path: dict[str, list[LinearUse]] = {}
    for use in uses:
        by_path.setdefault(use.path, []).append(use)
    return by_path


def _plan_linears(model, source: Path, input_amax, exclude, module_prefix: str):
    """({module path: its uses}, {module path: precision}); refuses a graph the rewrite cannot place."""
    by_path = linears_by_path(model, source, module_prefix, "FP8 Q/DQ")
    plan = plan_precisions(by_path, exclude)
    missing = [p for p, name in plan.items() if declared(name).quantized and p not in input_amax]
    if missing:
        raise Fp8GraphError(f"no calibrated input amax for {len(missing)} FP8 layer(s), e.g. {missing[:3]}")
    return by_path, plan


def _quantize_linear(record: LayerRecord, path_uses: list[LinearUse], input_amax: float, edits: _Edits) -> None:
    """Scales for one FP8 linear, its weight's DQ and a Q/DQ pair on each of its inputs."""
    path, first = record.path, path_uses[0]
    if len({u.weight for u in path_uses}) != 1:
        raise Fp8GraphError(f"linear {path} uses different weight initializers: {[u.weight for u in path_uses]}")
    weight_proto = edits.initializers[first.weight]
    # MatMul and Gemm take A and B of one type, and Transpose/Identity keep it: the weight's
    # type is the activation's, which the scales must have.
    compute_type = weight_proto.data_type
    scale_dtype = numpy_of_onnx(compute_type)
    weight = edits.reader.array(weight_proto)
    record.weight_amax = abs_max(weight)
    weight_scale = scale_for(record.weight_amax, scale_dtype)
    record.weight_scale = float(weight_scale.astype(np.float32))
    record.input_amax = float(input_amax)
    input_scale = scale_for(record.input_amax, scale_dtype)
    record.input_scale = float(input_scale.astype(np.float32))
    del weight

    fp8_name = f"{path}.weight_fp8"
    edits.fp8_weights[first.weight] = (fp8_name, weight_scale)
    w_scale_name, x_scale_name = f"{path}.weight_scale", f"{path}.input_scale"
    edits.new_initializers.append(scalar_initializer(w_scale_name, weight_scale, compute_type))
    edits.new_initializers.append(scalar_initializer(x_scale_name, input_scale, compute_type))
    # The DQ sits directly on the initializer; a Transpose between it and the MatMul is
    # kept (TensorRT propagates DQ through Transpose). Shared weights are not expected.
    if edits.weight_users.get(first.weight, 0) != len(path_uses):
        raise Fp8GraphError(f"weight {first.weight} of linear {path} is also used outside that linear")
    zero = edits.zero_point.name
    weight_dq = f"{path}.weight_dequantized"
    weight_dq_node = make_node("DequantizeLinear", [fp8_name, w_scale_name, zero], weight_dq, path)
    for index, use in enumerate(path_uses):
        suffix = f".{index}" if len(path_uses) > 1 else ""
        q_out, dq_out = f"{path}.input_fp8{suffix}", f"{path}.input_dequantized{suffix}"
        node = edits.nodes_by_name[use.node]
        edits.new_nodes.setdefault(use.node, []).extend(
            [
                make_node("QuantizeLinear", [use.activation, x_scale_name, zero], q_out, path),
                make_node("DequantizeLinear", [q_out, x_scale_name, zero], dq_out, path),
            ]
        )
        node.input[0] = dq_out
        # The weight DQ goes right before the first node that reads the weight (the MatMul,
        # or the Transpose in front of it), keeping the node list topologically sorted.
        weight_consumer = edits.nodes_by_name[use.via[-1]] if use.via else node
        weight_consumer.input[0 if use.via else 1] = weight_dq
        if index == 0:
            edits.new_nodes.setdefault(weight_consumer.name, []).insert(0, weight_dq_node)


def _apply(model, edits: _Edits) -> None:
    """Insert the gathered nodes in order, add the scales, retype the renamed weights' value_info."""
    from onnx import TensorProto

    if edits.new_nodes:
        ordered = []
        for node in model.graph.node:
            ordered.extend(edits.new_nodes.get(node.name, ()))
            ordered.append(node)
        del model.graph.node[:]
        model.graph.node.extend(ordered)
        model.graph.initializer.append(edits.zero_point)
        model.graph.initializer.extend(edits.new_initializers)
    for info in model.graph.value_info:  # a renamed weight's type entry follows it (it would name nothing)
        if info.name in edits.fp8_weights:
            info.name = edits.fp8_weights[info.name][0]
            info.type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN


def count_users(graph) -> dict[str, int]:
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    return users


def scalar_initializer(name: str, value: np.ndarray, data_type: int):
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=data_type)
    tensor.raw_data = np.asarray(value).tobytes()
    return tensor


def make_node(op_type: str, inputs: list[str], output: str, path: str, **attributes):
    from onnx import helper

    node = helper.make_node(op_type, inputs, [output], name=f"{output}/{op_type}", **attributes)
    entry = node.metadata_props.add()
    entry.key, entry.value = "flux2_trt.fp8_layer", path  # for a reader; audit_qdq does not trust it
    return node


# ---------------------------------------------------------------------------------------------
# Audit: what the graph actually holds, independent of what the rewrite meant to do


def audit_qdq(model, module_prefix: str = "") -> dict[str, dict]:
    """Per linear: weight DQs fed by an FP8 initializer, and activation Q->DQ pairs feeding it.

    Walks the graph structure only (no metadata written by the rewrite is trusted): a linear's
    weight path is followed back from its MatMul/Gemm through DequantizeLinear and Transpose.
    """
    from onnx import TensorProto

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    result: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type not in _LINEAR_OPS:
            continue
        path = linear_path(node, module_prefix)
        if path is None:
            continue
        entry = result.setdefault(
            path, {"calls": 0, "weight_dq_fp8": 0, "activation_qdq": 0, "weight_dtype": None, "weight_dq_nodes": set()}
        )
        entry["calls"] += 1
        # weight side
        name = node.input[1]
        while name not in initializers:
            producer = producers.get(name)
            if producer is None:
                break
            if producer.op_type == "DequantizeLinear":
                source = initializers.get(producer.input[0])
                if source is not None and source.data_type == TensorProto.FLOAT8E4M3FN:
                    entry["weight_dq_nodes"].add(producer.name)
                    entry["weight_dtype"] = "float8e4m3fn"
                break
            if producer.op_type not in _WEIGHT_PASSTHROUGH:
                break
            name = producer.input[0]
        if name in initializers:
            entry["weight_dtype"] = TensorProto.DataType.Name(initializers[name].data_type).lower()
        # activation side: DQ <- Q with FP8 output
        dq = producers.get(node.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[1] == dq.input[1]:
                zp = initializers.get(q.input[2]) if len(q.input) > 2 else None
                if zp is not None and zp.data_type == TensorProto.FLOAT8E4M3FN:
                    entry["activation_qdq"] += 1
    for entry in result.values():
        entry["weight_dq_fp8"] = len(entry.pop("weight_dq_nodes"))
    return result


def audit_problems(model, module_prefix: str, records: list[LayerRecord]) -> list[str]:
    """What the written graph holds that the records did not ask for (empty: as asked)."""
    audit = audit_qdq(model, module_prefix)
    return mismatches(audit, records, ("weight_dq_fp8", "activation_qdq"), "weight DQ / activation Q-DQ")


def mismatches(audit: dict, records: list[LayerRecord], counts: tuple[str, str], what: str) -> list[str]:
    """Each linear whose (weight dequantizers, activation quantizers) in `audit` is not (1, calls) or (0, 0)."""
    problems = []
    for record in records:
        found = audit.get(record.path, {})
        want = (1, record.calls) if record.quantized else (0, 0)
        got = tuple(found.get(name) for name in counts)
        if got != want:
            problems.append(f"{record.path}: {what} {got}, expected {want}")
    return problems


def weight_bytes(model, exclude: tuple[str, ...]) -> dict:
    """Bytes of a module's parameters at bf16 and in an FP8 export with `exclude` (meta modules work).

    Each FP8 linear's weight takes one byte per element; every other parameter stays bf16. The
    graph adds constants of its own (RoPE tables, scales) that this does not count.
    """
    import torch

    fp8_params = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not is_excluded(name, exclude):
            fp8_params += module.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    bf16_bytes = 2 * total
    fp8_bytes = fp8_params + 2 * (total - fp8_params)
    return {
        "params": total,
        "fp8_params": fp8_params,
        "bf16_bytes": bf16_bytes,
        "fp8_bytes": fp8_bytes,
        "ratio": fp8_bytes / bf16_bytes if bf16_bytes else 0.0,
    }
