"""The transformer in three graphs for the first-block step cache (`--step-cache`, docs/cache.md).

`transformer_head` runs what every step needs: the embedders, the time embedding and the first
double block; it returns that block's image stream h1, its text stream, the block's image residual
h1 - h0 (what the cache compares between steps) and temb. `transformer_tail` runs the remaining
double and single blocks and the output layers from there and also returns the tail residual (the
image tokens entering `norm_out`, minus h1). `transformer_out` runs only `norm_out` and `proj_out`
on h1 + a kept tail residual: a step the cache skips.

Each is `TransformerGraph` cut where the cache cuts it: the same diffusers modules, called with the
same arguments, the same RoPE tables (float64, as diffusers, stored as float32), the same dtype
handling and fp16 stream. Tensors crossing between the graphs are float32 at the boundary (the
project's I/O rule); they are cast back into the stream's dtype without rounding (a bf16 stream's
values are bf16 already; the fp16 graph's stream is float32).
"""

from __future__ import annotations

import torch
from torch import nn

from common.specs import Geometry, Shapes, image_tokens, in_first_block
from export.graphs import fp16_linear
from export.graphs.transformer import EditingTransformerGraph, TransformerGraph


class _StepCacheGraph(TransformerGraph):
    def __init__(self, model: nn.Module, geometry: Geometry, shapes: Shapes):
        super().__init__(model, geometry, shapes)
        self.noisy_tokens = image_tokens(geometry, shapes)  # the velocity's rows
        self.references = bool(shapes.reference_images)

    def forward(self, *inputs):
        if not self.fp32_stream:
            return self._part(*inputs)
        with fp16_linear.Float16Attention():  # as TransformerGraph.forward
            return self._part(*inputs)

    def _stream(self, value):
        """A float32 boundary tensor that was the stream's own back in the stream's dtype (no rounding)."""
        dtype = self.model.x_embedder.weight.dtype
        return value.to(torch.float32 if self.fp32_stream else dtype)

    def _velocity(self, hidden_states, temb):
        model = self.model
        velocity = model.proj_out(model.norm_out(hidden_states, temb)).float()
        return velocity[:, : self.noisy_tokens]  # [B, N, out_channels]: the noisy latents' rows

    def _double(self, block, hidden_states, encoder_hidden_states, temb):
        model = self.model
        return block(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb_mod_img=model.double_stream_modulation_img(temb),
            temb_mod_txt=model.double_stream_modulation_txt(temb),
            image_rotary_emb=(self.rope_cos, self.rope_sin),
            joint_attention_kwargs=None,
        )


class TransformerHead(_StepCacheGraph):
    """The graph's inputs as the full transformer's -> h1, txt1, first_residual, temb."""

    def _part(self, hidden_states, *rest):
        if self.references:  # [noisy, references], as EditingTransformerGraph joins them
            reference_latents, *rest = rest
            hidden_states = torch.cat([hidden_states, reference_latents], dim=1)
        encoder_hidden_states, timestep, *guidance = rest
        model = self.model
        dtype = model.x_embedder.weight.dtype
        stream = torch.float32 if self.fp32_stream else dtype
        temb = self.time_embedding(timestep, guidance[0] if guidance else None)
        h0 = model.x_embedder(hidden_states.to(dtype).to(stream))
        txt0 = model.context_embedder(encoder_hidden_states.to(dtype).to(stream))
        txt1, h1 = self._double(model.transformer_blocks[0], h0, txt0, temb)
        return h1.float(), txt1.float(), (h1 - h0).float(), temb.float()


class TransformerTail(_StepCacheGraph):
    """h1, txt1, temb -> velocity, tail_residual (the image tokens entering norm_out, minus h1)."""

    def _part(self, h1, txt1, temb):
        model = self.model
        h1, encoder_hidden_states, temb = self._stream(h1), self._stream(txt1), self._stream(temb)
        hidden_states = h1
        for block in model.transformer_blocks[1:]:
            encoder_hidden_states, hidden_states = self._double(block, hidden_states, encoder_hidden_states, temb)
        num_txt_tokens = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        single_mod = model.single_stream_modulation(temb)
        for block in model.single_transformer_blocks:
            hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=None,
                temb_mod=single_mod,
                image_rotary_emb=(self.rope_cos, self.rope_sin),
                joint_attention_kwargs=None,
            )
        hidden_states = hidden_states[:, num_txt_tokens:, ...]
        return self._velocity(hidden_states, temb), (hidden_states - h1).float()


class TransformerOut(_StepCacheGraph):
    """h1, tail_residual, temb -> velocity: a skipped step's output layers."""

    def _part(self, h1, tail_residual, temb):
        return self._velocity(self._stream(h1) + self._stream(tail_residual), self._stream(temb))


PARTS = {"transformer_head": TransformerHead, "transformer_tail": TransformerTail, "transformer_out": TransformerOut}
# The LoRA slots each part takes (common.specs.step_cache_specs lists the same).
SLOTS = {
    "transformer_head": in_first_block,
    "transformer_tail": lambda module: not in_first_block(module),
    "transformer_out": lambda module: False,
}


def step_cache_graph(part: str, model: nn.Module, geometry: Geometry, shapes: Shapes) -> nn.Module:
    """The exportable `part` (a `common.specs.STEP_CACHE_COMPONENTS` name) for these shapes."""
    base = EditingTransformerGraph if shapes.reference_images else TransformerGraph
    cls = type(f"{PARTS[part].__name__}{'Editing' if shapes.reference_images else ''}", (PARTS[part], base), {})
    targets = tuple(target for target in shapes.lora_targets if SLOTS[part](target[0]))
    if targets:
        from export.graphs.lora_slots import with_slots

        return with_slots(cls, model, geometry, shapes, targets)
    return cls(model, geometry, shapes)
