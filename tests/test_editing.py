"""Image editing: K reference images exported at fixed shapes, run, and compared with diffusers given the same images."""

import json
import shutil

import numpy as np
import pytest
import torch

from tests.support import VARIANT, assert_one_line_error, run_cli

# Small shapes: 128 x 128 output, 128 prompt tokens (room past the tiny [dev] chat template's 111), 2 steps.
SHAPES = {"height": 128, "width": 128, "max_sequence_length": 128}
STEPS = 2
# Never seen by other tests: the dev variant with another seed (its VAE is 4x, so 8-pixel tokens).
DEV_VARIANT = tuple(pair for pair in VARIANT if not pair.startswith("seed=")) + ("seed=23",)


def _smooth_png(path, height, width, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    waves = np.sin(2 * np.pi * (rng.uniform(0.5, 3) * y + rng.uniform(0.5, 3) * x + rng.uniform(0, 1, size=3)))
    Image.fromarray((127 + 120 * waves).clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference-images")
    return {
        "128": _smooth_png(root / "a.png", 128, 128, 1),
        "96x128": _smooth_png(root / "b.png", 96, 128, 2),
        "200x150": _smooth_png(root / "c.png", 200, 150, 3),
    }


@pytest.fixture(scope="module")
def editing(tmp_path_factory):
    """Editing artifacts by name; K=2 is exported into a copy of K=1's folder, reusing its text encoder and VAE."""
    from export.run import export_artifacts

    made = {}
    root = tmp_path_factory.mktemp("editing")

    def checkpoint(name):
        folder = root / f"checkpoint-{name}"
        if not folder.exists():
            base = ["--model", "tiny-klein"] if name == "klein" else []
            pairs = DEV_VARIANT if name == "dev" else ("seed=29",)
            result = run_cli("-m", "flux2_tiny", *base, "--out", str(folder), *[a for p in pairs for a in ("--set", p)])
            assert result.returncode == 0, result.stderr
        return folder

    def get(name):
        if name not in made:
            family, k = name.split("-k")
            out = root / name
            extra = {}
            if name == "dev-k2":
                shutil.copytree(get("dev-k1"), out)
                extra = {"reference_height": 96, "reference_width": 128}
            from common.specs import Shapes

            tokens = {"max_sequence_length": 64} if family == "klein" else {}  # [klein]'s template: 20 tokens
            shapes = Shapes(**{**SHAPES, **tokens}, reference_images=int(k), **extra)
            # The numerics check runs per component in runtime.check below, against diffusers itself.
            export_artifacts(model=str(checkpoint(family)), out=out, shapes=shapes, skip_check=True, log=lambda m: None)
            made[name] = out
        return made[name]

    return get


def test_specs_record_references_and_leave_text_to_image_alone():
    from common.specs import Geometry, Shapes, component_specs

    geometry = Geometry("Flux2Pipeline", 64, (1, 2, 3), 3, 128, 128, 192, True, 32, 8)
    plain = component_specs(geometry, Shapes(**SHAPES))
    assert set(plain) == {"text_encoder", "transformer", "vae"}
    assert [t.name for t in plain["transformer"].inputs] == [
        "hidden_states", "encoder_hidden_states", "timestep", "guidance"
    ]  # fmt: skip
    assert Shapes(**SHAPES).to_json() == {**SHAPES, "batch_size": 1}  # text-to-image manifests as before
    two = component_specs(geometry, Shapes(**SHAPES, batch_size=2, reference_images=2, reference_height=96))
    assert two["transformer"].inputs[1].name == "reference_latents"
    assert two["transformer"].inputs[1].shape == (2, 2 * 6 * 8, 128)  # K x (96/16) x (128/16) tokens per row
    assert two["transformer"].outputs[0].shape == (2, 64, 128)  # only the noisy latents' velocity
    assert two["vae_encoder"].inputs[0].shape == (2, 3, 96, 128)
    assert two["vae_encoder"].outputs[0].shape == (2, 48, 128)


def test_reference_position_ids_are_diffusers():
    from diffusers import Flux2Pipeline

    from common.specs import Geometry, Shapes
    from export.graphs.transformer import reference_position_ids

    geometry = Geometry("Flux2Pipeline", 64, (1, 2, 3), 3, 128, 128, 192, True, 32, 8)
    shapes = Shapes(**SHAPES, reference_images=3, reference_height=64, reference_width=96)
    expected = Flux2Pipeline._prepare_image_ids([torch.zeros(1, 128, 4, 6)] * 3)[0]
    assert torch.equal(reference_position_ids(geometry, shapes), expected)
    assert expected[:, 0].unique().tolist() == [10, 20, 30]


@pytest.mark.parametrize(
    "size, exported, fitted",
    [((128, 128), (128, 128), False), ((100, 150), (96, 144), False), ((1100, 1000), (1072, 976), False),
     ((200, 150), (96, 128), True), ((60, 300), (128, 128), True)],
)  # fmt: skip
def test_images_are_prepared_as_diffusers_prepares_them(tmp_path, size, exported, fitted):
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    from PIL import Image

    from runtime.reference_images import load_references

    path = _smooth_png(tmp_path / "image.png", *size, seed=7)
    ours, prepared = load_references([path], count=1, size=exported)
    image = Image.open(path).convert("RGB")
    processor = Flux2ImageProcessor(vae_scale_factor=16)
    if not fitted:  # Flux2Pipeline.__call__'s own steps
        if image.width * image.height > 1024 * 1024:
            image = processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.width // 16 * 16, image.height // 16 * 16
        assert (height, width) == exported
    else:  # diffusers' resize_mode="crop" fit (VaeImageProcessor's), then the pipeline sees the exported size
        image = VaeImageProcessor._resize_and_crop(processor, image, exported[1], exported[0])
    expected = processor.preprocess(image, height=exported[0], width=exported[1], resize_mode="crop").numpy()
    assert prepared[0].fitted is fitted
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.slow
def test_dev_one_and_two_references_match_diffusers(editing, images):
    from common.metrics import psnr
    from runtime.check import run_check

    lines = []
    one = run_check(artifacts=editing("dev-k1"), backend="ort", steps=STEPS, images=[images["128"]], log=lines.append)
    two = run_check(artifacts=editing("dev-k2"), backend="ort", steps=STEPS,
                    images=[images["96x128"], images["200x150"]], log=lines.append)  # fmt: skip
    for report in (one, two):
        assert report["passed"], report
        assert report["end_to_end"]["psnr_db"] >= 40
        assert report["components"]["vae_encoder"]["passed"] and report["components"]["vae_encoder"]["rel_l2"] <= 1e-4
    assert [r["fitted"] for r in two["images"]] == [False, True]
    assert any("200x150 (HxW); resized and center-cropped to the exported reference size 96x128" in m for m in lines)
    manifest = json.loads((editing("dev-k2") / "manifest.json").read_text())
    assert manifest["shapes"]["reference_images"] == 2
    assert (manifest["shapes"]["reference_height"], manifest["shapes"]["reference_width"]) == (96, 128)
    assert manifest["components"]["vae_encoder"]["inputs"][0]["shape"] == [2, 3, 96, 128]
    torch_backend = run_check(artifacts=editing("dev-k2"), backend="torch", steps=STEPS,
                              images=[images["96x128"], images["128"]], log=lines.append)  # fmt: skip
    assert torch_backend["passed"] and torch_backend["end_to_end"]["psnr_db"] >= 50
    # The references condition the image: another reference, another picture.
    other = _ours(editing("dev-k1"), [images["200x150"]])
    assert psnr(_ours(editing("dev-k1"), [images["128"]]), other) < 40


def _ours(artifacts, paths, guidance=4.0):
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling
    from runtime.reference_images import load_references

    opened = open_artifacts(artifacts)
    array, _ = load_references(paths, count=opened.shapes.reference_images, size=opened.shapes.reference_size,
                               multiple_of=opened.geometry.pixels_per_token)  # fmt: skip
    runtime = Flux2Runtime(opened, OrtBackend(opened.folder, opened.manifest))
    _, image, _ = next(runtime.generate(Sampling("a red fox", seed=0, steps=STEPS, guidance=guidance), progress=False,
                                        reference_images=array))  # fmt: skip
    return image


@pytest.mark.slow
def test_klein_with_cfg_and_a_reference_matches_diffusers(editing, images):
    from runtime.check import run_check

    report = run_check(
        artifacts=editing("klein-k1"), backend="ort", steps=STEPS, guidance=4.0, images=[images["128"]], log=print
    )
    assert report["passed"] and report["end_to_end"]["psnr_db"] >= 40
    assert report["components"]["vae_encoder"]["passed"]


def test_engines_check_accepts_editing_graphs(editing):
    from engines.check import check_artifacts

    reports = check_artifacts(editing("dev-k2"))
    assert {r.component for r in reports} == {"text_encoder", "transformer", "vae", "vae_encoder"}
    assert all(r.passed for r in reports), [(r.component, r.findings) for r in reports]


def test_image_errors_are_one_line(editing, images, tmp_path):
    artifacts = str(editing("dev-k1"))
    (tmp_path / "text.png").write_text("not an image")

    def generate(*paths):
        flags = [a for p in paths for a in ("--image", str(p))]
        return run_cli("-m", "runtime.generate", "--artifacts", artifacts, "--prompt", "x", "--steps", "1",
                       "--backend", "ort", "--out", str(tmp_path / "out"), *flags)  # fmt: skip

    assert_one_line_error(generate(tmp_path / "missing.png"), str(tmp_path / "missing.png"), "does not exist")
    assert_one_line_error(generate(tmp_path / "text.png"), str(tmp_path / "text.png"), "not an image")
    assert_one_line_error(
        generate(images["128"], images["128"]), "2 --image files", "take 1 reference", "--reference-images 2"
    )
    assert not (tmp_path / "out").exists()  # a refused request leaves no output folder either


@pytest.mark.parametrize(
    "flags, needle",
    [(["--reference-size", "128x128"], "needs --reference-images"),
     (["--reference-images", "1", "--reference-size", "12x"], "not HEIGHTxWIDTH"),
     (["--reference-images", "1", "--reference-size", "40x128"], "at least 64"),
     (["--reference-images", "1", "--reference-size", "1040x1040"], "over 1024x1024")],
)  # fmt: skip
def test_export_reference_flags(tmp_path, capsys, flags, needle):
    from common.cli import run_cli as run_main
    from export.__main__ import main

    argv = ["--model", "tiny", "--out", str(tmp_path / "out"), "--height", "128", "--width", "128", *flags]
    try:
        code = run_main(main, argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp8"])
def test_every_precision_exports_references_within_its_bounds(editing, tmp_path, precision):
    """fp16 graphs in ONNX Runtime, bf16 in onnx's reference evaluator, FP8 through its fp32 twin, as for text to image."""
    from common.precision import TOLERANCES
    from common.specs import Shapes
    from engines.check import check_artifacts
    from export.fp8.calibrate import CalibrationSettings
    from export.fp8.run import Fp8Options
    from export.run import export_artifacts

    editing("dev-k1")  # makes the checkpoint
    checkpoint = next(p for p in editing("dev-k1").parent.iterdir() if p.name == "checkpoint-dev")
    out = tmp_path / precision
    fp8 = Fp8Options(calibration=CalibrationSettings(prompts=2, steps=2)) if precision == "fp8" else None
    manifest = export_artifacts(model=str(checkpoint), out=out, precision=precision, components=("transformer", "vae"),
                                shapes=Shapes(**SHAPES, reference_images=1), fp8=fp8, log=lambda m: None)  # fmt: skip
    assert set(manifest.components) == {"transformer", "vae", "vae_encoder"}
    reports = json.loads((out / "reports" / "export_check.json").read_text())["components"]
    for component in ("transformer", "vae_encoder"):
        report = reports[component]
        assert report["passed"], (component, report)
        bound = TOLERANCES["bf16" if precision == "fp8" and component == "vae_encoder" else precision]
        for metrics in report["outputs"].values():
            assert metrics["rel_l2"] <= bound.max_rel_l2 and metrics["cosine"] >= bound.min_cosine
    if precision == "fp8":
        assert reports["transformer"]["fp8"]["counts"]["fp8"] > 0
        assert reports["transformer"]["end_to_end"]["psnr_db"]["fp8_vs_bf16"] >= 25
    assert all(r.passed for r in check_artifacts(out))


@pytest.mark.slow
def test_same_token_count_other_references_is_a_new_transformer(editing, tmp_path):
    """K=2 references of 128x64 give as many tokens as K=1 of 128x128, but other position ids: no cache reuse."""
    from common.specs import Shapes
    from export.run import export_artifacts

    out = tmp_path / "k2-128x64"
    shutil.copytree(editing("dev-k1"), out)
    before = json.loads((out / "manifest.json").read_text())["components"]
    shapes = Shapes(**SHAPES, reference_images=2, reference_height=128, reference_width=64)
    after = export_artifacts(model=str(editing("dev-k1").parent / "checkpoint-dev"), out=out, shapes=shapes,
                             skip_check=True, log=lambda m: None).to_json()["components"]  # fmt: skip
    assert after["transformer"]["inputs"] == before["transformer"]["inputs"]  # same shapes ...
    assert after["transformer"]["sha256"] != before["transformer"]["sha256"]  # ... another graph
    assert after["text_encoder"]["sha256"] == before["text_encoder"]["sha256"]  # reused
