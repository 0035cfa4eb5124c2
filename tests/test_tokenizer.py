"""The project's tokenizer (no transformers) must give diffusers' ids and mask exactly."""

import numpy as np
import pytest

PROMPTS = [
    "A cat holding a sign that says hello world",
    "",
    "Une rue de Paris sous la pluie, reflets de néons — 夜の東京の街並み 🦊",
    "remove [IMG] markers [IMG]",
    "a very long prompt " * 200,
]


@pytest.mark.parametrize("max_length", [128, 512])
def test_ids_and_mask_match_diffusers(tiny_checkpoint, max_length):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import AutoTokenizer

    from common.tokenizer import SYSTEM_MESSAGE as OURS
    from common.tokenizer import PromptTokenizer

    assert OURS == SYSTEM_MESSAGE
    reference = AutoTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    expected = reference.apply_chat_template(
        format_input(PROMPTS, SYSTEM_MESSAGE),
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        padding="max_length",
        truncation=True,
        max_length=max_length,
    )
    ids, mask = PromptTokenizer(tiny_checkpoint / "tokenizer", max_length).encode(PROMPTS)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert mask[-1].sum() == max_length  # the long prompt was truncated, not dropped
    assert 0 < mask[1].sum() < max_length  # the empty prompt still carries the system message
