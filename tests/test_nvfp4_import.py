"""`python -m export --precision nvfp4 --transformer-weights FILE`: the published NVFP4 layout, imported as it is."""

import json

import numpy as np
import onnx
import pytest

from common import nvfp4
from common.external_data import TensorReader
from tests.support import run_cli

pytest.importorskip("comfy_kitchen")


def _state_dict(checkpoint):
    from safetensors.torch import load_file

    state = {}
    for file in sorted((checkpoint / "transformer").glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.fixture(scope="module")
def published(tiny_checkpoint, tmp_path_factory):
    """The tiny default's transformer written by comfy-kitchen as the published plain and mixed files."""
    from flux2_tiny.nvfp4_file import write_published_nvfp4

    folder = tmp_path_factory.mktemp("published")
    files = {}
    for variant in ("plain", "mixed"):
        files[variant] = folder / f"flux2-tiny-nvfp4-{variant}.safetensors"
        write_published_nvfp4(_state_dict(tiny_checkpoint), files[variant], variant=variant, activation_amax=12.0)
    return files


@pytest.fixture(scope="module")
def imported(published, tiny_checkpoint, small_shapes, tmp_path_factory):
    """{variant: artifacts}: whole folders; the mixed one starts as a copy of the plain one, so only its
    transformer is exported again (the text encoder and VAE are reused by their cache keys)."""
    import shutil

    from export.fp8.calibrate import CalibrationSettings
    from export.fp8.run import Fp8Options
    from export.run import export_artifacts

    fast = Fp8Options(precision="nvfp4", calibration=CalibrationSettings(prompts=2, steps=2))
    done = {}
    for variant in ("plain", "mixed"):
        out = tmp_path_factory.mktemp(f"imported-{variant}") / "tiny"
        if done:
            shutil.copytree(done["plain"], out)
        export_artifacts(model=str(tiny_checkpoint), out=out, precision="nvfp4", shapes=small_shapes, fp8=fast,
                         transformer_weights=published[variant], log=lambda m: None)  # fmt: skip
        done[variant] = out
    return done


def _graph_weights(artifacts):
    """{module path: float32 weight} of every FP4 weight in the transformer graph, dequantized as ONNX does."""
    model = onnx.load(str(artifacts / "transformer.onnx"), load_external_data=False)
    tensors = {t.name: t for t in model.graph.initializer}
    reader = TensorReader(artifacts)
    weights = {}
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT4E2M1:
            continue
        path = tensor.name.removesuffix(".weight_fp4")
        rows, columns = tensor.dims
        codes = reader.packed(tensor).reshape(rows, columns // 2)
        scales = reader.array(tensors[f"{path}.weight_block_scales"])
        global_scale = np.float32(reader.array(tensors[f"{path}.weight_global_scale"]))
        weights[path] = nvfp4.dequantize(nvfp4.Nvfp4Tensor(codes, scales, global_scale))
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "mixed"])
def test_every_imported_weight_is_comfy_kitchens_dequantization_of_the_file_bit_for_bit(
    variant, imported, published, tiny_checkpoint
):
    from export.nvfp4.published import read_published
    from tests.test_nvfp4_published import comfy_kitchen_reference

    config = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    in_file = {name.removesuffix(".weight") for name in read_published(published[variant], config).nvfp4_names}
    reference = comfy_kitchen_reference(published[variant])  # comfy-kitchen's own dequantization, float32
    weights = _graph_weights(imported[variant])
    assert (
        set(weights) == in_file and len(weights) == {"plain": 20, "mixed": 12}[variant]
    )  # plain: 16 file layers, fused qkv split in 3
    for path, weight in weights.items():
        expected = reference[f"{path}.weight"].float().numpy()
        assert np.array_equal(weight.view(np.uint32), expected.view(np.uint32)), path
    layers = json.loads((imported[variant] / "reports" / "nvfp4_layers.json").read_text())["transformer"]
    assert layers["counts"]["nvfp4"] == len(weights)
    assert layers["calibration"]["imported"] == str(published[variant])


