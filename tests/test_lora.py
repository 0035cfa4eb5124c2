"""LoRA: files read through diffusers' converters, baked at export, fed into slots at run time (docs/lora.md).

The reference is diffusers itself: `load_lora_weights` + `set_adapters(names, scales)`, unfused, on the
same checkpoint, files written in the kohya and the diffusers/peft layouts (flux2_tiny.lora_files).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.errors import UsageError
from common.lora import parse_lora_request, read_lora, slot_arrays
from tests.support import SMALL, assert_one_line_error, rtx_copy, run_cli

MIN_PSNR_DB = 45.0  # issue 23: each image equals diffusers' with the same LoRAs
PROMPT, SEED, STEPS, GUIDANCE = "a lighthouse on a cliff", 3, 3, 3.0


@pytest.fixture(scope="session")
def diffusers_images(tiny_checkpoint, lora_files):
    """diffusers' float32 image with adapters {name: scale}, the kohya file's as `baked` (at 0.8 in every image)."""
    import torch

    from common.reference_pipeline import reference_pipeline
    from export.checkpoint import open_checkpoint

    layers = tuple(open_checkpoint(tiny_checkpoint).geometry().text_out_layers)
    pipe = reference_pipeline(tiny_checkpoint, device="cpu")
    for name in ("kohya", "peft"):
        pipe.load_lora_weights(str(lora_files[name]), adapter_name=name)
    pipe.load_lora_weights(str(lora_files["kohya"]), adapter_name="baked")

    def draw(**scales) -> np.ndarray:
        adapters = {"baked": 0.8, **scales}
        pipe.set_adapters(list(adapters), list(adapters.values()))
        return pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
                    text_encoder_out_layers=layers, output_type="np", **SMALL).images[0]  # fmt: skip

    return draw


def _ours(artifacts: Path, loras) -> np.ndarray:
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling

    opened = open_artifacts(artifacts)
    runtime = Flux2Runtime(opened, OrtBackend(opened.folder, opened.manifest))
    runtime.use_loras(loras)
    return next(runtime.generate(Sampling(PROMPT, SEED, STEPS, GUIDANCE), progress=False))[1]


# --- files ----------------------------------------------------------------------------------


def test_a_request_reads_file_and_scale():
    assert parse_lora_request("/a/b.safetensors:0.8").scale == 0.8
    assert parse_lora_request("/a/b.safetensors").scale == 1.0
    assert parse_lora_request("c:/x/b.safetensors").path.name == "b.safetensors"  # a ':' before the last '/'
    for bad in ("/a/b.safetensors:nan", "/a/b.safetensors:inf", "/a/b.safetensors:-inf"):
        with pytest.raises(UsageError, match="not a finite number"):
            parse_lora_request(bad)
    with pytest.raises(UsageError, match="'x' is not a number"):
        parse_lora_request("/a/b.safetensors:x")


def test_both_layouts_read_as_peft_scales_them(lora_files, tiny_checkpoint):
    """kohya's alpha/r and peft's lora_alpha/r end up in A: B A equals diffusers' own layers' delta."""
    import torch

    from common.lora import load_into_pipeline
    from common.reference_pipeline import reference_pipeline

    kohya, peft = read_lora(lora_files["kohya"]), read_lora(lora_files["peft"])
    assert (kohya.format, peft.format) == ("kohya", "diffusers")
    assert len(kohya.layers) == len(peft.layers) == 28  # 1 double block x 10 linears + 9 single blocks x 2
    pipe = reference_pipeline(tiny_checkpoint, device="cpu")
    pipe.load_lora_weights(str(lora_files["peft"]), adapter_name="p")
    pipe.set_adapters(["p"], [0.7])
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    x = torch.randn(3, layer.in_features)
    base = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    expected = base + 0.7 * torch.nn.functional.linear(x, peft.delta("transformer_blocks.0.attn.to_q"))
    assert torch.allclose(layer(x), expected, atol=1e-6)
    load_into_pipeline(pipe, ((kohya, 0.5),))  # replaces "p"
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    expected = base + 0.5 * torch.nn.functional.linear(x, kohya.delta("transformer_blocks.0.attn.to_q"))
    assert list(pipe.transformer.peft_config) == ["flux2_trt_0"]
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_loras_stack_along_the_rank(lora_files):
    kohya, peft = read_lora(lora_files["kohya"]), read_lora(lora_files["peft"])
    module = "transformer_blocks.0.attn.to_q"
    in_features, out_features = kohya.layers[module][0].shape[1], kohya.layers[module][1].shape[0]
    targets = ((module, in_features, out_features),)
    arrays = slot_arrays(((kohya, 0.5), (peft, 2.0)), targets, 8)
    a, b = arrays[f"lora_a.{module}"], arrays[f"lora_b.{module}"]
    assert a.shape == (8, targets[0][1]) and b.shape == (targets[0][2], 8)
    expected = 0.5 * kohya.delta(module).numpy() + 2.0 * peft.delta(module).numpy()
    assert np.abs(b @ a - expected).max() <= 1e-6 * np.abs(expected).max()
    with pytest.raises(UsageError, match="need rank 8 at transformer_blocks.0.attn.to_q, past .* rank 6"):
        slot_arrays(((kohya, 0.5), (peft, 2.0)), targets, 6)


def test_a_damaged_file_is_refused_in_one_line(lora_files, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lora_files["peft"].read_bytes()[:-100])
    with pytest.raises(UsageError, match=f"LoRA {cut} is damaged or truncated"):
        read_lora(cut)
    with pytest.raises(UsageError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")


def test_export_refuses_a_lora_for_another_model(lora_files, tmp_path):
    """A LoRA whose layers do not fit the checkpoint (here: one trained on a 16-wider model) is one line, nothing written."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora_files["kohya"]))
    key = next(k for k in tensors if k.endswith("img_attn_proj.lora_down.weight"))
    tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 16)
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other))
    out = tmp_path / "out"
    result = run_cli(
        "-m", "export", "--model", "tiny", "--out", str(out), "--lora", f"{other}:0.8", "--components", "transformer"
    )
    assert_one_line_error(result, str(other), "made for another model", "transformer_blocks.0.attn.to_out.0")
    assert not out.exists()


