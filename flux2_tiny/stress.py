"""The fp16 overflow stress variant: a tiny transformer whose activations leave float16's range (65504).

Trained large transformers carry a few "massive activation" channels in their residual stream and
feed-forward intermediates far above the rest (FLUX-family models past float16's range: a public
report has fp16 FLUX.2 [dev] engines drawing flat images). Random tiny weights never get there, so
this injects the same pattern after the seeded init, deterministically:

- residual stream: two channels of the image and text embedders scaled so those channels start
  around `scale` (a few times over 65504 at their peaks) and stay there through the blocks;
- feed-forward: in the first double block's image feed-forward, a few intermediate channels of the
  linear (non-gated) half scaled to `scale`, with the matching columns of `linear_out` scaled down by
  the same factor, so the intermediate overflows float16 while the block's output stays moderate, as
  a trained network's outlier features do.

`inject_weight_outliers` (`weight_outlier_peak`) puts weights themselves past float16's range: two
rows of the same feed-forward's linear half scaled so that their largest |w| is the peak (3e5 in
the tests), so their intermediate channels become massive too, as trained networks' outlier weights
feed massive activations. Stored in bf16, these rows are inf once cast to float16 unless each row
is scaled first (export.graphs.fp16_linear).
"""

from __future__ import annotations

OUTLIER_CHANNELS = (0, 5)  # residual-stream channels carrying the outliers
FF_OUTLIER_CHANNELS = (1, 3)  # intermediate channels (of the linear half) of the first double block's FF


def inject_outliers(transformer, scale: float) -> None:
    import torch

    with torch.no_grad():
        for embedder in (transformer.x_embedder, transformer.context_embedder):
            for channel in OUTLIER_CHANNELS:
                row = embedder.weight[channel]
                # Inputs are about unit variance: the channel's output then has standard deviation `scale`.
                row.mul_(scale / row.norm())
                if embedder.bias is not None:
                    embedder.bias[channel] = 0.0
        ff = transformer.transformer_blocks[0].ff
        half = ff.linear_in.weight.shape[0] // 2
        for channel in FF_OUTLIER_CHANNELS:
            row = ff.linear_in.weight[half + channel]
            factor = 2 * scale / row.norm()  # twice the residual outliers: past 65504 at scale 3e4
            row.mul_(factor)


def inject_weight_outliers(transformer, peak: float) -> None:
    import torch

    with torch.no_grad():
        ff = transformer.transformer_blocks[0].ff
        half = ff.linear_in.weight.shape[0] // 2
        for channel in FF_OUTLIER_CHANNELS:
            row = ff.linear_in.weight[half + channel]
            factor = peak / float(row.abs().max())
            row.mul_(factor)
