"""Realistic inputs for tracing and checking each graph, and the PyTorch modules that define them.

- text encoder: a real prompt through the checkpoint's own tokenizer and chat template;
- transformer: that prompt's fp32 PyTorch embeddings, seeded noise latents, a mid timestep, and
  FLUX.2 [dev]'s default guidance where the transformer embeds it ([klein]'s does not);
- VAE: seeded latents in the normalised space the sampler works in;
- VAE encoder (editing): smooth seeded images in [-1, 1], a photograph's statistics more than noise's;
  the transformer's reference tokens are seeded normal, the normalised latents' distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from common.specs import ComponentSpec, Geometry, Shapes
from common.tokenizer import PromptTokenizer
from export import checkpoint as ckpt
from export.components import COMPONENTS

CHECK_PROMPT = "A photograph of a red fox sitting in fresh snow at dawn, soft light, shallow depth of field."
# Rows of a batch get different prompts, so a graph that mixes rows fails the check. Row 1 is the
# empty prompt: a batch of 2 is the classifier-free guidance pair (prompt, negative prompt "").
CHECK_PROMPTS = (CHECK_PROMPT, "", "An astronaut riding a horse across a desert under a purple sky.")
CHECK_SEED = 0
CHECK_SIGMA = 0.5
CHECK_GUIDANCE = 4.0


def check_reference_images(shape: tuple[int, ...], seed: int = CHECK_SEED) -> np.ndarray:
    """Seeded smooth images [K, 3, H, W] in [-1, 1]: low-frequency colour fields plus a little grain."""
    rng = np.random.default_rng(seed + 1)
    k, channels, height, width = shape
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    images = np.empty(shape, np.float32)
    for index in range(k):
        for channel in range(channels):
            fy, fx, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
            images[index, channel] = 0.7 * np.sin(2 * np.pi * (fy * y + fx * x) + phase)
    images += 0.1 * rng.standard_normal(shape).astype(np.float32)
    return np.clip(images, -1, 1)


def check_reference_pil_images(shapes: Shapes) -> list:
    """The same images as PIL RGB at the reference size, for pipelines called with `image=`; [] when K = 0."""
    from PIL import Image

    if not shapes.reference_images:
        return []
    height, width = shapes.reference_size
    pixels = check_reference_images((shapes.reference_images, 3, height, width))
    as_uint8 = np.round((pixels.transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)
    return [Image.fromarray(image) for image in as_uint8]


def build_graph_module(component: str, checkpoint: ckpt.Checkpoint, geometry: Geometry, shapes: Shapes, precision):
    """The exportable module for `component` with weights in `precision`."""
    return COMPONENTS[component].graph_module(checkpoint, geometry, shapes, precision)


@dataclass
class ReferenceInputs:
    checkpoint: ckpt.Checkpoint
    geometry: Geometry
    shapes: Shapes
    _prompt_embeds: np.ndarray | None = field(default=None, repr=False)
    _streams: dict | None = field(default=None, repr=False)
    sigma: ClassVar[float] = CHECK_SIGMA
    guidance: ClassVar[float] = CHECK_GUIDANCE

    def tokenizer(self) -> PromptTokenizer:
        """The checkpoint's own tokenizer and chat template, read as the runtime reads the copy export makes."""
        return PromptTokenizer(
            self.checkpoint.root / "tokenizer",
            self.shapes.max_sequence_length,
            pipeline_class=self.geometry.pipeline_class,
        )

    def token_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        prompts = [CHECK_PROMPTS[row % len(CHECK_PROMPTS)] for row in range(self.shapes.batch_size)]
        ids, mask = self.tokenizer().encode(prompts)
        return ids, mask

    def prompt_embeds(self, text_encoder_fp32=None) -> np.ndarray:
        """The check prompts' embeddings by the fp32 PyTorch text encoder (computed once; from
        `text_encoder_fp32` when the caller holds that module already, so it is not loaded twice)."""
        import torch

        if self._prompt_embeds is None:
            module = text_encoder_fp32 or build_graph_module(
                "text_encoder", self.checkpoint, self.geometry, self.shapes, "fp32"
            )
            ids, mask = self.token_inputs()
            with torch.no_grad():
                self._prompt_embeds = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        return self._prompt_embeds

    def rng(self) -> np.random.Generator:
        """A fresh generator per graph: each graph's random inputs are the same whatever ran before."""
        return np.random.default_rng(CHECK_SEED)

    def reference_images(self, shape: tuple[int, ...]) -> np.ndarray:
        return check_reference_images(shape)

    def step_cache_streams(self) -> dict[str, np.ndarray]:
        """The transformer's check inputs plus what the fp32 PyTorch head and tail make of them (h1, txt1,
        temb, tail_residual), computed once: the step cache's tail and out graphs are checked on the model's
        own streams, as FP8's static activation scales were calibrated on those (on unit normal streams
        instead, the tiny default's FP8 tail missed PyTorch by rel L2 0.58)."""
        if self._streams is None:
            self._streams = _step_cache_streams(self)
        return self._streams

    def feeds(self, spec: ComponentSpec) -> dict[str, np.ndarray]:
        """The inputs `spec`'s graph is checked on (the component's own declaration makes them)."""
        return COMPONENTS[spec.name].feeds(self, spec)


def _step_cache_streams(inputs: ReferenceInputs) -> dict[str, np.ndarray]:
    import torch

    from common.specs import component_specs, step_cache_specs
    from export.graphs.step_cache import step_cache_graph

    geometry, shapes = inputs.geometry, inputs.shapes
    transformer = COMPONENTS["transformer"]
    streams = dict(transformer.feeds(inputs, component_specs(geometry, shapes)["transformer"]))
    config = inputs.checkpoint.configs["transformer"]
    specs = step_cache_specs(geometry, shapes, int(config["num_attention_heads"]) * int(config["attention_head_dim"]))
    model = transformer.load(inputs.checkpoint, geometry, torch.float32)
    for part in ("transformer_head", "transformer_tail"):
        module = step_cache_graph(part, model, geometry, shapes).eval()
        with torch.no_grad():
            outputs = module(*[torch.from_numpy(streams[t.name]) for t in specs[part].inputs])
        streams |= {t.name: value.numpy() for t, value in zip(specs[part].outputs, outputs) if t.name != "velocity"}
    return streams