@pytest.mark.slow
def test_static_input_scales_are_the_files_and_the_missing_ones_calibrated(imported, published):
    from safetensors import safe_open

    for variant in ("plain", "mixed"):
        layers = json.loads((imported[variant] / "reports" / "nvfp4_layers.json").read_text())["transformer"]["layers"]
        with safe_open(str(published[variant]), framework="np") as handle:
            keys = set(handle.keys())
            statics = {
                k.removesuffix(".input_scale"): float(handle.get_tensor(k)) for k in keys if k.endswith("input_scale")
            }
        quantized = [layer for layer in layers if layer["precision"] == "nvfp4"]
        calibrated = [layer for layer in quantized if "calibrated" in layer["reason"]]
        if variant == "plain":
            assert not calibrated and {layer["input_scale"] for layer in quantized} == set(
                statics.values()
            )  # qkv share one
        else:  # the mixed file has no input_scale on the text MLPs
            assert calibrated and all(".ff_context." in layer["path"] for layer in calibrated), calibrated
            assert all(layer["input_scale"] == pytest.approx(layer["input_amax"] / 2688) for layer in calibrated)


@pytest.mark.slow
def test_the_imported_folder_builds_with_tensorrt_rtx(imported, tmp_path):
    import shutil

    artifacts = shutil.copytree(imported["mixed"], tmp_path / "artifacts")
    built = run_cli("-m", "engines.build", "--artifacts", str(artifacts), "--target", "rtx")
    assert built.returncode == 0, built.stderr
    assert list((artifacts / "engines").rglob("transformer*.plan"))


