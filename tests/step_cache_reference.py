"""The first-block cache rule applied to diffusers' own `Flux2Transformer2DModel`: the step cache's test reference.

diffusers 0.42.1's `apply_first_block_cache` does not run on FLUX.2 (its tail residual subtracts a
list: the single blocks work on the joint text + image stream), so the rule is written here against
the model's real forward (`Flux2Transformer2DModel.forward`, text-to-image path, no KV cache), calling
its own modules: after the first double block, r = h1 - h0; with no r_prev, or
mean|r - r_prev| / mean|r_prev| > threshold, the other blocks run and (r, tail residual) are kept;
otherwise norm_out(h1 + kept tail residual). One state per `cache_context` name (Flux2KleinPipeline's
"cond" / "uncond" passes), as diffusers' cache contexts keep them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _State:
    def __init__(self):
        self.first_residual = None
        self.tail_residual = None
        self.ran_tail: list[bool] = []
        self.changes: list[float] = []


class FirstBlockCacheTransformer(nn.Module):
    """Stands in for the pipeline's transformer (as export/fp8/twin.py's TwinTransformer does)."""

    def __init__(self, original: nn.Module, threshold: float):
        super().__init__()
        self.model = original
        self.config = original.config
        self.threshold = threshold
        self.states: dict[str, _State] = {}
        self._context = "default"

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def device(self):
        return self.model.device

    @contextlib.contextmanager
    def cache_context(self, name):
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None, **_):
        model = self.model
        state = self.states.setdefault(self._context, _State())
        num_txt_tokens = encoder_hidden_states.shape[1]
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = model.time_guidance_embed(timestep, guidance)
        mod_img, mod_txt = model.double_stream_modulation_img(temb), model.double_stream_modulation_txt(temb)
        h0 = model.x_embedder(hidden_states)
        txt = model.context_embedder(encoder_hidden_states)
        img_ids, txt_ids = (ids[0] if ids.ndim == 3 else ids for ids in (img_ids, txt_ids))
        image_rotary, text_rotary = model.pos_embed(img_ids), model.pos_embed(txt_ids)
        rotary = tuple(torch.cat([text_rotary[i], image_rotary[i]], dim=0) for i in range(2))

        def double(block, hidden, text):
            return block(
                hidden_states=hidden,
                encoder_hidden_states=text,
                temb_mod_img=mod_img,
                temb_mod_txt=mod_txt,
                image_rotary_emb=rotary,
                joint_attention_kwargs=None,
            )

        txt, h1 = double(model.transformer_blocks[0], h0, txt)
        residual = (h1 - h0).float()
        change = float("inf")
        if state.first_residual is not None:
            previous = state.first_residual
            change = float((residual - previous).abs().mean() / previous.abs().mean())
        state.changes.append(change)
        if change > self.threshold:
            hidden = h1
            for block in model.transformer_blocks[1:]:
                txt, hidden = double(block, hidden, txt)
            joint = torch.cat([txt, hidden], dim=1)
            single_mod = model.single_stream_modulation(temb)
            for block in model.single_transformer_blocks:
                joint = block(
                    hidden_states=joint,
                    encoder_hidden_states=None,
                    temb_mod=single_mod,
                    image_rotary_emb=rotary,
                    joint_attention_kwargs=None,
                )
            hidden = joint[:, num_txt_tokens:, ...]
            state.first_residual, state.tail_residual = residual, hidden - h1
            state.ran_tail.append(True)
        else:
            hidden = h1 + state.tail_residual
            state.ran_tail.append(False)
        return (model.proj_out(model.norm_out(hidden, temb)),)
