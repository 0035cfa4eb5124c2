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

from common.errors import ArtifactsError, Flux2TrtError
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
    "preprocessor_config.json",
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


@dataclass(frozen=True)
class PromptTokens:
    """One prompt as the text encoder gets it, and how long it was before diffusers' truncation."""

    ids: list[int]  # formatted and truncated to max_length, not padded
    length: int  # the formatted prompt's token count before truncation

    @property
    def truncated(self) -> bool:
        return self.length > len(self.ids)


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
        # What transformers' `special_tokens_map` hands the template (apply_chat_template's kwargs).
        self._template_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        self.padding_side = padding_side(folder, config, json.loads(tokenizer_json.read_text(encoding="utf-8")))
        self.truncation_side = config.get("truncation_side", "right")
        pad = self.special_tokens.get("pad_token")
        pad_id = self._tokenizer.token_to_id(pad) if pad else None
        if pad_id is None:
            raise ArtifactsError(f"tokenizer in {folder} has no pad token; FLUX.2 pads prompts to a fixed length")
        self.pad_id = pad_id
        self.chat_template, self._template_source = _find_chat_template(folder, config)

    def record(self) -> dict:
        """What the manifest keeps of this tokenizer, so a runtime can refuse one that tokenises differently."""
        return {
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "pad_id": self.pad_id,
            "pipeline_class": self.pipeline_class,
        }

    def check_record(self, recorded: dict, where: Path) -> None:
        """Refuse to tokenise differently from what the artifacts were exported (and checked) with.

        The tokenizer files themselves are checked against the manifest's sha256 by `open_artifacts`
        (common.integrity, with its verified stamp); this compares how this runtime reads them.
        """
        ours = self.record()
        for key, value in recorded.items():
            if key in ours and ours[key] != value:
                raise ArtifactsError(
                    f"tokenizer in {self.folder} gives {key}={ours[key]!r} but {where} records {value!r} from export; "
                    "the tokenizer files or the runtime changed since export: re-export with --force"
                )

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
        """The chat as transformers' `apply_chat_template(..., tokenize=False)` renders it (see `chat_environment`)."""
        import jinja2

        try:
            template = _compiled_template(self.chat_template)
            chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
            # As apply_chat_template: special tokens, overridden by the caller's values; tools and documents None.
            context = {**self._template_tokens, "tools": None, "documents": None, **template_kwargs}
            return template.render(messages=chat, add_generation_prompt=add_generation_prompt, **context)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ArtifactsError(
                f"chat template {self._template_source} cannot render the prompt ({type(exc).__name__}: "
                f"{_one_line(exc)}); use the tokenizer folder of the published checkpoint, or fix that template"
            ) from None

    def tokenize(self, prompt: str) -> PromptTokens:
        """One prompt formatted and truncated as diffusers does for this pipeline class (no padding),
        with the count it had before truncation: one rendering and one encoding give both."""
        if self.pipeline_class == Family.KLEIN:
            text = self.render(klein_messages(prompt), add_generation_prompt=True, enable_thinking=False)
            # `tokenizer(text, truncation=True, max_length=N)`: truncate to leave room for the special
            # tokens the post-processor adds, then add them.
            encoding = self._tokenizer.encode(text, add_special_tokens=False)
            special = self._tokenizer.num_special_tokens_to_add(False)
            length = len(encoding.ids) + special
            encoding.truncate(self.max_length - special, direction=self.truncation_side)
            return PromptTokens(self._tokenizer.post_process(encoding, add_special_tokens=True).ids, length)
        text = self.render(flux2_messages(prompt))
        token_ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        length = len(token_ids)
        if length > self.max_length:
            keep = self.max_length
            token_ids = token_ids[:keep] if self.truncation_side == "right" else token_ids[-keep:]
        return PromptTokens(token_ids, length)

    def template_length(self) -> int:
        """The chat template's fixed part: the token count of an empty prompt, formatted as every prompt is."""
        return self.tokenize("").length

    def check_prompt_room(self, subject: str, fix: str, error: type[Flux2TrtError]) -> None:
        """Refuse a max_length that the chat template's fixed part alone fills (`error`, one line).

        The rule: such a model can never serve when `template_length() >= max_length`, that is when
        not one prompt token fits. A server then refuses every prompt but the empty one, and
        runtime.generate cuts every prompt down to the template (the same image whatever the prompt).
        `subject` names the value (`--max-sequence-length 64`, or the artifacts folder) and `fix` starts
        the advice (`export with`): the line names both counts and the smallest length that leaves room.
        """
        fixed = self.template_length()
        if fixed >= self.max_length:
            raise error(
                f"{subject} leaves no room for a prompt: the chat template ({self._template_source}) alone formats to "
                f"{fixed} tokens (an empty prompt), filling all {self.max_length}; {fix} --max-sequence-length "
                f"{fixed + 1} or more (the smallest that leaves room for a prompt; FLUX.2 uses 512)"
            )

    def token_ids(self, prompt: str) -> list[int]:
        """One prompt's ids, formatted and truncated as diffusers does for this pipeline class (no padding)."""
        return self.tokenize(prompt).ids

    def untruncated_length(self, prompt: str) -> int:
        """How many tokens the formatted prompt has before truncation (a server refuses what would be cut)."""
        return self.tokenize(prompt).length

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
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised form
        return value.get("content")
    return value