def test_an_nvfp4_file_needs_precision_nvfp4_and_a_wrong_path_is_one_line(published, tmp_path):
    for precision, weights, wanted in (
        ("bf16", published["plain"], "export it with --precision nvfp4, not bf16"),
        ("nvfp4", tmp_path / "missing.safetensors", "does not exist"),
    ):
        out = tmp_path / f"out-{precision}"
        result = run_cli("-m", "export", "--model", "tiny", "--out", str(out), "--precision", precision,
                         "--transformer-weights", str(weights), "--components", "transformer")  # fmt: skip
        assert result.returncode == 2 and wanted in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_file_made_for_another_model_is_refused_naming_the_tensor(tmp_path):
    """A [dev] file of other dimensions (the suite's variant checkpoint) against the tiny default's folder."""
    import dataclasses

    from flux2_tiny import ensure_tiny_checkpoint
    from flux2_tiny.config import DEFAULT
    from flux2_tiny.nvfp4_file import write_published_nvfp4

    config = dataclasses.replace(DEFAULT, num_attention_heads=3, attention_head_dim=16)
    other = ensure_tiny_checkpoint(config, cache_dir=tmp_path / "cache")
    weights = tmp_path / "other-nvfp4.safetensors"
    write_published_nvfp4(_state_dict(other), weights, variant="plain", activation_amax=12.0)
    out = tmp_path / "out"
    result = run_cli("-m", "export", "--model", "tiny", "--out", str(out), "--precision", "nvfp4",
                     "--transformer-weights", str(weights), "--components", "transformer")  # fmt: skip
    assert result.returncode == 2 and "transformer weights" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def _file_math_image(checkpoint, weights, artifacts, *, seed, steps, prompt, swap=False):
    """diffusers' float32 pipeline running the file's own math: its dequantized weights (comfy-kitchen's
    layout read by export.nvfp4.published), activations quantized as ComfyUI does (the file's static
    input_scale, else the call's own amax / 2688). `swap` reads the nibbles the other way round."""
    import torch

    from common.reference_pipeline import reference_pipeline
    from export.nvfp4.published import read_published, swap_nibbles
    from export.nvfp4.reference import LayerQuant, apply_nvfp4

    manifest = json.loads((artifacts / "manifest.json").read_text())
    shapes, geometry = manifest["shapes"], manifest["geometry"]
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    pipe = reference_pipeline(checkpoint, dtype="float32")
    state, layers = {}, {}
    for tensor in read_published(weights, config).tensors():
        if not tensor.is_nvfp4:
            state[tensor.name] = tensor.value.float()
            continue
        value = tensor.value
        if swap:
            value = nvfp4.Nvfp4Tensor(swap_nibbles(value.codes), value.block_scales, value.global_scale)
        state[tensor.name] = torch.from_numpy(nvfp4.dequantize(value))
        scale = None if tensor.input_scale is None else float(tensor.input_scale)
        layers[tensor.name.removesuffix(".weight")] = LayerQuant(value, scale)
    pipe.transformer.load_state_dict(state)
    with torch.no_grad(), apply_nvfp4(pipe.transformer, layers):
        image = pipe(prompt=prompt, height=shapes["height"], width=shapes["width"], num_inference_steps=steps,
                     guidance_scale=4.0, max_sequence_length=shapes["max_sequence_length"],
                     text_encoder_out_layers=tuple(geometry["text_out_layers"]), output_type="np",
                     generator=torch.Generator().manual_seed(seed)).images[0]  # fmt: skip
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "mixed"])
def test_runtime_generate_on_the_cpu_draws_the_files_own_w4a4_math(
    variant, imported, published, tiny_checkpoint, tmp_path
):
    """>= 40 dB against diffusers running the file's math; the same reference with the nibbles swapped
    lands far below, so a layout error cannot pass. Measured here (256^2, 4 steps): plain 43.2 dB (23.3 dB
    swapped), mixed 42.4 dB (25.9 dB swapped); the mixed file's text MLPs have no input_scale, which the graph calibrates
    (TensorRT needs a constant) where ComfyUI computes it per call."""
    from PIL import Image

    from common.metrics import psnr

    out = tmp_path / "images"
    result = run_cli("-m", "runtime.generate", "--artifacts", str(imported[variant]), "--backend", "ort", "--prompt",
                     "a red fox", "--steps", "4", "--seed", "3", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    (png,) = out.glob("*.png")
    ours = np.asarray(Image.open(png))
    assert json.loads(png.with_suffix(".json").read_text())["guidance"] == 4.0
    files = dict(checkpoint=tiny_checkpoint, weights=published[variant], artifacts=imported[variant], seed=3, steps=4,
                 prompt="a red fox")  # fmt: skip
    good = psnr(ours / 255.0, _file_math_image(**files) / 255.0)
    swapped = psnr(ours / 255.0, _file_math_image(**files, swap=True) / 255.0)
    assert good >= 40.0 and swapped < good - 10, (good, swapped)


@pytest.mark.slow
def test_a_plain_bf16_single_file_exports_the_same_graph_bytes_as_the_folder(tiny_checkpoint, small_shapes, tmp_path):
    """The folder's own transformer as a BFL-named bf16 single file: the bf16 graph's weights are byte-identical."""
    from safetensors.torch import save_file

    from export.run import export_artifacts
    from flux2_tiny.nvfp4_file import bfl_state_dict

    single = tmp_path / "flux2-tiny-bf16.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_state_dict(_state_dict(tiny_checkpoint)).items()}, str(single))
    data = {}
    for name, weights in (("folder", None), ("file", single)):
        out = tmp_path / name
        export_artifacts(model=str(tiny_checkpoint), out=out, precision="bf16", shapes=small_shapes,
                         components=("transformer",), skip_check=True, transformer_weights=weights,
                         log=lambda m: None)  # fmt: skip
        data[name] = (out / "transformer.onnx.data").read_bytes()
    assert data["file"] == data["folder"] and len(data["file"]) > 100_000
