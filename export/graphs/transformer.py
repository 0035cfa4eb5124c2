"""The diffusion transformer as an exportable module: packed latents + prompt embeddings -> velocity.

Differs from `Flux2Transformer2DModel.forward` in one way only: the rotary position tables are
computed once, here, in float64 exactly as diffusers computes them, and stored as float32
buffers. Positions are fixed by the static shapes (text ids (0, 0, 0, l), image ids
(0, h, w, 0)), so the tables are constants; computing them in the graph would put float64
arithmetic into it, which TensorRT cannot run. The blocks, modulation and output layers are
diffusers' own modules, called with the same arguments as in diffusers' forward.
"""

from __future__ import annotations

import torch
from torch import nn

from common.specs import Geometry, Shapes
from export.graphs import fp16_linear


def position_ids(geometry: Geometry, shapes: Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids [L, 4] and image ids [H*W, 4] as diffusers' Flux2Pipeline builds them."""
    step = geometry.pixels_per_token
    rows, cols = shapes.height // step, shapes.width // step
    zero = torch.arange(1)
    text_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(shapes.max_sequence_length))
    image_ids = torch.cartesian_prod(zero, torch.arange(rows), torch.arange(cols), zero)
    return text_ids, image_ids


class TransformerGraph(nn.Module):
    def __init__(self, model: nn.Module, geometry: Geometry, shapes: Shapes):
        super().__init__()
        self.model = model
        self.guidance_embeds = geometry.guidance_embeds
        # fp16: weights and matrix multiplies in float16, everything between them in float32 (see
        # export/graphs/fp16_linear.py): FLUX-family residual streams and feed-forward activations pass 65504.
        self.fp32_stream = FP32_STREAM and model.x_embedder.weight.dtype == torch.float16
        # {initializer name of a weight: that of its row scales}: the streaming export fills them in.
        self.row_scaled: dict[str, str] = {}
        if self.fp32_stream:
            weights = model.x_embedder.weight
            if not weights.is_meta and fp16_linear.ROW_SCALE not in model.x_embedder._buffers:
                fp16_linear.prescale_loaded(model)  # a model loaded at float16 (export loads at float32 first)
            scaled = fp16_linear.use_fp16_linears(model)
            self.row_scaled = {f"model.{weight}": f"model.{scale}" for weight, scale in scaled.items()}
        text_ids, image_ids = position_ids(geometry, shapes)
        with torch.no_grad():
            text_cos, text_sin = model.pos_embed(text_ids)
            image_cos, image_sin = model.pos_embed(image_ids)
        # [L + N, head_dim] float32: diffusers computes in float64 and returns float32.
        self.register_buffer("rope_cos", torch.cat([text_cos, image_cos]).float(), persistent=False)
        self.register_buffer("rope_sin", torch.cat([text_sin, image_sin]).float(), persistent=False)

    def forward(self, hidden_states, encoder_hidden_states, timestep, guidance=None):
        if not self.fp32_stream:
            return self._forward(hidden_states, encoder_hidden_states, timestep, guidance)
        with fp16_linear.Float16Attention():  # the fp16 graph's attention: see export/graphs/fp16_linear.py
            return self._forward(hidden_states, encoder_hidden_states, timestep, guidance)

    def _forward(self, hidden_states, encoder_hidden_states, timestep, guidance=None):
        model = self.model
        dtype = model.x_embedder.weight.dtype
        stream = torch.float32 if self.fp32_stream else dtype
        hidden_states = hidden_states.to(dtype).to(stream)
        encoder_hidden_states = encoder_hidden_states.to(dtype).to(stream)
        num_txt_tokens = encoder_hidden_states.shape[1]
        temb = self.time_embedding(timestep, guidance)
        double_mod_img = model.double_stream_modulation_img(temb)
        double_mod_txt = model.double_stream_modulation_txt(temb)
        single_mod = model.single_stream_modulation(temb)

        hidden_states = model.x_embedder(hidden_states)
        encoder_hidden_states = model.context_embedder(encoder_hidden_states)
        rotary = (self.rope_cos, self.rope_sin)

        for block in model.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb_mod_img=double_mod_img,
                temb_mod_txt=double_mod_txt,
                image_rotary_emb=rotary,
                joint_attention_kwargs=None,
            )
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for block in model.single_transformer_blocks:
            hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=None,
                temb_mod=single_mod,
                image_rotary_emb=rotary,
                joint_attention_kwargs=None,
            )
        hidden_states = hidden_states[:, num_txt_tokens:, ...]
        hidden_states = model.norm_out(hidden_states, temb)
        return model.proj_out(hidden_states).float()  # velocity [B, N, out_channels]

    def time_embedding(self, timestep, guidance=None):
        """temb [B, D] in the stream's dtype from the graph's float32 timestep (and guidance)."""
        model = self.model
        dtype = model.x_embedder.weight.dtype
        stream = torch.float32 if self.fp32_stream else dtype
        # As Flux2Pipeline and the model together: the pipeline hands the model t / 1000 in the
        # latents' dtype (t = sigma * 1000, cast, then divided in that dtype) and the model scales
        # it back, `timestep.to(dtype) * 1000`. At bf16 this rounding order matters: rounding
        # sigma instead of t put the torch backend's images 5.6 dB further from fp32 than
        # diffusers' own bf16 pipeline (29.1 vs 34.7 dB, tiny default, 1024 x 1024, 4 steps).
        timestep = (((timestep * 1000).to(dtype) / 1000).to(dtype) * 1000).to(stream)
        if self.guidance_embeds:
            guidance = (guidance.to(dtype) * 1000).to(stream)
        return model.time_guidance_embed(timestep, guidance if self.guidance_embeds else None)


