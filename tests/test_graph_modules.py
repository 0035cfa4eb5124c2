"""The exportable modules compute exactly what diffusers' Flux2Pipeline computes (PyTorch vs PyTorch)."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from common.reference_pipeline import reference_pipeline

    return reference_pipeline(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    from export.checkpoint import open_checkpoint

    return open_checkpoint(tiny_checkpoint)


def test_text_encoder_graph_is_diffusers_prompt_embeds(pipe, ckpt, small_shapes):
    from common.tokenizer import PromptTokenizer
    from export.verify.reference import CHECK_PROMPT, build_graph_module

    geometry = ckpt.geometry()
    module = build_graph_module("text_encoder", ckpt, geometry, small_shapes, "fp32")
    # cut after the deepest layer read (+1, see load_language_model): 7 of the tiny model's 8
    assert len(module.language_model.layers) == max(geometry.text_out_layers) + 1 < geometry.text_num_layers
    expected = pipe._get_mistral_3_small_prompt_embeds(
        pipe.text_encoder,
        pipe.tokenizer,
        [CHECK_PROMPT, "a second prompt"],
        max_sequence_length=small_shapes.max_sequence_length,
        hidden_states_layers=geometry.text_out_layers,
    )
    ids, mask = PromptTokenizer(ckpt.root / "tokenizer", small_shapes.max_sequence_length).encode(
        [CHECK_PROMPT, "a second prompt"]
    )
    with torch.no_grad():
        got = module(torch.from_numpy(ids), torch.from_numpy(mask))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_transformer_graph_is_diffusers_forward(pipe, ckpt, small_shapes):
    from export.graphs.transformer import position_ids
    from export.verify.reference import build_graph_module

    geometry = ckpt.geometry()
    module = build_graph_module("transformer", ckpt, geometry, small_shapes, "fp32")
    text_ids, image_ids = position_ids(geometry, small_shapes)
    # The pipeline's own id builders agree with ours.
    latents = torch.zeros(1, geometry.in_channels, small_shapes.height // 16, small_shapes.width // 16)
    torch.testing.assert_close(pipe._prepare_latent_ids(latents)[0], image_ids)
    embeds = torch.zeros(1, small_shapes.max_sequence_length, 4)
    torch.testing.assert_close(pipe._prepare_text_ids(embeds)[0], text_ids)

    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, image_ids.shape[0], geometry.in_channels, generator=generator)
    prompt = torch.randn(1, text_ids.shape[0], geometry.joint_attention_dim, generator=generator)
    timestep, guidance = torch.tensor([0.37]), torch.tensor([4.0])
    with torch.no_grad():
        expected = pipe.transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt,
            timestep=timestep,
            guidance=guidance,
            txt_ids=text_ids[None],
            img_ids=image_ids[None],
            return_dict=False,
        )[0]
        got = module(hidden, prompt, timestep, guidance)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_vae_graph_is_pipeline_decode(pipe, ckpt, small_shapes):
    from export.verify.reference import build_graph_module

    geometry = ckpt.geometry()
    module = build_graph_module("vae", ckpt, geometry, small_shapes, "fp32")
    rows, cols = small_shapes.height // 16, small_shapes.width // 16
    packed = torch.randn(1, rows * cols, 4 * geometry.latent_channels, generator=torch.Generator().manual_seed(2))
    # diffusers' Flux2Pipeline.__call__ after the denoising loop:
    latent = torch.zeros(1, 4 * geometry.latent_channels, rows, cols)
    latents = pipe._unpack_latents_with_ids(packed, pipe._prepare_latent_ids(latent))
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    assert float(mean.abs().max()) > 0.1 and float((std - 1).abs().max()) > 0.1  # the stats matter
    latents = pipe._unpatchify_latents(latents * std + mean)
    with torch.no_grad():
        expected = pipe.vae.decode(latents, return_dict=False)[0]
        got = module(packed)
    assert got.shape == (1, 3, small_shapes.height, small_shapes.width)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-5)
