"""The project's tokenizer (no transformers) must give diffusers' ids and mask exactly, and render chat
templates exactly as transformers' `apply_chat_template`, helpers included."""

import json
import shutil

import numpy as np
import pytest

from flux2_tiny.published import MISTRAL_TEMPLATE, QWEN3_TEMPLATE
from tests.support import diffusers_dev_ids

PROMPTS = [
    "A cat holding a sign that says hello world",
    "",
    "Une rue de Paris sous la pluie, reflets de néons — 夜の東京の街並み 🦊",
    "remove [IMG] markers [IMG]",
    "a very long prompt " * 200,
]


@pytest.mark.parametrize("layout", ["published", "plain"])
@pytest.mark.parametrize("max_length", [128, 512])
def test_ids_and_mask_match_diffusers(tiny_checkpoint, tiny_plain_checkpoint, layout, max_length):
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from common.tokenizer import SYSTEM_MESSAGE as OURS
    from common.tokenizer import PromptTokenizer

    assert OURS == SYSTEM_MESSAGE
    folder = (tiny_checkpoint if layout == "published" else tiny_plain_checkpoint) / "tokenizer"
    expected = diffusers_dev_ids(folder, PROMPTS, max_length)
    ids, mask = PromptTokenizer(folder, max_length).encode(PROMPTS)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert mask[-1].sum() == max_length  # the long prompt was truncated, not dropped
    assert 0 < mask[1].sum() < max_length  # the empty prompt still carries the system message


def test_published_folder_uses_the_real_template(tiny_checkpoint):
    folder = tiny_checkpoint / "tokenizer"
    assert (folder / "chat_template.jinja").read_text() == MISTRAL_TEMPLATE.read_text()
    assert 'strftime_now("%Y-%m-%d")' in MISTRAL_TEMPLATE.read_text()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["processor_class"] == "PixtralProcessor" and "padding_side" not in config
    assert json.loads((tiny_checkpoint / "model_index.json").read_text())["tokenizer"][1] == "PixtralProcessor"


# Conversations that reach every helper the two real templates call: tools (tojson), multi-turn,
# string and list contents, a system message, namespace, selectattr, enable_thinking.
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ünïcode 東京"}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second", "name": None},
    ],
    [{"role": "user", "content": "weather?"}],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Weather <in> a "city" & région',
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.mark.parametrize("which", ["mistral", "qwen3"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_real_templates_render_as_transformers(tiny_checkpoint, tiny_klein_checkpoint, which, index, generation_prompt):
    from common.reference_pipeline import load_reference_tokenizer
    from common.tokenizer import PromptTokenizer

    folder = (tiny_checkpoint if which == "mistral" else tiny_klein_checkpoint) / "tokenizer"
    template = (MISTRAL_TEMPLATE if which == "mistral" else QWEN3_TEMPLATE).read_text()
    conversation = CONVERSATIONS[index]
    reference = load_reference_tokenizer(folder)
    ours = PromptTokenizer(folder, 64)
    assert ours.chat_template == template == reference.chat_template
    kwargs = {"enable_thinking": False} if which == "qwen3" else {}
    tools = TOOLS if index == 3 else None
    expected = reference.apply_chat_template(
        conversation, tools=tools, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
    )
    got = ours.render(
        conversation, add_generation_prompt=generation_prompt, **({"tools": tools} if tools else {}), **kwargs
    )
    assert got == expected
    if tools:
        assert "get_weather" in got and "région" in got  # tojson without ASCII or HTML escaping


def test_every_helper_renders_as_transformers(tiny_checkpoint, tmp_path):
    """A template calling each helper transformers gives templates, rendered by both."""
    from common.reference_pipeline import load_reference_tokenizer
    from common.tokenizer import PromptTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    (folder / "chat_template.jinja").write_text(
        "{%- set ns = namespace(n=0) %}{%- set d = dict(a=1, b='x') %}"
        "{{- strftime_now('%Y') }}|{{ d | tojson(indent=2, sort_keys=true) }}|{{ {'é': '<&>'} | tojson }}"
        "{%- for m in messages %}{%- if loop.index > 5 %}{% break %}{% endif %}{%- set ns.n = ns.n + 1 %}"
        "{% generation %}[{{ m.role }}:{{ m.content }}]{% endgeneration %}{%- endfor %}|{{ ns.n }}|{{ bos_token }}{{ pad_token }}"
        "{%- if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}"
    )
    messages = [{"role": "user", "content": f"m{i}"} for i in range(7)]
    expected = load_reference_tokenizer(folder).apply_chat_template(messages, tokenize=False)
    assert PromptTokenizer(folder, 64).render(messages) == expected


def test_template_error_is_one_line_naming_the_folder(tiny_checkpoint, tmp_path):
    from common.errors import ArtifactsError
    from common.tokenizer import PromptTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    ours = PromptTokenizer(folder, 64)
    # The real template's own raise_exception: content blocks other than text and image.
    with pytest.raises(ArtifactsError, match="Only text and image blocks are supported") as raised:
        ours.render([{"role": "user", "content": [{"type": "video"}]}])
    assert str(folder / "chat_template.jinja") in str(raised.value) and "\n" not in str(raised.value)
    (folder / "chat_template.jinja").write_text("{{ undefined_helper('x') }}")
    with pytest.raises(ArtifactsError, match="UndefinedError") as raised:
        PromptTokenizer(folder, 64).encode(["a fox"])
    assert str(folder) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "edit, side",
    [
        ({}, "right"),  # as published: LlamaTokenizerFast over a byte-level tokenizer.json, no padding_side
        ({"padding_side": "left"}, "left"),
        ({"padding_side": "right"}, "right"),
        ({"tokenizer_class": "PreTrainedTokenizerFast"}, "right"),
    ],
)
def test_padding_side_is_what_diffusers_pads(tiny_checkpoint, tmp_path, edit, side):
    """Decided as transformers decides for the folder, then ids and mask equal diffusers' on that side."""
    from common.reference_pipeline import load_reference_tokenizer
    from common.tokenizer import PromptTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **edit}))
    ours = PromptTokenizer(folder, 512)
    assert ours.padding_side == load_reference_tokenizer(folder).padding_side == side
    expected = diffusers_dev_ids(folder, PROMPTS, 512)
    ids, mask = ours.encode(PROMPTS)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert mask[0, 0 if side == "left" else -1] == 0  # padded on that side


