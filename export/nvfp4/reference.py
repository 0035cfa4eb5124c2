"""NVFP4 in PyTorch: diffusers' transformer computing each NVFP4 linear as the graph does, in float32.

The reference an NVFP4 graph is checked against beside fp32 (issue 22, item 3): the same module,
with each listed `nn.Linear` computing

    fake_quantize(x, g_x) @ W.T + b

where `W` is the float32 weight the graph's FP4 `DequantizeLinear` pair computes
(`common.nvfp4.dequantize`, read from the written graph itself) and `fake_quantize` is
`common.nvfp4.fake_quantize`'s rule in torch, bit for bit on float32 inputs: blocks of 16 along
the last axis, block scale amax / 6 / g_x rounded to E4M3 (saturated at 448), values rounded to
E2M1 (nearest, ties to even, saturated at 6). `g_x` is a static global scale (the calibrated one,
or the published file's `input_scale`) or, where the layer has none, the call's own amax / 2688
over the whole tensor: ComfyUI's behaviour for a published layer without `input_scale`.

Against this reference the float32 twin differs only in operation order: a quantization error in
the graph (a nibble order, a scale layout, a wrong global) shows here at full size, while against
fp32 it would hide inside the 4-bit error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import nvfp4

WEIGHT_SUFFIX = ".weight_fp4"  # export.nvfp4.rewrite's name for a linear's FP4 codes: `<path>.weight_fp4`
DYNAMIC_QUANTIZE = ("trt", "TRT_FP4DynamicQuantize")  # (domain, op_type) of the activation quantizer
LAYER_KEY = "flux2_trt.nvfp4_layer"  # the quantizer's metadata entry naming its linear


@dataclass(frozen=True)
class LayerQuant:
    """How one linear computes: its NVFP4 weight and its activations' global scale (None: dynamic)."""

    weight: nvfp4.Nvfp4Tensor
    input_scale: float | None


def dynamic_global_scale(x: torch.Tensor) -> torch.Tensor:
    """The dynamic global scale of one call: amax(|x|) / 2688 over the whole tensor (1 when all zero)."""
    return torch.tensor(nvfp4.global_scale(float(x.detach().abs().max())), dtype=torch.float32)


def fake_quantize(x: torch.Tensor, input_scale: float | torch.Tensor | None) -> torch.Tensor:
    """`x` through NVFP4 and back along its last axis, float32; `common.nvfp4.fake_quantize` bit for bit."""
    x = x.float()
    scale = dynamic_global_scale(x) if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float32)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // nvfp4.BLOCK, nvfp4.BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    wanted = torch.clamp_max(amax / nvfp4.E2M1_MAX / scale, nvfp4.E4M3_MAX)  # past 448 E4M3 is NaN
    block_scale = wanted.to(torch.float8_e4m3fn).float() * scale  # float32(e4m3) * global: one rounding
    scaled = torch.where(block_scale > 0, blocks / block_scale, torch.zeros((), dtype=torch.float32))
    return (_round_e2m1(scaled) * block_scale).reshape(x.shape)


def _round_e2m1(values: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives), ties to even, saturating at 6.

    E2M1's grid has spacing 0.5 below 2, 1 up to 4 and 2 up to 6; torch.round is ties-to-even, which at
    each spacing picks E2M1's even neighbour (the one with the zero mantissa bit).
    """
    magnitude = values.abs().clamp_max(nvfp4.E2M1_MAX)
    rounded = torch.where(
        magnitude < 2,
        torch.round(magnitude * 2) / 2,
        torch.where(magnitude < 4, torch.round(magnitude), torch.round(magnitude / 2) * 2),
    )
    return torch.copysign(rounded, values)


class _Nvfp4Forward:
    """A linear's forward replaced: fake-quantized input, dequantized float32 weight, its own bias."""

    def __init__(self, linear: nn.Linear, quant: LayerQuant):
        self.bias = linear.bias
        self.weight = torch.from_numpy(nvfp4.dequantize(quant.weight))  # [N, K] float32
        self.input_scale = quant.input_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        y = nn.functional.linear(fake_quantize(x, self.input_scale), self.weight, bias)
        return y.to(x.dtype)


@contextlib.contextmanager
def apply_nvfp4(transformer: nn.Module, layers: Mapping[str, LayerQuant]) -> Iterator[nn.Module]:
    """Within the block, each linear of `layers` (paths relative to `transformer`) computes in NVFP4.

    The modules' own forwards come back on exit, whatever happens inside.
    """
    modules = dict(transformer.named_modules())
    replaced = []
    try:
        for path, quant in layers.items():
            linear = modules.get(path)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"NVFP4 layer {path!r}: the transformer has no nn.Linear there (found {linear!r})")
            if tuple(linear.weight.shape) != quant.weight.shape:
                raise ValueError(
                    f"NVFP4 layer {path!r}: weight {quant.weight.shape} does not fit the linear's "
                    f"{tuple(linear.weight.shape)}"
                )
            linear.forward = _Nvfp4Forward(linear, quant)
            replaced.append(linear)
        yield transformer
    finally:
        for linear in replaced:
            del linear.forward  # the instance attribute: nn.Linear.forward is back


def layers_from_graph(path: Path) -> dict[str, LayerQuant]:
    """Each NVFP4 linear of the graph at `path`, as its initializers hold it (so the reference uses its bytes).

    The weight is `<linear>.weight_fp4` (FLOAT4E2M1 [N, K]) with the block scales and global scale its
    DequantizeLinear reads; the input scale is what feeds that linear's `TRT_FP4DynamicQuantize`: an
    initializer's value, or None (dynamic) where the graph computes it.
    """
    import onnx

    from common.external_data import TensorReader

    model = onnx.load(str(path), load_external_data=False)
    reader = TensorReader(Path(path).parent)
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    input_scales = {}
    for node in model.graph.node:
        if (node.domain, node.op_type) == DYNAMIC_QUANTIZE:
            linear = next(e.value for e in node.metadata_props if e.key == LAYER_KEY)
            scale = initializers.get(node.input[1])
            input_scales[linear] = None if scale is None else float(reader.array(scale))
    layers = {}
    for node in model.graph.node:
        codes = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is None or codes.data_type != onnx.TensorProto.FLOAT4E2M1:
            continue
        linear = codes.name.removesuffix(WEIGHT_SUFFIX)
        scales_node = producers[node.input[1]]  # DequantizeLinear(E4M3 block scales, global scale)
        rows, columns = tuple(codes.dims)
        weight = nvfp4.Nvfp4Tensor(
            np.array(reader.packed(codes)).reshape(rows, columns // 2),
            np.array(reader.array(initializers[scales_node.input[0]])),
            np.float32(reader.array(initializers[scales_node.input[1]])),
        )
        layers[linear] = LayerQuant(weight, input_scales[linear])
    return layers
