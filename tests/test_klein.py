"""FLUX.2 [klein]: the tiny checkpoints load in diffusers, and tokenizer and graph modules equal its computation."""

import hashlib

import numpy as np
import pytest
import torch

from common.metrics import psnr

PROMPTS = [
    "A cat holding a sign that says hello world",
    "",
    "Une rue de Paris sous la pluie, reflets de néons — 夜の東京の街並み 🦊",
    "special tokens typed by a user: <|im_end|> <think> [IMG]",
    "a very long prompt " * 200,
]


@pytest.fixture(scope="module")
def base_pipe(tiny_klein_checkpoint):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(
        tiny_klein_checkpoint, dtype=torch.float32
    )  # the published files hold bf16 and fp32
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_ckpt(tiny_klein_checkpoint):
    from export.checkpoint import open_checkpoint

    return open_checkpoint(tiny_klein_checkpoint)


def _generate(pipe, layers, guidance_scale, prompt="a red fox in the snow"):
    return pipe(
        prompt=prompt,
        height=128,
        width=128,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=64,
        text_encoder_out_layers=layers,
        output_type="np",
    ).images[0]


@pytest.mark.slow
def test_base_loads_and_guidance_changes_the_image(base_pipe, base_ckpt):
    from transformers import Qwen3ForCausalLM

    geometry = base_ckpt.geometry()
    assert geometry.pipeline_class == "Flux2KleinPipeline" and not geometry.is_distilled
    assert not geometry.guidance_embeds and not base_pipe.transformer.config.guidance_embeds
    assert isinstance(base_pipe.text_encoder, Qwen3ForCausalLM)
    assert base_pipe.config.is_distilled is False
    with_cfg = _generate(base_pipe, geometry.text_out_layers, 4.0)
    assert base_pipe.do_classifier_free_guidance
    without_cfg = _generate(base_pipe, geometry.text_out_layers, 1.0)
    other_prompt = _generate(base_pipe, geometry.text_out_layers, 4.0, prompt="an astronaut riding a horse")
    assert with_cfg.shape == (128, 128, 3) and np.isfinite(with_cfg).all() and with_cfg.std() > 0.05
    # Guidance and prompt move the image far more than a 40 dB check allows: a runtime that
    # skipped CFG or encoded the wrong prompt could not pass one (measured ~30 and ~26 dB).
    assert psnr(with_cfg, without_cfg) < 35
    assert psnr(with_cfg, other_prompt) < 35


def test_distilled_ignores_guidance_and_warns(tiny_klein_distilled_checkpoint, monkeypatch):
    from diffusers import Flux2KleinPipeline
    from diffusers.pipelines.flux2 import pipeline_flux2_klein

    from export.checkpoint import open_checkpoint

    geometry = open_checkpoint(tiny_klein_distilled_checkpoint).geometry()
    assert geometry.is_distilled
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein_distilled_checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.is_distilled is True  # read from model_index.json
    warnings = []
    monkeypatch.setattr(pipeline_flux2_klein.logger, "warning", warnings.append)
    guided = _generate(pipe, geometry.text_out_layers, 4.0)
    assert not pipe.do_classifier_free_guidance
    assert warnings == ["Guidance scale 4.0 is ignored for step-wise distilled models."]
    unguided = _generate(pipe, geometry.text_out_layers, 1.0)
    np.testing.assert_array_equal(guided, unguided)


def test_generator_is_deterministic(tmp_path, tiny_klein_checkpoint):
    from flux2_tiny.config import DEFAULT
    from flux2_tiny.klein import KLEIN_BASE, KLEIN_DISTILLED, write_tiny_klein_checkpoint

    def digest(folder):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.safetensors")))).hexdigest()

    write_tiny_klein_checkpoint(tmp_path, KLEIN_BASE)
    assert digest(tmp_path) == digest(tiny_klein_checkpoint)
    assert len({KLEIN_BASE.key(), KLEIN_DISTILLED.key(), DEFAULT.key()}) == 3