def test_klein_padding_side_matches_transformers(tiny_klein_checkpoint):
    from common.reference_pipeline import load_reference_tokenizer
    from common.tokenizer import PromptTokenizer

    folder = tiny_klein_checkpoint / "tokenizer"
    ours = PromptTokenizer(folder, 64, pipeline_class="Flux2KleinPipeline")
    assert ours.padding_side == load_reference_tokenizer(folder).padding_side


def test_older_processor_save_keeps_the_template_in_chat_template_json(tiny_checkpoint, tmp_path):
    """Older saves hold the template in chat_template.json, which only the processor reads."""
    from common.tokenizer import PromptTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_checkpoint / "tokenizer", folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    expected = diffusers_dev_ids(folder, PROMPTS, 128)
    ids, mask = PromptTokenizer(folder, 128).encode(PROMPTS)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_a_length_is_refused_only_where_the_chat_template_alone_fills_it(
    tiny_checkpoint, tiny_klein_checkpoint, family
):
    from common.errors import UsageError
    from common.tokenizer import PromptTokenizer

    folder, pipeline_class = {
        "dev": (tiny_checkpoint / "tokenizer", "Flux2Pipeline"),
        "klein": (tiny_klein_checkpoint / "tokenizer", "Flux2KleinPipeline"),
    }[family]
    fixed = PromptTokenizer(folder, 512, pipeline_class).template_length()
    assert fixed == {"dev": 111, "klein": 20}[family]  # an empty prompt, formatted
    roomy = PromptTokenizer(folder, fixed + 1, pipeline_class)
    roomy.check_prompt_room("--max-sequence-length", "export with", UsageError)  # one token of room is enough
    assert roomy.tokenize("a").length == fixed + 1  # and the Triton model's one-letter warm-up prompt takes it
    with pytest.raises(UsageError, match=rf"formats to {fixed} tokens \(an empty prompt\), filling all {fixed}; "):
        PromptTokenizer(folder, fixed, pipeline_class).check_prompt_room("x", "export with", UsageError)
