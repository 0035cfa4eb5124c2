"""Every user mistake: one line on stderr naming the value and the fix, exit code 2, nothing written."""

import os
import shutil

import pytest

from common.precision import PRECISION_NAMES
from tests.support import assert_one_line_error, run_cli


def _export(out, *extra, model="tiny"):
    return run_cli(
        "-m",
        "export",
        "--model",
        str(model),
        "--out",
        str(out),
        "--height",
        "128",
        "--width",
        "128",
        "--max-sequence-length",
        "128",  # room for a prompt beyond the tiny [dev] chat template's 111 tokens
        *extra,
    )


def test_missing_checkpoint(tmp_path):
    result = _export(tmp_path / "new" / "out", model=tmp_path / "nope")
    assert_one_line_error(result, str(tmp_path / "nope"), "does not exist")
    assert not (tmp_path / "new").exists()  # not even the parent of --out was made


def test_folder_that_is_not_flux2(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    result = _export(tmp_path / "out", model=tmp_path / "sd")
    assert_one_line_error(result, "StableDiffusionPipeline", "not FLUX.2")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(_export(tmp_path / "out", model=tmp_path / "empty"), "model_index.json", "transformer/")


@pytest.mark.slow
def test_truncated_safetensors(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"  # a published shard
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    result = _export(tmp_path / "out", model=broken)
    assert_one_line_error(result, str(weights), "truncated")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_header(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    assert_one_line_error(_export(tmp_path / "out", model=broken), str(weights), "corrupt")


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (("--precision", "int4"), ("'int4'", "fp32, fp16, bf16")),
        # Every precision, from the one declaration (common.precision), in the one line.
        (("--precision", "fp9"), ("unknown precision 'fp9'", ", ".join(PRECISION_NAMES))),
        (("--components", "transformer,unet"), ("unet", "text_encoder,transformer,vae")),
        (("--height", "1000"), ("--height 1000", "multiple of 16")),
        (("--width", "0"), ("--width 0",)),
        (("--height", "abc"), ("abc",)),
    ],
)
def test_bad_flags(tmp_path, flags, needles):
    result = _export(tmp_path / "out", *flags)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the check is by permission bits")
def test_unwritable_output_as_user(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(_export(locked / "out"), str(locked), "not writable")


def test_output_path_is_a_file_or_foreign_folder(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_one_line_error(_export(target), str(target), "is a file")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("x")
    assert_one_line_error(_export(foreign), str(foreign), "not an artifacts folder")
    assert (foreign / "holiday.jpg").read_text() == "x"


def test_output_under_a_file_cannot_be_created(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert_one_line_error(_export(blocker / "sub" / "out"), str(blocker / "sub"), "writable")


def test_output_on_a_read_only_filesystem(tmp_path):
    # /proc refuses new folders even for root, which is who CI runs as
    assert_one_line_error(_export("/proc/flux2-trt-out"), "/proc", "writable")


# The tiny [dev] checkpoint's chat template (FLUX.2 [dev]'s system message around the prompt) alone
# formats to 111 tokens in its small vocabulary: at 64, as issue 26 exported it, every prompt was refused.
TINY_TEMPLATE_TOKENS = 111


@pytest.mark.parametrize("length", [64, TINY_TEMPLATE_TOKENS])
def test_a_max_sequence_length_the_chat_template_fills(tmp_path, tiny_checkpoint, length):
    from common.tokenizer import PromptTokenizer

    assert PromptTokenizer(tiny_checkpoint / "tokenizer", length).template_length() == TINY_TEMPLATE_TOKENS
    result = _export(tmp_path / "new" / "out", "--max-sequence-length", str(length))
    assert_one_line_error(
        result,
        f"--max-sequence-length {length} leaves no room for a prompt",
        f"formats to {TINY_TEMPLATE_TOKENS} tokens (an empty prompt), filling all {length}",
        f"--max-sequence-length {TINY_TEMPLATE_TOKENS + 1} or more",
    )
    assert not (tmp_path / "new").exists()  # refused before anything was written
