"""What a transformer graph costs on the GPU, counted from TensorRT's parsed network (no GPU needed).

python tools/network_census.py TRANSFORMER.onnx [--double N --single M] [--json OUT]

Parses the graph with TensorRT-RTX's ONNX parser (`tensorrt_rtx`, CPU only) and, per layer of the
network: its type and output type, the FLOPs of each matrix multiply (2 x output elements x the
contracted dimension, by input type) and, for every computing layer with a float32 output, the
bytes it reads and writes (its inputs' and output's elements x their sizes). Layers are put in
buckets by the ONNX node's name scope (outside the blocks, per double-stream block, per
single-stream block), so a slice with one block of each (bench.export_memory's 1+1 slice) is
scaled to the full model: outside + N x double + M x single (FLUX.2 [dev]: 8 and 48).

The byte count is an upper bound on float32 traffic: TensorRT fuses chains of elementwise layers
into one kernel, which then reads and writes only the chain's ends. See docs/export.md.
"""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.cli import OneLineParser, run_cli  # noqa: E402

# Layers that move or describe data without computing on it (or that TensorRT folds away).
NOT_COMPUTING = {"CONSTANT", "SHUFFLE", "SLICE", "CONCATENATION", "SHAPE", "GATHER", "SQUEEZE", "UNSQUEEZE"}
BYTES = {"FLOAT": 4, "HALF": 2, "BF16": 2, "FP8": 1, "INT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1}


def _name(enum_value) -> str:
    return str(enum_value).rsplit(".", 1)[-1]


def _elements(shape) -> int:
    return math.prod(max(int(d), 1) for d in shape)


def node_buckets(onnx_path: Path) -> dict[str, str]:
    """ONNX node name -> "outside" | "double" | "single", from the exporter's name scopes."""
    import onnx

    buckets = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        buckets[node.name] = (
            "double" if "transformer_blocks." in scopes and "single_" not in scopes
            else "single" if "single_transformer_blocks." in scopes
            else "outside"
        )  # fmt: skip
    return buckets


def _bucket(layer_name: str, buckets: dict[str, str]) -> str:
    # TensorRT names a layer after its ONNX node, sometimes with a suffix for helper layers.
    if layer_name in buckets:
        return buckets[layer_name]
    match = max((n for n in buckets if layer_name.startswith(n)), key=len, default=None)
    return buckets[match] if match else "outside"


def census(onnx_path: Path) -> dict:
    import tensorrt_rtx as trt

    buckets = node_buckets(onnx_path)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise SystemExit(f"error: TensorRT-RTX could not parse {onnx_path}; run python -m engines.check")
    layers = collections.Counter()
    per = {b: collections.Counter() for b in ("outside", "double", "single")}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        kind, out_type = _name(layer.type), _name(layer.get_output_type(0))
        layers[f"{kind} {out_type}"] += 1
        counts = per[_bucket(layer.name, buckets)]
        if kind == "MATRIX_MULTIPLY":
            layer.__class__ = trt.IMatrixMultiplyLayer
            a = layer.get_input(0).shape
            k = a[-1] if layer.op0 == trt.MatrixOperation.NONE else a[-2]
            counts[f"matmul_flops_{_name(layer.get_input(0).dtype)}"] += 2 * _elements(layer.get_output(0).shape) * k
        elif kind not in NOT_COMPUTING and out_type == "FLOAT":
            moved = _elements(layer.get_output(0).shape) * 4
            for j in range(layer.num_inputs):
                tensor = layer.get_input(j)
                if tensor is not None:
                    moved += _elements(tensor.shape) * BYTES.get(_name(tensor.dtype), 4)
            counts["float32_bytes"] += moved
            counts[f"float32_bytes_{kind}"] += moved
    return {
        "onnx": str(onnx_path),
        "layers_by_output_type": dict(sorted(layers.items())),
        "float_layers": sum(n for key, n in layers.items() if key.endswith(" FLOAT")),
        "half_layers": sum(n for key, n in layers.items() if key.endswith(" HALF")),
        "per_bucket": {b: dict(c) for b, c in per.items()},
    }


def scaled(result: dict, double: int, single: int) -> dict:
    """The per-step totals of a model with `double` + `single` blocks, from a 1+1 slice's buckets."""
    per = result["per_bucket"]
    keys = set().union(*per.values())
    return {
        k: per["outside"].get(k, 0) + double * per["double"].get(k, 0) + single * per["single"].get(k, 0) for k in keys
    }


def main(argv=None) -> int:
    parser = OneLineParser(prog="python tools/network_census.py", description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path)
    parser.add_argument(
        "--double", type=int, default=8, help="double-stream blocks of the full model (FLUX.2 [dev]: 8)"
    )
    parser.add_argument("--single", type=int, default=48, help="single-stream blocks of the full model ([dev]: 48)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if not args.onnx.is_file():
        parser.error(f"{args.onnx} does not exist; give the transformer.onnx of an artifacts folder")
    result = census(args.onnx)
    result["full_model"] = {"double": args.double, "single": args.single, **scaled(result, args.double, args.single)}
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
