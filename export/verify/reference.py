"""Realistic inputs for tracing and checking each graph, and the PyTorch modules that define them.

- text encoder: a real prompt through the checkpoint's own tokenizer and chat template;
- transformer: that prompt's fp32 PyTorch embeddings, seeded noise latents, a mid timestep, and
  FLUX.2 [dev]'s default guidance where the transformer embeds it ([klein]'s does not);
- VAE: seeded latents in the normalised space the sampler works in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.dtypes import torch_dtype
from common.specs import ComponentSpec, Geometry, Shapes
from common.tokenizer import PromptTokenizer
from export import checkpoint as ckpt
from export.graphs.text_encoder import TextEncoderGraph
from export.graphs.transformer import TransformerGraph
from export.graphs.vae import VaeDecoderGraph

CHECK_PROMPT = "A photograph of a red fox sitting in fresh snow at dawn, soft light, shallow depth of field."
# Rows of a batch get different prompts, so a graph that mixes rows fails the check. Row 1 is the
# empty prompt: a batch of 2 is the classifier-free guidance pair (prompt, negative prompt "").
CHECK_PROMPTS = (CHECK_PROMPT, "", "An astronaut riding a horse across a desert under a purple sky.")
CHECK_SEED = 0
CHECK_SIGMA = 0.5
CHECK_GUIDANCE = 4.0


def build_graph_module(component: str, checkpoint: ckpt.Checkpoint, geometry: Geometry, shapes: Shapes, precision: str):
    """The exportable module for `component` with weights in `precision`."""
    dtype = torch_dtype(precision)
    if component == "text_encoder":
        return TextEncoderGraph(ckpt.load_language_model(checkpoint, geometry, dtype), geometry.text_out_layers).eval()
    if component == "transformer":
        return TransformerGraph(ckpt.load_transformer(checkpoint, dtype), geometry, shapes).eval()
    if component == "vae":
        return VaeDecoderGraph(ckpt.load_vae(checkpoint, dtype), geometry, shapes).eval()
    raise ValueError(component)


@dataclass
class ReferenceInputs:
    checkpoint: ckpt.Checkpoint
    geometry: Geometry
    shapes: Shapes
    _prompt_embeds: np.ndarray | None = field(default=None, repr=False)

    def token_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        tokenizer = PromptTokenizer(
            self.checkpoint.root / "tokenizer",
            self.shapes.max_sequence_length,
            pipeline_class=self.geometry.pipeline_class,
        )
        prompts = [CHECK_PROMPTS[row % len(CHECK_PROMPTS)] for row in range(self.shapes.batch_size)]
        ids, mask = tokenizer.encode(prompts)
        return ids, mask

    def prompt_embeds(self, text_encoder_fp32=None) -> np.ndarray:
        import torch

        if self._prompt_embeds is None:
            module = text_encoder_fp32 or build_graph_module(
                "text_encoder", self.checkpoint, self.geometry, self.shapes, "fp32"
            )
            ids, mask = self.token_inputs()
            with torch.no_grad():
                self._prompt_embeds = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        return self._prompt_embeds

    def feeds(self, spec: ComponentSpec, text_encoder_fp32=None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(CHECK_SEED)
        b = self.shapes.batch_size
        if spec.name == "text_encoder":
            ids, mask = self.token_inputs()
            return {"input_ids": ids, "attention_mask": mask}
        if spec.name == "transformer":
            feeds = {
                "hidden_states": rng.standard_normal(spec.inputs[0].shape).astype(np.float32),
                "encoder_hidden_states": self.prompt_embeds(text_encoder_fp32),
                "timestep": np.full((b,), CHECK_SIGMA, np.float32),
            }
            if self.geometry.guidance_embeds:
                feeds["guidance"] = np.full((b,), CHECK_GUIDANCE, np.float32)
            return feeds
        if spec.name == "vae":
            return {"packed_latents": rng.standard_normal(spec.inputs[0].shape).astype(np.float32)}
        raise ValueError(spec.name)
