"""FLUX.2 prompt tokenisation without transformers: `tokenizers` plus the folder's jinja chat template.

Reproduces what diffusers does, per pipeline class (the manifest's `geometry.pipeline_class`):

- `Flux2Pipeline` ([dev]): `tokenizer.apply_chat_template(messages, tokenize=True,
  add_generation_prompt=False, padding="max_length", truncation=True, max_length=N)` on a system
  message + user message: render, encode without special tokens (the template writes BOS itself).
- `Flux2KleinPipeline` ([klein]): `text = tokenizer.apply_chat_template([user message],
  tokenize=False, add_generation_prompt=True, enable_thinking=False)`, then `tokenizer(text,
  padding="max_length", truncation=True, max_length=N)`, which adds the tokenizer's special
  tokens (none for Qwen's) after truncating to leave room for them.

Then truncate, pad, mask. The runtime uses this so inference nodes need neither transformers
nor a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import ArtifactsError
from common.family import Family

# The FLUX.2 [dev] system message (diffusers `pipelines/flux2/system_messages.py`).
# The line break after "object" is in the original and changes the tokens: keep it.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships, object\n"
    "attribution and actions without speculation."
)

# Files that make a tokenizer folder; copied verbatim into every artifacts folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
)


def flux2_messages(prompt: str, system_message: str = SYSTEM_MESSAGE) -> list[dict]:
    """diffusers' `format_input` for one text-only prompt ([IMG] markers are stripped)."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system_message}]},
        {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
    ]


def klein_messages(prompt: str) -> list[dict]:
    """diffusers' Flux2KleinPipeline `_get_qwen3_prompt_embeds`: one user message, the prompt as is."""
    return [{"role": "user", "content": prompt}]


@dataclass
class PromptTokenizer:
    folder: Path
    max_length: int
    pipeline_class: str = Family.DEV

    def __post_init__(self):
        from tokenizers import Tokenizer

        folder = Path(self.folder)
        if self.pipeline_class not in tuple(Family):
            raise ArtifactsError(
                f"pipeline class {self.pipeline_class!r} for the tokenizer in {folder} is not one of "
                f"{Family.names()}; re-export the artifacts with this version"
            )
        tokenizer_json = folder / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise ArtifactsError(f"{folder} has no tokenizer.json; re-run export to copy the tokenizer")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        # transformers sets truncation and padding per call; a tokenizer.json may carry its own.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        config = _read_optional_json(folder / "tokenizer_config.json")
        special = _read_optional_json(folder / "special_tokens_map.json")
        self.special_tokens = {
            key: _token_text(config.get(key) or special.get(key))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        pad = self.special_tokens.get("pad_token")
        pad_id = self._tokenizer.token_to_id(pad) if pad else None
        if pad_id is None:
            raise ArtifactsError(f"tokenizer in {folder} has no pad token; FLUX.2 pads prompts to a fixed length")
        self.pad_id = pad_id
        self.chat_template = _find_chat_template(folder, config)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tokens, **template_kwargs
        )

    def token_ids(self, prompt: str) -> list[int]:
        """One prompt's ids, formatted and truncated as diffusers does for this pipeline class (no padding)."""
        if self.pipeline_class == Family.KLEIN:
            text = self.render(klein_messages(prompt), add_generation_prompt=True, enable_thinking=False)
            # `tokenizer(text, truncation=True, max_length=N)`: truncate to leave room for the special
            # tokens the post-processor adds, then add them.
            encoding = self._tokenizer.encode(text, add_special_tokens=False)
            room = self.max_length - self._tokenizer.num_special_tokens_to_add(False)
            encoding.truncate(room, direction=self.truncation_side)
            return self._tokenizer.post_process(encoding, add_special_tokens=True).ids
        text = self.render(flux2_messages(prompt))
        token_ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if len(token_ids) > self.max_length:
            keep = self.max_length
            token_ids = token_ids[:keep] if self.truncation_side == "right" else token_ids[-keep:]
        return token_ids

    def untruncated_length(self, prompt: str) -> int:
        """How many tokens the formatted prompt has before truncation (a server refuses what would be cut)."""
        if self.pipeline_class == "Flux2KleinPipeline":
            text = self.render(klein_messages(prompt), add_generation_prompt=True, enable_thinking=False)
            extra = self._tokenizer.num_special_tokens_to_add(False)
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids) + extra
        return len(self._tokenizer.encode(self.render(flux2_messages(prompt)), add_special_tokens=False).ids)

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, each int64 [len(prompts), max_length]."""
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), self.max_length), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            token_ids = self.token_ids(prompt)
            n = len(token_ids)
            if self.padding_side == "right":
                ids[row, :n], mask[row, :n] = token_ids, 1
            else:
                ids[row, self.max_length - n :], mask[row, self.max_length - n :] = token_ids, 1
        return ids, mask


def _read_optional_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised form
        return value.get("content")
    return value


def _find_chat_template(folder: Path, config: dict) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for candidate in (
        config,
        _read_optional_json(folder / "chat_template.json"),
        _read_optional_json(folder / "processor_config.json"),
    ):
        template = candidate.get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # named templates: FLUX.2 uses the default one
            named = {t.get("name"): t.get("template") for t in template}
            if "default" in named:
                return named["default"]
    raise ArtifactsError(f"tokenizer in {folder} has no chat template; FLUX.2 prompts are formatted as a chat")
