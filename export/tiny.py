"""The embedded default: a tiny, randomly initialised FLUX.2 [dev] checkpoint in the diffusers layout.

It is written by the same libraries that write real checkpoints (diffusers and transformers
`save_pretrained`), so the loading code that reads it is the code that reads a real FLUX.2
folder. `diffusers.Flux2Pipeline.from_pretrained(path)` loads it and generates with it.

Deterministic: the same `TinyConfig` always gives the same bytes of weights, so the cache key
is the config itself. Built once into the cache folder (atomically) and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

# Bump when the generator changes what it writes for the same config.
GENERATOR_VERSION = 2  # 2: modulation and q/k-norm gains, so the prompt reaches the image

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

    def key(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


DEFAULT = TinyConfig()

# The names `python -m export --model` accepts for the embedded checkpoints.
TINY_MODELS = ("tiny", "tiny-klein", "tiny-klein-distilled")


def tiny_preset(name: str) -> TinyConfig:
    """The config of one of TINY_MODELS (klein's lives in export.tiny_klein)."""
    if name == "tiny":
        return DEFAULT
    from export.tiny_klein import KLEIN_BASE, KLEIN_DISTILLED

    return {"tiny-klein": KLEIN_BASE, "tiny-klein-distilled": KLEIN_DISTILLED}[name]


# Text the tiny byte-level BPE tokenizer is trained on: enough to give it real merges, so that
# prompts tokenise into several tokens per word as real ones do.
_CORPUS = """
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

_SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "<pad>",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]

# A Mistral-Small-3.1-style chat template: system prompt block, then [INST] user text [/INST].
# Accepts both string contents and FLUX.2's list-of-parts contents ({"type": "text", ...}).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = namespace(v='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{%- set text.v = text.v + part['text'] %}"
    "{%- elif part['type'] in ['image', 'image_url'] %}{%- set text.v = text.v + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- set text = text.v %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- text + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def default_cache_dir() -> Path:
    root = os.environ.get("FLUX2_TRT_CACHE") or os.path.join(Path.home(), ".cache", "flux2-trt")
    return Path(root)


def ensure_tiny_checkpoint(config: TinyConfig = DEFAULT, cache_dir: Path | None = None) -> Path:
    """Return the folder of the tiny checkpoint for `config`, generating it on first use."""
    prefix = "tiny" if config.family == "dev" else f"tiny-{config.family}"
    target = (cache_dir or default_cache_dir()) / f"{prefix}-{config.key()}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _writer(config)(staging, config)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not a concurrent writer's result
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _writer(config: TinyConfig):
    if config.family == "klein":
        from export.tiny_klein import write_tiny_klein_checkpoint  # imports this module: no top-level cycle

        return write_tiny_klein_checkpoint
    return write_tiny_checkpoint


def _build_tokenizer(config: TinyConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=131072,
    )


def write_tiny_checkpoint(out: Path, config: TinyConfig = DEFAULT) -> None:
    """Write a FLUX.2 [dev]-layout checkpoint with random weights into `out` (must exist)."""
    import torch
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    if max(config.text_out_layers) > config.text_num_layers:
        raise ValueError(f"text_out_layers {config.text_out_layers} exceed text_num_layers {config.text_num_layers}")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    out = Path(out)
    tokenizer = _build_tokenizer(config)
    vocab_size = len(tokenizer)

    torch.manual_seed(config.seed)
    text_config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_num_layers,
        num_attention_heads=config.text_num_heads,
        num_key_value_heads=config.text_num_kv_heads,
        head_dim=config.text_hidden_size // config.text_num_heads,
        max_position_embeddings=4096,
        sliding_window=None,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=64,
        patch_size=16,
    )
    te_config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    text_encoder = Mistral3ForConditionalGeneration(te_config).eval()
    # Random init gives near-zero embeddings; widen them so hidden states carry signal.
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)

    # The real [dev] folder holds a PixtralProcessor, whose constructor needs torchvision (not
    # installable beside the CPU torch used here). Its text side is this same fast tokenizer plus
    # a chat template, which is all that FLUX.2 uses; diffusers calls `apply_chat_template` on
    # either with identical arguments.
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out / "tokenizer")

    write_image_models(
        out,
        config,
        joint_attention_dim=3 * config.text_hidden_size,
        modulation_gain=config.modulation_gain,
        qk_norm_gain=config.qk_norm_gain,
    )

    model_index = {
        "_class_name": "Flux2Pipeline",
        "_diffusers_version": _version("diffusers"),
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
        TEXT_LAYERS_KEY: list(config.text_out_layers),
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def write_image_models(
    out: Path, config: TinyConfig, joint_attention_dim: int, modulation_gain: float = 1.0, qk_norm_gain: float = 1.0
) -> None:
    """The transformer, VAE and scheduler, which every FLUX.2 family shares (seeds from `config.seed`).

    At random initialisation the modulation gates are ~0.05 and attention is nearly uniform
    (q/k are RMS-normalised), so the prompt barely moves the image. Gains above 1 scale the
    modulation weights and the q/k norm weights after the seeded init, which makes prompt and
    guidance visible in the output (see export.tiny_klein).
    """
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(config.seed + 1)
    inner = config.num_attention_heads * config.attention_head_dim
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * config.latent_channels,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=config.timestep_guidance_channels,
        mlp_ratio=config.mlp_ratio,
        axes_dims_rope=config.axes_dims_rope,
        guidance_embeds=config.guidance_embeds,
    )
    assert inner == transformer.inner_dim
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            owner = name.rsplit(".", 2)[-2]
            if modulation_gain != 1.0 and "modulation" in name and name.endswith(".weight"):
                param.mul_(modulation_gain)
            if qk_norm_gain != 1.0 and owner in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                param.mul_(qk_norm_gain)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)

    torch.manual_seed(config.seed + 2)
    n_blocks = len(config.vae_block_out_channels)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=config.vae_block_out_channels,
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_num_groups,
        sample_size=256,
    )
    # Non-trivial BatchNorm statistics, so de-normalisation is actually exercised.
    generator = torch.Generator().manual_seed(config.seed + 3)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features, generator=generator))
        vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(vae.bn.num_features, generator=generator))
    vae.save_pretrained(out / "vae", safe_serialization=True)

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    scheduler.save_pretrained(out / "scheduler")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _parse_overrides(pairs: list[str], base: TinyConfig = DEFAULT) -> TinyConfig:
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"error: --set {pair!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        default = getattr(base, name)
        if isinstance(default, tuple):
            changes[name] = tuple(int(v) for v in raw.split(","))
        elif isinstance(default, bool):
            changes[name] = raw.lower() in ("1", "true", "yes")
        else:
            changes[name] = type(default)(raw)
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m export.tiny",
        description="Write a tiny random FLUX.2 checkpoint (diffusers layout) for tests and demos.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to create (must not exist)")
    parser.add_argument(
        "--model", default="tiny", choices=TINY_MODELS, help="which family: [dev] (tiny) or [klein] (default tiny)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a config field")
    args = parser.parse_args(argv)
    config = _parse_overrides(args.set, tiny_preset(args.model))
    if args.out.exists():
        raise SystemExit(f"error: --out {args.out} already exists; choose a new folder")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    try:
        _writer(config)(staging, config)
        staging.rename(args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote tiny FLUX.2 checkpoint {args.out} ({config.key()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
