"""The second reference of a quantized graph: fp32 PyTorch computing the graph's own quantization.

Against fp32 PyTorch a quantized graph is held to its precision's loose bound (4-bit weights and
activations move the tiny transformer's velocity by ~15 % rel L2), and a layout error of the
same size could hide inside it. Against the fp32 module with the same fake quantization, built
from the written graph's weights (`export.nvfp4.reference`), the twin differs only in operation
order, so the bound is tight and a wrong nibble order, scale or global scale fails it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from common.precision import Tolerance

# Twin (ONNX Runtime) vs the fake-quantized module (PyTorch), both float32 on the same weights and
# quantization: only operation order differs, yet not by 1e-6. Measured on the tiny default: the first
# NVFP4 linear's inputs already differ by 5.5e-6 rel L2 (the sinusoidal timestep embedding at t ~ 1000
# is where the two libraries' float32 round differently), which moves 3.5e-4 of its fake-quantized
# elements across an E2M1 or E4M3 rounding boundary; each flip is a whole 4-bit step, so the gap
# grows layer by layer (30 % of the last linear's elements). At the output: rel L2 0.030, cosine
# 0.99956 at 1024^2 (512 tokens), 0.013 / 0.99991 at 256^2 (128 tokens), against 0.15-0.19 vs fp32.
# The bound is twice the worst of those; the nibbles read the other way round measure 0.52 / 0.865,
# every activation scale dynamic instead of calibrated 0.11 (tests/test_nvfp4_reference.py).
NVFP4_TOLERANCE = Tolerance(max_rel_l2=6e-2, min_cosine=0.998)
NVFP4_METHOD = "pytorch-fp32-nvfp4-fake-quant"  # export.nvfp4.reference on the graph's own weights


@dataclass(frozen=True)
class FakeQuantReference:
    """One reference output and the bound the twin is held to against it."""

    method: str
    value: np.ndarray
    tolerance: Tolerance

    def judge(self, output: str, actual: np.ndarray) -> dict:
        """The report's `fake_quant_reference` part: method, metrics per output, bounds, passed."""
        metrics = self.tolerance.judge(actual, self.value)
        return {
            "method": self.method,
            "outputs": {output: metrics},
            "tolerance": dataclasses.asdict(self.tolerance),
            "passed": metrics["passed"],
        }

    def describe(self, part: dict) -> list[str]:
        return [self.tolerance.describe(f"fake-quant reference {n}", m) for n, m in part["outputs"].items()]


def nvfp4_reference(model, graph_module, graph_path, inputs: list) -> FakeQuantReference:
    """`graph_module` (fp32, its transformer `model`) run on `inputs` with the graph's NVFP4 linears."""
    import torch

    from export.nvfp4.reference import apply_nvfp4, layers_from_graph

    with apply_nvfp4(model, layers_from_graph(graph_path)), torch.no_grad():
        value = graph_module(*[torch.from_numpy(x) for x in inputs])
    value = (value[0] if isinstance(value, tuple) else value).numpy()  # the first output: the one it is judged on
    return FakeQuantReference(NVFP4_METHOD, value, NVFP4_TOLERANCE)


# Precision.rewrite -> its fake-quantized PyTorch reference (fp8 has none yet).
REFERENCES = {"nvfp4": nvfp4_reference}
