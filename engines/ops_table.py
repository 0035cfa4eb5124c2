"""TensorRT's ONNX operator support, as data: `tensorrt_ops.json` beside this file.

The table is onnx-tensorrt's published operator list (`docs/operators.md`), one entry per ONNX
operator with its supported types and restrictions, plus overrides where TensorRT's own layer
documentation is narrower than that list (each override names its source). Regenerate it from a
newer operators.md with

    python -m engines.ops_table operators.md --commit SHA > engines/tensorrt_ops.json

and re-apply (or drop) the overrides after reading TensorRT's operator documentation again.
"""

from __future__ import annotations

import json
import re
import sys
from functools import lru_cache
from pathlib import Path

from common.cli import OneLineParser, run_cli
from common.errors import UsageError

TABLE_PATH = Path(__file__).with_name("tensorrt_ops.json")

# onnx.TensorProto element type names -> the type names operators.md uses.
ONNX_TO_TABLE_TYPE = {
    "FLOAT": "FP32",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
    "DOUBLE": "DOUBLE",
    "INT32": "INT32",
    "INT64": "INT64",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "INT4": "INT4",
    "BOOL": "BOOL",
    "FLOAT8E4M3FN": "FP8",
    "FLOAT4E2M1": "FP4",
}
# TensorRT's own operators, in ONNX domain "trt", which operators.md does not list: what the parser
# imports, in the table's entry shape. Measured with TensorRT-RTX 1.7.1's parser and builder (SM120):
# x FP32, FP16 and BF16 parse and build; outputs FP4 values and FP8 block scales (docs/engines.md#nvfp4).
TRT_DOMAIN = "trt"
TRT_DOMAIN_OPERATORS = {
    "TRT_FP4DynamicQuantize": {
        "supported": True,
        "types": ["FP32", "FP16", "BF16"],
        "restrictions": "axis -1, block_size 16, scale_type FLOAT8E4M3FN; a scalar float32 global scale",
    },
}


def operator_entry(table: dict, domain: str, op_type: str) -> dict | None:
    """The table's entry for an operator of `domain` ("" or "ai.onnx": operators.md; "trt": TensorRT's own)."""
    if domain in ("", "ai.onnx"):
        return table["operators"].get(op_type)
    if domain == TRT_DOMAIN:
        return TRT_DOMAIN_OPERATORS.get(op_type)
    return None


# Typos in the published list, read as what they plainly mean.
_TYPE_FIXES = {"INF64": "INT64"}


def parse_operators_md(text: str) -> dict:
    """The header's TensorRT version and opset range, and one entry per table row."""
    header = re.search(
        r"TensorRT\s+([0-9.]+)\s+supports operators in the inclusive range of opset\s+(\d+)\s+to opset\s+(\d+)", text
    )
    if header is None:
        raise UsageError(
            "operators.md has no 'TensorRT X supports operators in the inclusive range of opset A to opset B' line"
        )
    operators = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N") or cells[0] in ("Operator",):
            continue
        name, supported = cells[0], cells[1] == "Y"
        types = []
        if supported and len(cells) > 2:
            for token in re.split(r"[,\s]+", cells[2]):
                if token:
                    types.append(_TYPE_FIXES.get(token, token))
        restrictions = " ".join(cells[3:]).replace("<br />", " ").strip() if len(cells) > 3 else ""
        if not supported and len(cells) > 2:
            restrictions = " ".join(cells[2:]).strip()
        operators[name] = {"supported": supported, "types": types, "restrictions": restrictions}
    return {
        "tensorrt_version": header.group(1),
        "opset": {"min": int(header.group(2)), "max": int(header.group(3))},
        "operators": operators,
    }


@lru_cache(maxsize=1)
def load_table() -> dict:
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="python -m engines.ops_table", description="Turn onnx-tensorrt's operators.md into JSON."
    )
    parser.add_argument("operators_md", type=Path)
    parser.add_argument("--commit", default=None, help="onnx-tensorrt commit the file was read at")
    args = parser.parse_args(argv)
    if not args.operators_md.is_file():
        raise UsageError(f"{args.operators_md} does not exist; pass onnx-tensorrt's docs/operators.md")
    table = parse_operators_md(args.operators_md.read_text(encoding="utf-8"))
    table["source"] = {"repository": "onnx/onnx-tensorrt", "path": "docs/operators.md", "commit": args.commit}
    json.dump(table, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
