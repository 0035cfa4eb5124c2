"""A tiny, randomly initialised FLUX.2 [klein] checkpoint in the diffusers layout (base and distilled).

What makes it klein rather than [dev], as in the published klein folders: a `Qwen3ForCausalLM`
text encoder read at hidden-state indices (9, 18, 27), a Qwen2 byte-level BPE tokenizer with a
Qwen3-style chat template (user turn, generation prompt, `enable_thinking`), a transformer
without a guidance embedding, `_class_name: Flux2KleinPipeline` and the pipeline's
`is_distilled` flag in model_index.json. The transformer, VAE and scheduler come from the same
writer as [dev] (`flux2_tiny.dev.write_image_models`).

`diffusers.Flux2KleinPipeline.from_pretrained(path)` loads it and generates with it, and reads
`is_distilled` from model_index.json (the pipeline registers it as its own config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from flux2_tiny.config import CORPUS, TEXT_LAYERS_KEY, TinyConfig
from flux2_tiny.image_models import library_version, write_image_models
from flux2_tiny.published import QWEN3_TEMPLATE, save_text_encoder

# diffusers' Flux2KleinPipeline default `text_encoder_out_layers`; a checkpoint that reads other
# layers records them under TEXT_LAYERS_KEY.
KLEIN_TEXT_LAYERS = (9, 18, 27)


@dataclass(frozen=True)
class TinyKleinConfig(TinyConfig):
    family: ClassVar[str] = "klein"

    # Qwen3 sets head_dim on its own: heads x head_dim need not be the width (32 x 128 vs 2560 in
    # Qwen3-4B), so the tiny one differs too (4 x 16 vs 48).
    text_hidden_size: int = 48
    text_intermediate_size: int = 96
    text_head_dim: int = 16
    # Fewer layers than (9, 18, 27) needs, to keep tests fast: the layers read are recorded in
    # model_index.json. More layers than the deepest one read, so export's cut is exercised.
    text_num_layers: int = 9
    text_out_layers: tuple[int, ...] = (3, 5, 7)
    guidance_embeds: bool = False  # klein has no guidance embedding; the base model uses true CFG
    tie_word_embeddings: bool = True  # as Qwen3-4B (klein 4B); Qwen3-8B (klein 9B) unties them
    is_distilled: bool = False  # the step-distilled model: no CFG, about four steps
    # modulation_gain / qk_norm_gain: inherited; with plain random init a CFG-on and a CFG-off image
    # were 67 dB apart, so a check at 40 dB could not have told them apart.


KLEIN_BASE = TinyKleinConfig()
KLEIN_DISTILLED = replace(KLEIN_BASE, is_distilled=True)

# Qwen2/Qwen3's special tokens: <|endoftext|> pads, <|im_end|> ends a turn; there is no BOS.
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added tokens that are not special (as in Qwen3's tokenizer): the thinking block markers.
_THINK_TOKENS = ["<think>", "</think>"]

# A Qwen3-shaped chat template for what FLUX.2 [klein] sends: ChatML turns, then for the
# generation prompt the assistant header and, when `enable_thinking` is false, an empty
# thinking block. For one user message, add_generation_prompt=True, enable_thinking=False it
# renders "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
# which is what Qwen3's own template renders for the same call.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = namespace(v='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{%- set content.v = content.v + part['text'] %}{%- endif %}"
    "{%- endfor %}{%- set content = content.v %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _build_tokenizer(config: TinyKleinConfig):
    """A byte-level BPE with Qwen2's exact normaliser and pre-tokeniser.

    transformers 5 rebuilds a `Qwen2Tokenizer`'s pipeline from its class (NFC, Qwen's split
    regex, byte-level) and takes only the vocabulary and merges from tokenizer.json, so the tiny
    tokenizer is trained with that same pipeline: the saved tokenizer.json and the tokenizer
    transformers loads from it then tokenise identically, as they do for the real Qwen3 files.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer_tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.add_tokens([AddedToken("<|im_start|>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in _THINK_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_tiny_klein_checkpoint(out: Path, config: TinyKleinConfig = KLEIN_BASE) -> None:
    """Write a FLUX.2 [klein]-layout checkpoint with random weights into `out` (must exist)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from common.hf_quiet import quiet_hf_libraries

    if max(config.text_out_layers) > config.text_num_layers:
        raise ValueError(f"text_out_layers {config.text_out_layers} exceed text_num_layers {config.text_num_layers}")
    quiet_hf_libraries()
    out = Path(out)
    tokenizer = _build_tokenizer(config)

    torch.manual_seed(config.seed)
    text_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_num_layers,
        num_attention_heads=config.text_num_heads,
        num_key_value_heads=config.text_num_kv_heads,
        head_dim=config.text_head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},  # Qwen3's
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = Qwen3ForCausalLM(text_config).eval()
    # Random init gives near-zero embeddings; widen them so hidden states carry signal.
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    if config.layout == "published":
        save_text_encoder(text_encoder, out / "text_encoder", mistral3_keys=False)
        tokenizer.chat_template = QWEN3_TEMPLATE.read_text(encoding="utf-8")
    else:
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")

    write_image_models(
        out,
        config,
        joint_attention_dim=len(config.text_out_layers) * config.text_hidden_size,
        modulation_gain=config.modulation_gain,
        qk_norm_gain=config.qk_norm_gain,
    )

    model_index = {
        "_class_name": "Flux2KleinPipeline",
        "_diffusers_version": library_version("diffusers"),
        "is_distilled": config.is_distilled,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    if tuple(config.text_out_layers) != KLEIN_TEXT_LAYERS:
        model_index[TEXT_LAYERS_KEY] = list(config.text_out_layers)
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n", encoding="utf-8")
