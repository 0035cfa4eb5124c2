"""Export of the tiny FLUX.2 [klein] checkpoints: per precision, at batch 2 for CFG, and a klein variant."""

import json

import onnx
import pytest

from common.manifest import read_manifest
from tests.support import SMALL, run_cli

BOUNDS = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}
SIZE_ARGS = ["--height", str(SMALL["height"]), "--width", str(SMALL["width"])]
SIZE_ARGS += ["--max-sequence-length", str(SMALL["max_sequence_length"])]


def _check_report(out, precision, components=("text_encoder", "transformer", "vae")):
    report = json.loads((out / "reports" / "export_check.json").read_text())["components"]
    assert sorted(report) == sorted(components)
    for component, entry in report.items():
        (metrics,) = entry["outputs"].values()
        assert entry["passed"] is True, (component, entry)
        assert metrics["rel_l2"] <= BOUNDS[precision], (component, metrics)


@pytest.mark.slow
def test_tiny_klein_exports_from_the_command_line(tmp_path):
    out = tmp_path / "klein-fp32"
    result = run_cli("-m", "export", "--model", "tiny-klein", "--out", str(out), *SIZE_ARGS)
    assert result.returncode == 0, result.stderr
    _check_report(out, "fp32")
    manifest = read_manifest(out)
    geometry = manifest.geometry
    assert geometry.pipeline_class == "Flux2KleinPipeline"
    assert geometry.is_distilled is False and geometry.guidance_embeds is False
    assert geometry.text_out_layers == (3, 5, 7)
    transformer = manifest.components["transformer"]
    assert [t.name for t in transformer.inputs] == ["hidden_states", "encoder_hidden_states", "timestep"]
    assert [i.name for i in onnx.load(str(out / "transformer.onnx"), load_external_data=False).graph.input] == [
        "hidden_states",
        "encoder_hidden_states",
        "timestep",
    ]
    # 3 layers x 48 wide Qwen3 hidden states; the tokenizer travels with its Qwen3-style template
    assert manifest.components["text_encoder"].outputs[0].shape == (1, SMALL["max_sequence_length"], 144)
    assert "enable_thinking" in (out / "tokenizer" / "chat_template.jinja").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16"])  # fp16: the klein variant below
def test_tiny_klein_exports_at_reduced_precision(export_klein, precision):
    _check_report(export_klein("base", precision), precision)


@pytest.mark.slow
def test_distilled_transformer_at_batch_2_verifies(tmp_path):
    """A batch-2 transformer runs a CFG step (prompt, negative prompt) in one call."""
    out = tmp_path / "klein-b2"
    result = run_cli(
        "-m", "export", "--model", "tiny-klein-distilled", "--out", str(out), *SIZE_ARGS,
        "--batch-size", "2", "--components", "transformer",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _check_report(out, "fp32", components=("transformer",))
    manifest = read_manifest(out)
    assert manifest.geometry.is_distilled is True
    assert manifest.shapes.batch_size == 2
    tokens = (SMALL["height"] // 16) * (SMALL["width"] // 16)
    assert manifest.components["transformer"].inputs[0].shape == (2, tokens, 32)
    assert manifest.components["transformer"].outputs[0].shape == (2, tokens, 32)


def test_reference_batch_rows_differ(tiny_klein_checkpoint, small_shapes):
    """Row 1 of a batch is the empty negative prompt, so a graph that mixed rows would fail its check."""
    import dataclasses

    from export.checkpoint import open_checkpoint
    from export.verify.reference import ReferenceInputs

    checkpoint = open_checkpoint(tiny_klein_checkpoint)
    shapes = dataclasses.replace(small_shapes, batch_size=2)
    ids, mask = ReferenceInputs(checkpoint, checkpoint.geometry(), shapes).token_inputs()
    assert ids.shape == (2, small_shapes.max_sequence_length)
    assert mask[0].sum() > mask[1].sum() > 0


def test_batch_size_must_be_positive(tmp_path):
    result = run_cli("-m", "export", "--model", "tiny-klein", "--out", str(tmp_path / "o"), "--batch-size", "0")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--batch-size 0" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_other_klein_configuration_exports_and_verifies(tmp_path):
    """Untied embeddings (as Qwen3-8B in klein 9B), other widths and layers: nothing tied to the preset."""
    checkpoint = tmp_path / "klein-variant"
    made = run_cli(
        "-m", "flux2_tiny", "--model", "tiny-klein-distilled", "--out", str(checkpoint),
        "--set", "text_hidden_size=40", "--set", "text_num_heads=5", "--set", "text_num_kv_heads=1",
        "--set", "text_head_dim=8", "--set", "text_num_layers=6", "--set", "text_out_layers=1,2,4,5",
        "--set", "tie_word_embeddings=false", "--set", "num_single_layers=1", "--set", "latent_channels=4",
        "--set", "vae_block_out_channels=8,16,16",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    model_index = json.loads((checkpoint / "model_index.json").read_text())
    assert model_index["is_distilled"] is True
    assert model_index["_flux2_trt_text_encoder_out_layers"] == [1, 2, 4, 5]
    out = tmp_path / "artifacts"
    result = run_cli(
        "-m", "export", "--model", str(checkpoint), "--out", str(out), "--precision", "fp16",
        "--height", "192", "--width", "320", "--max-sequence-length", "80",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _check_report(out, "fp16")
    manifest = read_manifest(out)
    # 4 layers x 40 hidden; 4x VAE (3 blocks) -> 8 pixels per token: 24 x 40 tokens of 4 x 4 channels
    assert manifest.components["text_encoder"].outputs[0].shape == (1, 80, 160)
    assert manifest.components["transformer"].inputs[1].shape == (1, 80, 160)
    assert manifest.components["transformer"].inputs[0].shape == (1, 24 * 40, 16)
    assert manifest.geometry.is_distilled is True
