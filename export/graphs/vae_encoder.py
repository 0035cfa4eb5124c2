"""The VAE encoder as an exportable module: reference images in [-1, 1] -> normalised packed reference tokens.

What Flux2Pipeline does to each reference image once, before the denoising loop
(`_encode_vae_image`, then `_pack_latents` in `prepare_image_latents`), in its order: encode, take
the latent distribution's mode (`sample_mode="argmax"`: the mean, the first half of the encoder's
moments; nothing is sampled, so the graph is deterministic), patchify 2x2 to [B, 4C, h, w],
normalise with the BatchNorm statistics `(x - mean) / sqrt(var + eps)`, pack to [B, h*w, 4C].

All K references go through in one call (batch K): the encoder treats rows independently, as
diffusers' one-at-a-time loop does. Concatenating the rows into the transformer's
[1, K*h*w, 4C] is a reshape, left to the runtime so the graph's output keeps one row per image.
"""

from __future__ import annotations

import torch
from torch import nn

from common.specs import Geometry, Shapes


class VaeEncoderGraph(nn.Module):
    def __init__(self, vae: nn.Module, geometry: Geometry, shapes: Shapes):
        super().__init__()
        self.vae = vae
        dtype = vae.quant_conv.weight.dtype if vae.quant_conv is not None else torch.float32
        mean = vae.bn.running_mean.detach().float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.detach().float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        # As the decoder graph: computed in float32, cast once to the encoder's dtype as diffusers
        # casts the statistics to the latents' dtype.
        self.register_buffer("bn_mean", mean.to(dtype), persistent=False)
        self.register_buffer("bn_std", std.to(dtype), persistent=False)

    def forward(self, reference_images):
        dtype = self.bn_mean.dtype
        moments = self.vae._encode(reference_images.to(dtype))  # [B, 2C, h2, w2]: mean and log-variance
        latents = moments[:, : moments.shape[1] // 2]  # the distribution's mode
        batch, channels, height, width = latents.shape
        latents = latents.reshape(batch, channels, height // 2, 2, width // 2, 2)
        latents = latents.permute(0, 1, 3, 5, 2, 4).reshape(batch, channels * 4, height // 2, width // 2)
        latents = (latents - self.bn_mean) / self.bn_std
        packed = latents.reshape(batch, channels * 4, (height // 2) * (width // 2)).permute(0, 2, 1)
        return packed.float()  # [B, h*w, 4C]