# --- baked and slots, against diffusers -----------------------------------------------------


def test_baked_lora_draws_what_diffusers_draws_with_it(lora_tiny, diffusers_images, lora_files):
    from common.manifest import read_manifest
    from common.metrics import psnr

    manifest = read_manifest(lora_tiny)
    (record,) = manifest.loras
    assert (record["format"], record["scale"], len(record["layers_touched"])) == ("kohya", 0.8, 28)
    theirs = diffusers_images()
    assert psnr(_ours(lora_tiny, ()), theirs) >= MIN_PSNR_DB
    assert psnr(theirs, diffusers_images(baked=0.0)) < 35  # the LoRA is visible: this test can fail


def test_slots_draw_each_lora_set_from_the_same_artifacts(lora_tiny, diffusers_images, lora_files):
    from common.metrics import psnr

    kohya, peft = read_lora(lora_files["kohya"]), read_lora(lora_files["peft"])
    one = _ours(lora_tiny, ((peft, 0.7),))
    assert psnr(one, diffusers_images(peft=0.7)) >= MIN_PSNR_DB
    both = _ours(lora_tiny, ((kohya, 0.5), (peft, 0.5)))
    assert psnr(both, diffusers_images(kohya=0.5, peft=0.5)) >= MIN_PSNR_DB
    assert psnr(both, one) < 35


def test_generate_refuses_what_the_slots_cannot_take(lora_tiny, lora_files, tmp_path):
    base = ("-m", "runtime.generate", "--artifacts", str(lora_tiny), "--prompt", "a fox", "--steps", "1")
    out = tmp_path / "out"
    result = run_cli(*base, "--out", str(out), "--lora", str(lora_files["rank16"]))
    assert_one_line_error(
        result, "rank16.safetensors (rank 16)", "past the artifacts' LoRA slots of rank 8", "--lora-rank 16"
    )
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lora_files["peft"].read_bytes()[:-64])
    result = run_cli(*base, "--out", str(out), "--lora", f"{cut}:0.5")
    assert_one_line_error(result, str(cut), "damaged or truncated")
    result = run_cli(*base, "--out", str(out), "--lora", f"{lora_files['peft']}:nan")
    assert_one_line_error(result, "not a finite number")
    assert not out.exists()