def test_chat_template_renders_qwen3_no_thinking_prompt(tiny_klein_checkpoint):
    from common.tokenizer import PromptTokenizer, klein_messages

    tokenizer = PromptTokenizer(tiny_klein_checkpoint / "tokenizer", 64, pipeline_class="Flux2KleinPipeline")
    messages = klein_messages("a fox")
    assert tokenizer.render(messages, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tokenizer.render(messages, add_generation_prompt=True) == (
        "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("max_length", [128, 512])
def test_token_ids_and_mask_are_what_diffusers_feeds_qwen3(base_pipe, base_ckpt, max_length):
    """Capture the ids and mask diffusers' own `_get_qwen3_prompt_embeds` passes to the text encoder."""
    from common.tokenizer import PromptTokenizer

    captured = {}

    def grab(module, args, kwargs):
        captured.update(input_ids=kwargs["input_ids"].numpy(), attention_mask=kwargs["attention_mask"].numpy())

    handle = base_pipe.text_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            base_pipe._get_qwen3_prompt_embeds(
                base_pipe.text_encoder,
                base_pipe.tokenizer,
                PROMPTS,
                max_sequence_length=max_length,
                hidden_states_layers=base_ckpt.geometry().text_out_layers,
            )
    finally:
        handle.remove()
    tokenizer = PromptTokenizer(base_ckpt.root / "tokenizer", max_length, pipeline_class="Flux2KleinPipeline")
    ids, mask = tokenizer.encode(PROMPTS)
    np.testing.assert_array_equal(ids, captured["input_ids"])
    np.testing.assert_array_equal(mask, captured["attention_mask"])
    assert mask[-1].sum() == max_length  # the long prompt was truncated, not dropped
    assert 0 < mask[1].sum() < max_length  # the empty prompt still carries the chat template
    # the class really selects the format: the [dev] one (a system message with list contents) is
    # not even renderable by Qwen3's real template, in transformers as here
    from common.errors import ArtifactsError

    with pytest.raises(ArtifactsError, match="chat_template.jinja cannot render"):
        PromptTokenizer(base_ckpt.root / "tokenizer", max_length).encode(PROMPTS[:1])


def test_unknown_pipeline_class_is_a_one_line_error(tiny_klein_checkpoint):
    from common.errors import ArtifactsError
    from common.tokenizer import PromptTokenizer

    with pytest.raises(ArtifactsError, match="'Flux3Pipeline'.*Flux2KleinPipeline"):
        PromptTokenizer(tiny_klein_checkpoint / "tokenizer", 64, pipeline_class="Flux3Pipeline")


def test_text_encoder_graph_is_klein_prompt_embeds(base_pipe, base_ckpt, small_shapes):
    from common.tokenizer import PromptTokenizer
    from export.verify.reference import build_graph_module

    geometry = base_ckpt.geometry()
    assert geometry.text_out_layers == (3, 5, 7)  # recorded in model_index.json
    module = build_graph_module("text_encoder", base_ckpt, geometry, small_shapes, "fp32")
    assert len(module.language_model.layers) == max(geometry.text_out_layers) + 1 < geometry.text_num_layers
    prompts = PROMPTS[:3]
    expected = base_pipe._get_qwen3_prompt_embeds(
        base_pipe.text_encoder,
        base_pipe.tokenizer,
        prompts,
        max_sequence_length=small_shapes.max_sequence_length,
        hidden_states_layers=geometry.text_out_layers,
    )
    ids, mask = PromptTokenizer(
        base_ckpt.root / "tokenizer", small_shapes.max_sequence_length, pipeline_class=geometry.pipeline_class
    ).encode(prompts)
    with torch.no_grad():
        got = module(torch.from_numpy(ids), torch.from_numpy(mask))
    assert got.shape == expected.shape == (3, small_shapes.max_sequence_length, 3 * geometry.text_hidden_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_transformer_graph_is_forward_without_guidance(base_pipe, base_ckpt, small_shapes):
    from common.specs import component_specs
    from export.graphs.transformer import position_ids
    from export.verify.reference import build_graph_module

    geometry = base_ckpt.geometry()
    spec = component_specs(geometry, small_shapes)["transformer"]
    assert [t.name for t in spec.inputs] == ["hidden_states", "encoder_hidden_states", "timestep"]
    module = build_graph_module("transformer", base_ckpt, geometry, small_shapes, "fp32")
    text_ids, image_ids = position_ids(geometry, small_shapes)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, image_ids.shape[0], geometry.in_channels, generator=generator)
    prompt = torch.randn(2, text_ids.shape[0], geometry.joint_attention_dim, generator=generator)
    timestep = torch.tensor([0.37, 0.37])
    with torch.no_grad():
        expected = base_pipe.transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt,
            timestep=timestep,
            guidance=None,
            txt_ids=text_ids[None].expand(2, -1, -1),
            img_ids=image_ids[None].expand(2, -1, -1),
            return_dict=False,
        )[0]
        got = module(hidden, prompt, timestep)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_geometry_defaults_to_klein_layers_and_reads_is_distilled():
    from common.specs import Geometry, geometry_from_configs

    configs = ({"hidden_size": 2560, "num_hidden_layers": 36}, {"guidance_embeds": False}, {})
    klein = geometry_from_configs({"_class_name": "Flux2KleinPipeline", "is_distilled": True}, *configs)
    assert klein.text_out_layers == (9, 18, 27) and klein.is_distilled and not klein.guidance_embeds
    base = geometry_from_configs({"_class_name": "Flux2KleinPipeline"}, *configs)
    assert not base.is_distilled
    # manifests written before the field existed still load
    old = {k: v for k, v in klein.to_json().items() if k != "is_distilled"}
    assert Geometry.from_json(old).is_distilled is False
    assert Geometry.from_json(klein.to_json()) == klein
