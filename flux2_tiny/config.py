"""What a tiny checkpoint is: one frozen config, shared by the [dev] and [klein] writers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

# Bump when the generator changes what it writes for the same config.
GENERATOR_VERSION = 3  # 2: modulation and q/k-norm gains; 3: the published layout (tokenizer folder, keys, bf16)

# FLUX.2's text encoder reads hidden states at these indices of transformers' `hidden_states`
# tuple. The real [dev] checkpoint has no config field for it (diffusers passes (10, 20, 30) at
# call time), so a checkpoint that differs records its own in model_index.json under this
# private key, which diffusers ignores (keys starting with "_").
TEXT_LAYERS_KEY = "_flux2_trt_text_encoder_out_layers"


@dataclass(frozen=True)
class TinyConfig:
    family: ClassVar[str] = "dev"  # which writer builds it; a class constant, so not part of key()

    # text encoder (Mistral-style language model; a 1-layer vision tower that export never reads)
    text_hidden_size: int = 32
    text_intermediate_size: int = 64
    text_num_layers: int = 8
    text_num_heads: int = 4
    text_num_kv_heads: int = 2
    text_out_layers: tuple[int, ...] = (2, 4, 6)
    vocab_size: int = 512
    # transformer
    num_layers: int = 2
    num_single_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, ...] = (4, 4, 4, 4)
    timestep_guidance_channels: int = 32
    mlp_ratio: float = 3.0
    guidance_embeds: bool = True
    # VAE
    latent_channels: int = 8
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 8
    # At plain random init the prompt hardly reaches the image (two prompts' images were 78.6 dB
    # apart), so an end-to-end check could not see a wrong text path. Scaling the modulation and
    # q/k-norm weights after the seeded init fixes that (see write_image_models).
    modulation_gain: float = 10.0
    qk_norm_gain: float = 3.0
    seed: int = 0
    # "published": the layout of the black-forest-labs folders (flux2_tiny.published: processor-style
    # tokenizer folder with the real chat template, transformers-4 key names for [dev], bf16 text
    # encoder and transformer shards with an index, float32 VAE). "plain": the older layout this
    # generator wrote before (a plain fast tokenizer, one float32 file per component).
    layout: str = "published"
    # A Tekken vocabulary file (tekken.json, e.g. from mistral-common's wheel): [dev] then uses Mistral's
    # real 131k-token tokenizer instead of the small trained one. Empty: the small one.
    tekken_vocab: str = ""
    # Residual-stream outliers for the fp16 stress checkpoint (flux2_tiny.stress): 0 leaves the weights as drawn.
    outlier_scale: float = 0.0
    # Feed-forward weights past float16's range (flux2_tiny.stress): the largest |w| of two rows; 0: none.
    weight_outlier_peak: float = 0.0

    def key(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEFAULT = TinyConfig()

# Text the tiny byte-level BPE tokenizer is trained on: enough to give it real merges, so that
# prompts tokenise into several tokens per word as real ones do.
CORPUS = """
A photograph of a red fox sitting in fresh snow at dawn, soft light, shallow depth of field.
An astronaut riding a horse across a desert under a purple sky, cinematic, highly detailed.
A bowl of ramen with a soft boiled egg, steam rising, studio lighting, top-down view.
The old lighthouse stands on black rocks while waves crash around it during a storm.
Watercolor painting of a quiet canal city with boats, bridges and flowers on balconies.
A cat holding a sign that says hello world, photorealistic, 35mm film grain.
Product shot of a glass perfume bottle on wet stone, reflections, dark background.
Isometric illustration of a tiny island with a windmill, trees, and a wooden pier.
Portrait of an elderly fisherman with a weathered face, natural window light, black and white.
Une rue de Paris sous la pluie, reflets de néons, ambiance nocturne. 夜の東京の街並み、ネオンと雨。
"""
