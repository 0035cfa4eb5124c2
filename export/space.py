"""How many bytes a component's ONNX export writes, from its checkpoint's safetensors headers.

Read before writing so a disk too small is refused up front (one line, nothing written), not after
an hour of streaming with a half-written 30 GB file. Only the headers are read: element counts
times the exported precision's bytes per element. The whole component is counted (the VAE's
encoder, text-encoder layers past the last one used), so the estimate errs high, by the share of
weights the graph leaves out. Besides weights a graph holds its structure and tables computed at
the export's shapes (RoPE, position ids): on the tiny checkpoint at 128x128 the transformer wrote
1.2 MB for 0.4 MB of weights, a few MB at full size; SLACK covers them.
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

from common.precision import Precision
from common.precision import precision as declared
from export.checkpoint import Checkpoint, weight_files
from export.components import COMPONENTS

SLACK = 64 * 2**20


def _elements(path: Path) -> int:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def expected_bytes(checkpoint: Checkpoint, component: str, precision: str | Precision) -> int:
    """`precision` is the component's own (`Precision.of_component`): an fp8 folder's VAE is bf16."""
    files = weight_files(COMPONENTS[component].weights_dir(checkpoint))
    return sum(_elements(path) for path in files) * declared(precision).bytes_per_element + SLACK