# False gives the plain float16 graph of before (every tensor float16), kept for the comparison in
# tests/test_fp16_overflow.py and docs/export.md.
FP32_STREAM = True


def reference_position_ids(geometry: Geometry, shapes: Shapes) -> torch.Tensor:
    """Ids [K*h*w, 4] of the reference tokens, as Flux2Pipeline._prepare_image_ids builds them: (10 + 10k, h, w, 0)."""
    step = geometry.pixels_per_token
    height, width = shapes.reference_size
    rows, cols = height // step, width // step
    return torch.cat(
        [
            torch.cartesian_prod(torch.tensor([10 + 10 * k]), torch.arange(rows), torch.arange(cols), torch.arange(1))
            for k in range(shapes.reference_images)
        ]
    )


class EditingTransformerGraph(TransformerGraph):
    """The transformer with K reference images (`Shapes.reference_images` > 0): one more input.

    `reference_latents` [B, K*M, C] is concatenated after the noisy latents, as Flux2Pipeline
    concatenates them every step, and the reference tokens' rotary tables (time coordinate
    10 + 10 x index) are fixed here with the others. Only the noisy latents' rows of the velocity
    are returned, as the pipeline keeps `noise_pred[:, :N]`. Text-to-image artifacts use
    `TransformerGraph` itself, so their graphs are unchanged by this class (nothing above it in
    this file changes for editing: the exporter records source lines in the graph's metadata).
    """

    def __init__(self, model: nn.Module, geometry: Geometry, shapes: Shapes):
        super().__init__(model, geometry, shapes)
        with torch.no_grad():
            reference_cos, reference_sin = model.pos_embed(reference_position_ids(geometry, shapes))
        # [L + N + K*M, head_dim]: text, noisy latents, references, the joint sequence's order.
        self.rope_cos = torch.cat([self.rope_cos, reference_cos.float()])
        self.rope_sin = torch.cat([self.rope_sin, reference_sin.float()])

    def forward(self, hidden_states, reference_latents, encoder_hidden_states, timestep, guidance=None):
        tokens = hidden_states.shape[1]
        joint = torch.cat([hidden_states, reference_latents], dim=1)
        return super().forward(joint, encoder_hidden_states, timestep, guidance)[:, :tokens]


def transformer_graph(model: nn.Module, geometry: Geometry, shapes: Shapes) -> TransformerGraph:
    """The exportable transformer for these shapes: with the reference input only when K > 0."""
    cls = EditingTransformerGraph if shapes.reference_images else TransformerGraph
    if shapes.lora_rank:
        from export.graphs.lora_slots import with_slots

        return with_slots(cls, model, geometry, shapes)
    return cls(model, geometry, shapes)
