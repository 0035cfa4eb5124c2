"""FP8 calibration: the shipped prompts, amax hooks, determinism, the cache, and command-line errors."""

import json

import pytest
import torch
from torch import nn

from common.errors import UsageError
from common.specs import Shapes
from export.fp8.calibrate import AmaxRecorder, CalibrationSettings, cache_path, calibrate, load_prompts
from tests.support import run_cli

TINY_SHAPES = Shapes(height=64, width=64, max_sequence_length=32)


def test_prompt_set_is_varied_and_excludes_the_check_prompt():
    from export.fp8.twin import E2E_PROMPT
    from export.verify.reference import CHECK_PROMPT

    prompts = load_prompts()
    assert len(prompts) >= 32
    assert len(set(prompts)) == len(prompts)
    assert CHECK_PROMPT not in prompts and E2E_PROMPT not in prompts
    assert len({len(p.split()) for p in prompts}) >= 8  # lengths vary
    assert any(not p.isascii() for p in prompts)  # not only English


def test_amax_recorder_keeps_the_largest_input():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    recorder = AmaxRecorder(model)
    inputs = [torch.tensor([[1.0, -7.0, 2.0, 0.5]]), torch.tensor([[3.0, 1.0, -2.0, 0.0]])]
    hidden = []
    with torch.no_grad():
        for x in inputs:
            hidden.append(model[1](model[0](x)))
            model(x)
    recorder.remove()
    amax = recorder.result()
    assert amax["0"] == 7.0
    assert amax["2"] == pytest.approx(float(torch.cat(hidden).abs().max()))
    with torch.no_grad():
        model(torch.full((1, 4), 100.0))
    assert recorder.result() == amax  # removed hooks record nothing


@pytest.mark.slow
def test_calibration_is_deterministic_and_cached(tiny_checkpoint, tmp_path):
    from export.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(tiny_checkpoint)
    geometry = checkpoint.geometry()
    settings = CalibrationSettings(prompts=2, steps=2)
    logs = []
    first = calibrate(checkpoint, geometry, TINY_SHAPES, settings, cache_dir=tmp_path, log=logs.append)
    assert first["reused"] is False and first["transformer_calls"] == 2 * 2
    # every linear of the transformer and of the text encoder's language model was seen
    assert len(first["transformer"]) == 39 and len(first["text_encoder"]) == 8 * 7
    assert all(value > 0 for value in first["transformer"].values())
    path = cache_path(first["key"], tmp_path)
    assert path.is_file() and str(path) in logs[-1]

    again = calibrate(checkpoint, geometry, TINY_SHAPES, settings, cache_dir=tmp_path)
    assert again["reused"] is True and again["transformer"] == first["transformer"]

    path.unlink()  # recomputed from scratch: same seeds, same amax
    fresh = calibrate(checkpoint, geometry, TINY_SHAPES, settings, cache_dir=tmp_path)
    assert fresh["reused"] is False and fresh["transformer"] == first["transformer"]

    other = calibrate(checkpoint, geometry, TINY_SHAPES, CalibrationSettings(prompts=2, steps=3), cache_dir=tmp_path)
    assert other["key"] != first["key"] and other["transformer_calls"] == 2 * 3
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 2

    path.write_text(json.dumps({"key": "something else"}))  # a file that does not match is not trusted
    assert calibrate(checkpoint, geometry, TINY_SHAPES, settings, cache_dir=tmp_path)["reused"] is False


@pytest.mark.parametrize(
    "settings, message",
    [
        (CalibrationSettings(prompts=0), "--calib-prompts 0"),
        (CalibrationSettings(prompts=10_000), "--calib-prompts 10000"),
        (CalibrationSettings(steps=0), "--calib-steps 0"),
        (CalibrationSettings(device="tpu"), "--calib-device 'tpu'"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(UsageError, match=message):
        settings.validate(len(load_prompts()))


def _export(out, *extra):
    return run_cli(
        "-m", "export", "--model", "tiny", "--out", str(out), "--height", "64", "--width", "64",
        "--max-sequence-length", "32", *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra, needles",
    [
        (("--calib-steps", "2"), ("--calib-steps", "--precision fp8", "fp32")),
        (("--precision", "fp8", "--calib-prompts", "0"), ("--calib-prompts 0", "between 1 and")),
        (("--precision", "fp8", "--text-encoder-precision", "fp4"), ("--text-encoder-precision 'fp4'",)),
        (
            ("--precision", "fp8", "--components", "transformer", "--calib-prompts", "1", "--calib-steps", "1",
             "--fp8-exclude", "proj_out,trnsformer_blocks.*"),
            ("'trnsformer_blocks.*'", "matches no linear layer of the transformer", "transformer_blocks."),
        ),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_fp8_usage_errors_are_one_line(tmp_path, extra, needles):
    out = tmp_path / "out"
    result = _export(out, *extra)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fp8_options_from_the_command_line():
    from common.cli import OneLineParser
    from export.fp8.rewrite import DEFAULT_TRANSFORMER_EXCLUDE
    from export.fp8.run import Fp8Options, add_arguments, options_from_args

    parser = OneLineParser()
    add_arguments(parser)
    assert options_from_args(parser.parse_args([]), "fp8") == Fp8Options()
    assert options_from_args(parser.parse_args([]), "bf16") is None
    options = options_from_args(
        parser.parse_args(["--fp8-exclude", "none", "--calib-steps", "3", "--text-encoder-precision", "fp8"]), "fp8"
    )
    assert options.exclude == () and options.calibration.steps == 3 and options.calibration.prompts == 32
    assert options.component_precision("text_encoder") == "fp8" and options.component_precision("vae") == "bf16"
    options = options_from_args(parser.parse_args(["--fp8-exclude", "proj_out, x_embedder"]), "fp8")
    assert options.exclude == ("proj_out", "x_embedder") != DEFAULT_TRANSFORMER_EXCLUDE
    # the cache key of a component changes with what decides its graph, and only then
    assert Fp8Options().key_payload("transformer") != options.key_payload("transformer")
    assert Fp8Options().key_payload("vae") == options.key_payload("vae")
