"""The fp16 transformer's products: float16 weights, linears and attention, scaled into range; the rest float32.

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

Attention (`Float16Attention`) computes Q K^T, softmax and P V in float16 as well, V scaled per
channel by a power of two; the residual stream, normalisation and modulation stay float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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


QUERY_NORMS = ("norm_q", "norm_added_q")
KEY_NORMS = ("norm_k", "norm_added_k")


def check_attention_scores(tensors: dict, where: str) -> None:
    """Refuse an attention whose RMS-normalised Q and K can give float16 scores past 65504.

    `tensors`: name -> tensor, including each attention's `norm_q.weight`/`norm_k.weight` (and the
    text stream's `norm_added_*`). |q . k| <= max|g_q| x max|g_k| x head_dim: RMSNorm makes a row's
    norm sqrt(head_dim) before its gains, and RoPE is a rotation. Other products are bounded by the
    row scales; this one is bounded by the weights alone, so it is checked for every input here.
    """
    gains: dict[str, dict[str, float]] = {}
    for name, tensor in tensors.items():
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[2] == "weight" and parts[1] in QUERY_NORMS + KEY_NORMS:
            side = "q" if parts[1] in QUERY_NORMS else "k"
            entry = gains.setdefault(parts[0], {"q": 0.0, "k": 0.0, "dim": tensor.numel()})
            entry[side] = max(entry[side], float(tensor.float().abs().max()))
    for attention, entry in gains.items():
        bound = entry["q"] * entry["k"] * entry["dim"]
        if not bound <= FLOAT16_MAX:
            raise CheckpointError(
                f"{where}: attention {attention} has Q/K norm gains up to {entry['q']:.4g} / {entry['k']:.4g}, so "
                f"float16 scores can reach {bound:.4g}, past {FLOAT16_MAX:.0f}; export this checkpoint at --precision bf16"
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
        state = model.state_dict()
        for name, tensor in state.items():
            check_float16(tensor.to(dtype), tensor, f"tensor {name}")
        check_attention_scores(state, "the transformer")
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


class Float16Attention(TorchFunctionMode):
    """Within it, attention on float32 inputs runs in float16: Q K^T, softmax and P V.

    Q and K are RMS-normalised in FLUX.2 (their rows' norms are bounded by sqrt(head_dim) times the
    norms' gains; RoPE rotates, which keeps norms), so the scores are in float16's range. V is
    not bounded: each of its channels is scaled by a power of two (its largest |value| over the
    tokens) into [-1, 1], which factors out of P V exactly as a linear's row scales do, and is
    scaled back in float32. The softmax's weights sum to 1, so the float16 product is bounded by 1.
    diffusers' attention (`dispatch_attention_fn`'s native backend) calls
    `F.scaled_dot_product_attention`; this mode replaces that one call, nothing else.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value")
        query, key, value = list(args[:3]) + [kwargs.pop(name) for name in names[len(args[:3]) :]]
        if query.dtype != torch.float32:
            return func(query, key, value, *args[3:], **kwargs)
        scale = torch.exp2(torch.ceil(torch.log2(value.abs().amax(dim=-2, keepdim=True).clamp_min(2.0**-24))))
        out = func(query.half(), key.half(), (value / scale).half(), *args[3:], **kwargs)
        return out.float() * scale
