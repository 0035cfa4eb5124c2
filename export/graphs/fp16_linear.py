"""The fp16 transformer's linears: float16 weights and products, scaled into range, everything else float32.

Each matrix multiply of the fp16 graph sees an input row scaled into [-1, 1] and a weight whose
rows sum (in absolute value) to at most `WEIGHT_ROW_BOUND`, both by powers of two, so its float16
result is bounded by 2**14 and the scaling itself rounds nothing; the float32 result is scaled
back. Measured on the stress checkpoint (flux2_tiny.stress, docs/export.md): without it the fp16
graph gives NaN, as does diffusers' own float16 pipeline (whose clip at block ends comes after the inf).

The weight's row scales are computed here, at export, from the checkpoint's own (bf16 or float32)
values, and stored with the scaled float16 weight: a buffer `weight_row_scale` [out_features]
(float32) beside each `nn.Linear`'s `weight`, which keeps diffusers' name. The graph holds only
the multiply that undoes them. (They were computed inside the graph before, from the float16
weight: a weight past 65504 was inf before any scaling, and TensorRT constant-folded a
weight-sized float32 subgraph per linear at build time, past 5.3 x the weights in host memory.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import CheckpointError

WEIGHT_ROW_BOUND = 2.0**14
ROW_SCALE = "weight_row_scale"  # the buffer beside each scaled nn.Linear's weight
FLOAT16_MAX = 65504.0


def row_scales(block: torch.Tensor) -> torch.Tensor:
    """Powers of two [rows] that bring each row's absolute sum to at most WEIGHT_ROW_BOUND (1 where it is)."""
    sums = block.float().abs().sum(dim=-1)
    return torch.exp2(torch.ceil(torch.log2((sums / WEIGHT_ROW_BOUND).clamp_min(1.0))))


def check_row_scales(scales: torch.Tensor, block: torch.Tensor, where: str, first_row: int = 0) -> None:
    """Refuse rows no power of two brings into float16: their absolute sum overflows float32, or they hold inf/nan."""
    bad = ~torch.isfinite(scales)
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    largest = float(block[row].float().abs().max())
    raise CheckpointError(
        f"{where}: row {first_row + row} (largest |value| {largest:.4g}) cannot be represented in float16, "
        "even scaled by a power of two; export this checkpoint at --precision bf16"
    )


def scale_rows(block: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """The rows of `block` divided by their scales (exact: powers of two) and cast to `dtype`."""
    return (block.float() / scales[:, None]).to(dtype)


def check_float16(tensor: torch.Tensor, source: torch.Tensor, where: str) -> None:
    """Refuse a tensor that was finite in the checkpoint and is not once cast to float16."""
    if tensor.dtype != torch.float16 or bool(torch.isfinite(tensor).all()) or not bool(torch.isfinite(source).all()):
        return
    largest = float(source.float().abs().max())
    raise CheckpointError(
        f"{where} holds values up to {largest:.4g}, past float16's {FLOAT16_MAX:.0f} (only linear weights are "
        "scaled into range); export this checkpoint at --precision bf16"
    )


def scaled_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def prescale_loaded(model: nn.Module, dtype=torch.float16) -> nn.Module:
    """A loaded model (its weights in the checkpoint's precision or float32) made ready for the fp16 graph.

    Each nn.Linear's weight is scaled by its rows' powers of two and every tensor cast to `dtype`;
    the scales become the float32 `weight_row_scale` buffers. The streaming export does the same
    from the safetensors files (`export.writing.streaming`), never holding the model.
    """
    with torch.no_grad():
        scales = {}
        for name, linear in scaled_linears(model):
            scale = row_scales(linear.weight)
            check_row_scales(scale, linear.weight, f"weight {name}.weight")
            linear.weight.data = scale_rows(linear.weight, scale, torch.float32)
            scales[name] = scale
        for name, tensor in model.state_dict().items():
            check_float16(tensor.to(dtype), tensor, f"tensor {name}")
        model.to(dtype)
        for name, linear in scaled_linears(model):
            linear.register_buffer(ROW_SCALE, scales[name], persistent=False)
    return model


def use_fp16_linears(model: nn.Module) -> dict[str, str]:
    """Bind the fp16 forwards on the model's instances; returns {weight name: its row-scale buffer name}.

    A linear without row scales yet (the streaming export's weightless model) gets ones, which the
    export replaces by the checkpoint's scales before anything is written.
    """
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if ROW_SCALE not in module._buffers:
                ones = torch.ones(module.out_features, dtype=torch.float32, device="cpu")
                module.register_buffer(ROW_SCALE, ones, persistent=False)
            # Bound on the instance, so parameter names (and ONNX initializer names) stay diffusers'.
            module.forward = fp16_linear.__get__(module)
            names[f"{name}.weight"] = f"{name}.{ROW_SCALE}"
        elif isinstance(module, nn.RMSNorm):
            module.forward = float32_rms_norm.__get__(module)
    return names


def fp16_linear(self, x):
    """nn.Linear with a row-scaled float16 weight on a float32 input: the product in float16, without overflow."""
    x = x.float()
    x_scale = torch.exp2(torch.ceil(torch.log2(x.abs().amax(dim=-1, keepdim=True).clamp_min(2.0**-24))))
    product = F.linear((x / x_scale).to(self.weight.dtype), self.weight)
    out = product.float() * (x_scale * getattr(self, ROW_SCALE))
    return out if self.bias is None else out + self.bias.float()


def float32_rms_norm(self, x):
    """torch's RMSNorm computed in float32 (its float16 weight upcast), as the rest of the fp16 stream."""
    weight = None if self.weight is None else self.weight.float()
    return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps)
