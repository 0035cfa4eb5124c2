"""FLUX.2 [klein] in the runtime: true CFG for the base model, none for the distilled one, same images as diffusers."""

import json

import numpy as np
import pytest
import torch

from tests.support import run_cli

KLEIN_VARIANT = (
    "text_hidden_size=40", "text_num_heads=5", "text_num_kv_heads=1", "text_head_dim=8", "text_num_layers=6",
    "text_out_layers=1,2,4,5", "num_layers=1", "num_single_layers=3", "attention_head_dim=24",
    "axes_dims_rope=6,6,6,6", "latent_channels=4", "vae_block_out_channels=8,16,16", "seed=5",
)  # fmt: skip


@pytest.fixture(scope="module")
def klein_artifacts(export_klein):
    """name -> the suite's shared fp32 [klein] export ("base", "base-b2", "distilled")."""
    return export_klein


def _diffusers_image(checkpoint, prompt, *, guidance, seed=0, steps=3, negative=None):
    from diffusers import Flux2KleinPipeline

    from export.checkpoint import open_checkpoint

    pipe = Flux2KleinPipeline.from_pretrained(checkpoint, dtype=torch.float32)  # published files: bf16 and fp32
    pipe.set_progress_bar_config(disable=True)
    layers = open_checkpoint(checkpoint).geometry().text_out_layers
    extra = {}
    if negative is not None:
        extra["negative_prompt_embeds"] = pipe.encode_prompt(
            negative, max_sequence_length=128, text_encoder_out_layers=layers
        )[0]
    return pipe(prompt=prompt, height=256, width=256, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed), max_sequence_length=128,
                text_encoder_out_layers=layers, output_type="np", **extra).images[0]  # fmt: skip


def _ours(artifacts, prompt, *, guidance, seed=0, steps=3, negative=""):
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling

    opened = open_artifacts(artifacts)
    runtime = Flux2Runtime(opened, OrtBackend(opened.folder, opened.manifest))
    sampling = Sampling(prompt, seed=seed, steps=steps, guidance=guidance, negative_prompt=negative)
    _, image, _ = next(runtime.generate(sampling, progress=False))
    return image


def test_base_model_cfg_matches_diffusers_and_matters(klein_artifacts, tiny_klein_checkpoint):
    from common.metrics import psnr
    from runtime.check import run_check

    report = run_check(artifacts=klein_artifacts("base"), backend="ort", steps=3, guidance=4.0, log=lambda m: None)
    assert report["passed"] and report["end_to_end"]["psnr_db"] >= 40
    ours = _ours(klein_artifacts("base"), "a red fox in the snow", guidance=4.0)
    without_cfg = _diffusers_image(tiny_klein_checkpoint, "a red fox in the snow", guidance=1.0)
    assert psnr(ours, without_cfg) < 35  # the guidance pass changes the image: the 40 dB above means something


def test_negative_prompt_matches_diffusers_negative_embeds(klein_artifacts, tiny_klein_checkpoint):
    from common.metrics import psnr

    ours = _ours(klein_artifacts("base"), "a lighthouse", guidance=3.0, negative="blurry, dark, low quality")
    reference = _diffusers_image(
        tiny_klein_checkpoint, "a lighthouse", guidance=3.0, negative="blurry, dark, low quality"
    )
    assert psnr(ours, reference) >= 40
    plain = _diffusers_image(tiny_klein_checkpoint, "a lighthouse", guidance=3.0)
    assert psnr(ours, plain) < psnr(ours, reference)


def test_batch2_artifacts_run_the_cfg_pair_in_one_call(klein_artifacts):
    from common.metrics import psnr
    from runtime.check import run_check

    paired = _ours(klein_artifacts("base-b2"), "a red fox in the snow", guidance=4.0)
    separate = _ours(klein_artifacts("base"), "a red fox in the snow", guidance=4.0)
    assert psnr(paired, separate) >= 60
    report = run_check(artifacts=klein_artifacts("base-b2"), backend="ort", steps=3, log=lambda m: None)
    assert report["passed"] and report["end_to_end"]["psnr_db"] >= 40


def test_distilled_model_ignores_guidance_with_diffusers_warning(klein_artifacts, tmp_path):
    from runtime.check import run_check

    report = run_check(artifacts=klein_artifacts("distilled"), backend="ort", steps=3, log=lambda m: None)
    assert report["passed"] and report["end_to_end"]["psnr_db"] >= 40
    np.testing.assert_array_equal(
        _ours(klein_artifacts("distilled"), "a cat", guidance=4.0),
        _ours(klein_artifacts("distilled"), "a cat", guidance=1.0),
    )
    result = run_cli("-m", "runtime.generate", "--artifacts", str(klein_artifacts("distilled")), "--prompt", "a cat",
                     "--steps", "1", "--guidance", "4", "--backend", "ort", "--out", str(tmp_path / "img"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Guidance scale 4.0 is ignored for step-wise distilled models." in result.stderr
    sidecar = json.loads(next((tmp_path / "img").glob("*.json")).read_text())
    assert sidecar["classifier_free_guidance"] is False


@pytest.mark.slow
def test_klein_configuration_never_seen(tmp_path):
    checkpoint = tmp_path / "klein-variant"
    made = run_cli(
        "-m",
        "flux2_tiny",
        "--model",
        "tiny-klein",
        "--out",
        str(checkpoint),
        *[a for pair in KLEIN_VARIANT for a in ("--set", pair)],
    )
    assert made.returncode == 0, made.stderr
    out = tmp_path / "artifacts"
    result = run_cli(
        "-m",
        "export",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--height",
        "192",
        "--width",
        "320",
        "--max-sequence-length",
        "80",
    )
    assert result.returncode == 0, result.stderr
    check = run_cli("-m", "runtime.check", "--artifacts", str(out), "--steps", "3", "--guidance", "3.5")
    assert check.returncode == 0, check.stderr
    report = json.loads((out / "reports" / "runtime_check.json").read_text())
    assert report["end_to_end"]["psnr_db"] >= 40 and report["backend"] == "ort-cpu"
