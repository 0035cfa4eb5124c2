"""The VAE decoder as an exportable module: the sampler's packed latents -> image in [-1, 1].

Unpacking, BatchNorm de-normalisation and unpatchify live in this graph rather than in the
runtime: the BatchNorm statistics are VAE weights and travel with them, and TensorRT fuses the
reshapes into the first convolution's input. The steps are diffusers' Flux2Pipeline's, in its
order: unpack tokens to [B, C*4, h, w] (row-major, as `_unpack_latents_with_ids` does for the
standard position ids), `x * sqrt(var + eps) + mean`, unpatchify to [B, C, 2h, 2w], decode.

The decoder's nearest-neighbour upsampling runs in float32 with casts around it: TensorRT's Resize
layer documentation lists int8, float16 and float32, no bfloat16 (see engines/tensorrt_ops.json).
Nearest-neighbour copies values, so the casts change no number at any precision.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from common.specs import Geometry, Shapes


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module, geometry: Geometry, shapes: Shapes):
        super().__init__()
        self.vae = vae
        step = geometry.pixels_per_token
        self.rows, self.cols = shapes.height // step, shapes.width // step
        dtype = vae.post_quant_conv.weight.dtype if vae.post_quant_conv is not None else torch.float32
        mean = vae.bn.running_mean.detach().float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.detach().float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        # Computed in float32 and cast once, as diffusers casts the statistics to the latents' dtype.
        self.register_buffer("bn_mean", mean.to(dtype), persistent=False)
        self.register_buffer("bn_std", std.to(dtype), persistent=False)
        for module in vae.decoder.modules():
            if _is_plain_nearest_upsample(module):
                # Bound on the instance, so parameter names (and ONNX initializer names) stay diffusers'.
                module.forward = types.MethodType(_float32_nearest_upsample, module)

    def forward(self, packed_latents):
        dtype = self.bn_mean.dtype
        batch, _, channels = packed_latents.shape
        latents = packed_latents.to(dtype).permute(0, 2, 1).reshape(batch, channels, self.rows, self.cols)
        latents = latents * self.bn_std + self.bn_mean
        latents = latents.reshape(batch, channels // 4, 2, 2, self.rows, self.cols)
        latents = latents.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels // 4, self.rows * 2, self.cols * 2)
        return self.vae.decode(latents, return_dict=False)[0].float()  # [B, 3, H, W]


def _is_plain_nearest_upsample(module: nn.Module) -> bool:
    """diffusers' Upsample2D as FLUX.2's VAE uses it: nearest x2, then a 3x3 conv, no norm."""
    from diffusers.models.upsampling import Upsample2D

    return (
        isinstance(module, Upsample2D)
        and module.interpolate
        and module.norm is None
        and not module.use_conv_transpose
        and module.name == "conv"
    )


def _float32_nearest_upsample(self, hidden_states, output_size=None, *args, **kwargs):
    """diffusers' `Upsample2D.forward` for that case, the interpolation done in float32."""
    dtype = hidden_states.dtype
    if output_size is None:
        hidden_states = F.interpolate(hidden_states.float(), scale_factor=2.0, mode="nearest")
    else:
        hidden_states = F.interpolate(hidden_states.float(), size=output_size, mode="nearest")
    hidden_states = hidden_states.to(dtype)
    return self.conv(hidden_states) if self.use_conv else hidden_states