def test_generate_writes_the_loras_in_the_sidecar(lora_tiny, lora_files, tmp_path):
    out = tmp_path / "out"
    result = run_cli("-m", "runtime.generate", "--artifacts", str(lora_tiny), "--prompt", "a fox", "--steps", "1",
                     "--out", str(out), "--lora", f"{lora_files['peft']}:0.7", "--backend", "ort")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (sidecar,) = out.glob("*.json")
    (record,) = json.loads(sidecar.read_text())["loras"]
    assert (record["format"], record["scale"], record["ranks"]) == ("diffusers", 0.7, [4])
    assert record["sha256"] == read_lora(lora_files["peft"]).sha256


def test_lora_on_artifacts_without_slots_is_refused(export_tiny, lora_files, tmp_path):
    out = tmp_path / "out"
    result = run_cli("-m", "runtime.generate", "--artifacts", str(export_tiny("fp32")), "--prompt", "a fox",
                     "--out", str(out), "--lora", str(lora_files["peft"]))  # fmt: skip
    assert_one_line_error(result, "have no LoRA slots", "--lora-rank R")
    assert not out.exists()


def test_tensorrt_rtx_builds_the_slots_as_inputs(lora_tiny, tmp_path):
    """The real TensorRT-RTX parser takes every slot as a network input of its shape, and the builder builds it."""
    from common.specs import component_specs
    from engines.build import build_engines
    from runtime.artifacts import open_artifacts

    folder = rtx_copy(lora_tiny, tmp_path)
    import tensorrt_rtx as trt

    opened = open_artifacts(folder)
    slots = {
        t.name: t.shape
        for t in component_specs(opened.geometry, opened.shapes)["transformer"].inputs
        if t.name.startswith("lora_")
    }
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(folder / "transformer.onnx"))
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    assert len(slots) == 56 and {name: inputs.get(name) for name in slots} == slots
    manifest = build_engines(artifacts=folder, target="rtx", log=lambda m: None)
    recorded = {t.name for t in manifest.engines["transformer"].inputs}
    assert set(slots) <= recorded


# --- served: a model's --lora-dir (deploy/loras.py; the real server in test_deploy_server.py) ------


def test_a_served_lora_folder_reads_each_file_once_and_again_when_replaced(lora_tiny, lora_files, tmp_path):
    import shutil

    from deploy.loras import LoraFolder, same_loras
    from deploy.request import BadRequest
    from deploy.triton import check_lora_dir
    from runtime.artifacts import open_artifacts

    opened = open_artifacts(lora_tiny)
    folder = tmp_path / "loras"
    folder.mkdir()
    with pytest.raises(UsageError, match=f"--lora-dir {folder / 'no'} is not a folder"):
        check_lora_dir(folder / "no", opened.folder, opened.shapes)
    for name in ("peft", "rank16"):
        shutil.copy2(lora_files[name], folder / f"{name}.safetensors")
    served = LoraFolder(check_lora_dir(folder, opened.folder, opened.shapes), artifacts_folder=opened.folder,
                        shapes=opened.shapes)  # fmt: skip
    ((first, scale),) = served.open((("peft", 0.7),))
    assert (first.format, scale) == ("diffusers", 0.7)
    assert same_loras(served.open((("peft", 0.7),)), ((first, 0.7),))  # read once: the same object
    assert not same_loras(served.open((("peft", 0.5),)), ((first, 0.7),))
    with pytest.raises(
        BadRequest, match=r"^loras: no LoRA named 'pef' in this model's --lora-dir; it holds: peft, rank16$"
    ):
        served.open((("pef", 1.0),))
    with pytest.raises(BadRequest, match=r"^loras: LoRA rank16.safetensors \(rank 16\) need rank 16 .* rank 8"):
        served.open((("rank16", 1.0),))
    shutil.copyfile(lora_files["kohya"], folder / "peft.safetensors")  # replaced in place: read again
    ((again, _),) = served.open((("peft", 0.7),))
    assert again is not first and again.format == "kohya" and again.sha256 == read_lora(lora_files["kohya"]).sha256
    (folder / "peft.safetensors").unlink()
    with pytest.raises(BadRequest, match="it holds: rank16$"):
        served.open((("peft", 0.7),))