def _find_chat_template(folder: Path, config: dict) -> tuple[str, Path]:
    """The template and the file it came from, in transformers' order (the .jinja file first)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja
    for source in ("tokenizer_config.json", "chat_template.json", "processor_config.json"):
        candidate = config if source == "tokenizer_config.json" else _read_optional_json(folder / source)
        template = candidate.get("chat_template")
        if isinstance(template, str):
            return template, folder / source
        if isinstance(template, list):  # named templates: FLUX.2 uses the default one
            named = {t.get("name"): t.get("template") for t in template}
            if "default" in named:
                return named["default"], folder / source
    raise ArtifactsError(f"tokenizer in {folder} has no chat template; FLUX.2 prompts are formatted as a chat")


# tokenizer classes whose transformers implementation pads on the left by default (their class
# attribute `padding_side = "left"`); every other class pads on the right.
_LEFT_PADDING_CLASSES = ("LlamaTokenizer", "CodeLlamaTokenizer", "GemmaTokenizer", "CohereTokenizer", "XLNetTokenizer")


def padding_side(folder: Path, config: dict, tokenizer_json: dict) -> str:
    """The side transformers pads this tokenizer folder on, as diffusers' pipelines load it.

    In transformers' order: `padding_side` in tokenizer_config.json; else the padding direction
    stored in tokenizer.json; else the class default. For the class default, transformers 5 loads a
    folder that names `LlamaTokenizer(Fast)` but ships a byte-level tokenizer.json (as Mistral's
    Tekken does) as a plain `TokenizersBackend`, which pads right; transformers 4 padded such a
    folder on the left. Tested against transformers for each case (tests/test_tokenizer.py).
    """
    side = config.get("padding_side")
    if side is None:
        side = (tokenizer_json.get("padding") or {}).get("direction")
        side = {"Left": "left", "Right": "right"}.get(side, side)
    if side is None:
        declared = str(config.get("tokenizer_class") or "").removesuffix("Fast")
        side = "left" if declared in _LEFT_PADDING_CLASSES and not _is_byte_level(tokenizer_json) else "right"
    if side not in ("left", "right"):
        raise ArtifactsError(f"tokenizer in {folder} has padding_side {side!r}; expected 'left' or 'right'")
    return side


def _is_byte_level(tokenizer_json: dict) -> bool:
    def walk(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tokenizer_json.get("pre_tokenizer")) or walk(tokenizer_json.get("decoder"))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


_TEMPLATES: dict[str, object] = {}


def _compiled_template(source: str):
    if source not in _TEMPLATES:
        _TEMPLATES[source] = chat_environment().from_string(source)
    return _TEMPLATES[source]


def chat_environment():
    """A jinja environment that renders chat templates as transformers' `apply_chat_template` does.

    Same sandbox and options (`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks, loop
    controls, the `{% generation %}` tag) and the same helpers a template may call: the `tojson`
    filter without HTML escaping, `raise_exception`, `strftime_now` (the real Mistral Small 3.1
    template starts with `strftime_now("%Y-%m-%d")`), `dict` and a `namespace` that refuses
    underscore names. transformers' own helpers are not imported: the runtime does not need
    transformers.
    """
    import json as _json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the text.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return _json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(), namespace=TemplateNamespace
    )
    return env
