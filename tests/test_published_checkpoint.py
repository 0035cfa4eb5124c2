"""Checkpoints in the published black-forest-labs layout that no other test uses (issue 12).

The real Tekken vocabulary (from mistral-common's wheel) behind the real Mistral Small 3.1 template,
a non-default configuration of each family, and every command a user runs on them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.support import assert_one_line_error, diffusers_dev_ids, run_cli, tekken_vocab

PROMPTS = [
    "Une rue de Paris sous la pluie, reflets de néons — 夜の東京の街並み 🦊 Ünïcödé ß",
    "",
    "an over-long prompt about a red fox " * 100,
    "   leading and trailing spaces   ",
]
# Non-default configurations; the [dev] one gets the real Tekken vocabulary when pip can fetch it.
DEV = ("text_hidden_size=40", "text_num_layers=4", "text_num_heads=5", "text_num_kv_heads=5",
       "text_out_layers=1,2,3", "num_layers=1", "num_single_layers=1", "num_attention_heads=2",
       "attention_head_dim=12", "axes_dims_rope=2,2,4,4", "latent_channels=4", "vae_block_out_channels=8,8",
       "vae_norm_num_groups=4", "seed=21")  # fmt: skip
KLEIN = ("text_hidden_size=32", "text_head_dim=8", "text_num_layers=5", "text_out_layers=1,3,4",
         "num_layers=1", "num_single_layers=2", "attention_head_dim=8", "axes_dims_rope=2,2,2,2",
         "latent_channels=4", "vae_block_out_channels=8,8", "vae_norm_num_groups=4", "seed=22")  # fmt: skip
# Small, as the suite runs it twice; 128 tokens leave room past the tiny [dev] chat template's 111
# (export refuses a length the template alone fills).
SHAPES = ("--height", "64", "--width", "64", "--max-sequence-length", "128")
KLEIN_SHAPES = ("--height", "64", "--width", "64", "--max-sequence-length", "32")  # [klein]'s template: 20 tokens


@pytest.fixture(scope="module")
def tekken(_cache_dir):
    path = tekken_vocab(_cache_dir)
    if path is None:
        pytest.skip("pip could not fetch mistral-common's wheel, which holds the real Tekken vocabulary")
    return path


@pytest.fixture(scope="module")
def tekken_tokenizer_folder(tekken, tmp_path_factory):
    """A [dev] tokenizer folder as published: real vocabulary, real template, processor files."""
    from flux2_tiny.dev import _tekken_tokenizer
    from flux2_tiny.published import MISTRAL_TEMPLATE, write_pixtral_tokenizer

    folder = tmp_path_factory.mktemp("tekken") / "tokenizer"
    write_pixtral_tokenizer(_tekken_tokenizer(str(tekken)), folder, MISTRAL_TEMPLATE.read_text())
    return folder


@pytest.mark.parametrize("max_length", [64, 512])
def test_real_vocabulary_ids_and_mask_equal_diffusers(tekken_tokenizer_folder, max_length):
    from common.reference_pipeline import load_reference_tokenizer
    from common.tokenizer import PromptTokenizer

    assert len(load_reference_tokenizer(tekken_tokenizer_folder)) == 131072
    expected = diffusers_dev_ids(tekken_tokenizer_folder, PROMPTS, max_length)
    ours = PromptTokenizer(tekken_tokenizer_folder, max_length)
    ids, mask = ours.encode(PROMPTS)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids[0, 0] == 1 and ours.pad_id == 11  # Tekken's <s> and <pad>
    assert mask[2].sum() == max_length  # the over-long prompt is cut, not dropped
    # The system message alone, in Tekken tokens, is what an empty prompt leaves.
    assert 0 < mask[1].sum() < max_length or max_length == 64


def test_single_file_bfl_checkpoint_is_answered_in_one_line(tmp_path):
    single = tmp_path / "flux2-dev.safetensors"
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    single.write_bytes(len(header).to_bytes(8, "little") + header)
    result = run_cli("-m", "export", "--model", str(single), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, str(single), "single-file BFL checkpoint", "hf download black-forest-labs/FLUX.2-dev")
    folder = tmp_path / "downloads"
    folder.mkdir()
    shutil.copy(single, folder / "flux2-dev.safetensors")
    result = run_cli("-m", "export", "--model", str(folder), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "flux2-dev.safetensors", "diffusers layout")
    assert not (tmp_path / "out").exists()


def test_runtime_refuses_a_tokenizer_that_differs_from_export(export_tiny, tmp_path):
    from common.errors import ArtifactsError
    from runtime.artifacts import open_artifacts
    from runtime.backends.select import select_backend
    from runtime.pipeline import Flux2Runtime

    artifacts = tmp_path / "artifacts"
    shutil.copytree(export_tiny("fp32"), artifacts)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["tokenizer"]["padding_side"] == "right"

    def runtime():
        opened = open_artifacts(artifacts)
        return Flux2Runtime(opened, select_backend("ort", opened.folder, opened.manifest))

    runtime()  # as exported: accepted
    config_path = artifacts / "tokenizer" / "tokenizer_config.json"
    original = config_path.read_text()
    config_path.write_text(json.dumps({**json.loads(original), "padding_side": "left"}))
    # The artifacts' integrity check (every file against the manifest's sha256) refuses it first.
    with pytest.raises(ArtifactsError, match="tokenizer/tokenizer_config.json has sha256 .* the manifest says"):
        runtime()
    config_path.write_text(original)
    # A runtime that would pad on the other side than export recorded (and checked) is refused too.
    manifest_path = artifacts / "manifest.json"
    edited = json.loads(manifest_path.read_text())
    edited["tokenizer"]["padding_side"] = "left"
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(ArtifactsError, match="padding_side='right' but .* records 'left'"):
        runtime()


def _command(module: str, *args: str) -> None:
    """`python -m module args` in this process, through the same run_cli as the command line: exit 0.

    In-process to save the ~4 s import of torch and diffusers that each of the ~10 commands per family
    would pay again in a subprocess; the command-line process itself is tested elsewhere (every
    --help and one-line error in test_cli_errors.py and the wheel smoke test).
    """
    import importlib

    from common.cli import run_cli as run_main

    assert run_main(importlib.import_module(module).main, list(args)) == 0, (module, args)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dev", "klein"])
def test_a_published_checkpoint_no_test_saw(family, tmp_path, _cache_dir):
    """Every command on a published-layout folder: export fp32/bf16/fp16, generate, check, torch, fp8."""
    settings = list(DEV if family == "dev" else KLEIN)
    if family == "dev":
        vocab = tekken_vocab(_cache_dir)
        if vocab is not None:
            settings.append(f"tekken_vocab={vocab}")
    model = "tiny" if family == "dev" else "tiny-klein"
    shapes = SHAPES if family == "dev" else KLEIN_SHAPES
    checkpoint = tmp_path / "checkpoint"
    _command(
        "flux2_tiny.__main__", "--model", model, "--out", str(checkpoint), *[a for s in settings for a in ("--set", s)]
    )
    for precision in ("fp32", "bf16", "fp16"):
        out = tmp_path / precision
        _command("export.__main__", "--model", str(checkpoint), "--out", str(out), "--precision", precision, *shapes)
        _command("runtime.generate", "--artifacts", str(out), "--prompt", "a fox, 夜の東京",
                 "--steps", "2", "--out", str(tmp_path / f"images-{precision}"))  # fmt: skip
    _command("runtime.check", "--artifacts", str(tmp_path / "fp32"), "--steps", "2")
    report = json.loads((tmp_path / "fp32" / "reports" / "runtime_check.json").read_text())
    assert report["passed"] and report["end_to_end"]["psnr_db"] >= 40.0
    _command("runtime.check", "--artifacts", str(tmp_path / "fp32"), "--backend", "torch", "--steps", "2")
    _command("export.__main__", "--model", str(checkpoint), "--out", str(tmp_path / "fp8"), "--precision", "fp8",
             "--calib-prompts", "2", "--calib-steps", "2", *shapes)  # fmt: skip
