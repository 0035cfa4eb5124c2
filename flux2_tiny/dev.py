"""The embedded default: a tiny, randomly initialised FLUX.2 [dev] checkpoint in the diffusers layout.

It is written by the same libraries that write real checkpoints (diffusers and transformers
`save_pretrained`), so the loading code that reads it is the code that reads a real FLUX.2
folder. `diffusers.Flux2Pipeline.from_pretrained(path)` loads it and generates with it.

Deterministic: the same `TinyConfig` always gives the same bytes of weights, so the cache key
is the config itself. Built once into the cache folder (atomically) and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from flux2_tiny.config import CORPUS, DEFAULT, TEXT_LAYERS_KEY, TinyConfig
from flux2_tiny.image_models import library_version, write_image_models
from flux2_tiny.published import MISTRAL_TEMPLATE, save_text_encoder, write_pixtral_tokenizer

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
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
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
    from common.hf_quiet import quiet_hf_libraries

    quiet_hf_libraries()
    out = Path(out)
    tokenizer = _tekken_tokenizer(config.tekken_vocab) if config.tekken_vocab else _build_tokenizer(config)
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
        tie_word_embeddings=False,  # as published: language_model.lm_head.weight is its own tensor
    )
    text_encoder = Mistral3ForConditionalGeneration(te_config).eval()
    # Random init gives near-zero embeddings; widen them so hidden states carry signal.
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    published = config.layout == "published"
    if published:
        save_text_encoder(text_encoder, out / "text_encoder", mistral3_keys=True)
        write_pixtral_tokenizer(tokenizer, out / "tokenizer", MISTRAL_TEMPLATE.read_text(encoding="utf-8"))
    else:
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        # The older layout: a plain fast tokenizer with a Mistral-shaped template of our own.
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
        "_diffusers_version": library_version("diffusers"),
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
        "tokenizer": ["transformers", "PixtralProcessor" if published else "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
        TEXT_LAYERS_KEY: list(config.text_out_layers),
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n", encoding="utf-8")


# Mistral's Tekken tokenizer files written before `special_tokens` was stored in them (as the one in
# mistral-common's wheel) take these, in rank order; the remaining of the first 1000 ids are fillers.
TEKKEN_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip


def _tekken_tokenizer(path: str):
    """Mistral's real Tekken vocabulary (a tekken.json), converted as transformers converts it."""
    import tempfile

    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    raw.setdefault(
        "special_tokens", [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(TEKKEN_SPECIAL_TOKENS)]
    )
    with tempfile.TemporaryDirectory() as scratch:
        vocab = Path(scratch) / "tekken.json"
        vocab.write_text(json.dumps(raw), encoding="utf-8")
        backend = MistralConverter(str(vocab)).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=131072,
    )  # fmt: skip
