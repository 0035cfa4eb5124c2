"""The VAE decoder as an exportable module: the sampler's packed latents -> image in [-1, 1].

Unpacking, BatchNorm de-normalisation and unpatchify live in this graph rather than in the
runtime: the BatchNorm statistics are VAE weights and travel with them, and TensorRT fuses the
reshapes into the first convolution's input. The steps are diffusers' Flux2Pipeline's, in its
order: unpack tokens to [B, C*4, h, w] (row-major, as `_unpack_latents_with_ids` does for the
standard position ids), `x * sqrt(var + eps) + mean`, unpatchify to [B, C, 2h, 2w], decode.
"""

from __future__ import annotations

import torch
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

    def forward(self, packed_latents):
        dtype = self.bn_mean.dtype
        batch, _, channels = packed_latents.shape
        latents = packed_latents.to(dtype).permute(0, 2, 1).reshape(batch, channels, self.rows, self.cols)
        latents = latents * self.bn_std + self.bn_mean
        latents = latents.reshape(batch, channels // 4, 2, 2, self.rows, self.cols)
        latents = latents.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels // 4, self.rows * 2, self.cols * 2)
        return self.vae.decode(latents, return_dict=False)[0].float()  # [B, 3, H, W]
