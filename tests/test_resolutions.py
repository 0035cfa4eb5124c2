"""Several image sizes from one artifacts folder: one copy of the weights (`--resolutions`, docs/export.md)."""

from __future__ import annotations

import json

import pytest

from common.errors import UsageError
from common.specs import Shapes
from tests.support import RESOLUTIONS as SIZES  # what conftest's resolutions_tiny exports
from tests.support import assert_one_line_error, rtx_copy, run_cli

MIN_PSNR_DB = 40.0  # issue 24: each size equals diffusers at that size


def test_one_copy_of_the_weights(resolutions_tiny):
    """Each further size's graphs read the first size's data file; what is their own is small tables and structure."""
    from common.manifest import read_manifest

    manifest = read_manifest(resolutions_tiny)
    assert manifest.shapes.sizes == SIZES
    report = json.loads((resolutions_tiny / "reports" / "export_check.json").read_text())["components"]
    folder = sum(p.stat().st_size for p in resolutions_tiny.rglob("*") if p.is_file())
    further = 0
    for height, width in SIZES[1:]:
        for component in ("transformer", "vae"):
            name = f"{component}_{height}x{width}"
            record = manifest.components[name]
            assert record.files[1] == f"{component}.onnx.data", record.files  # the first size's weights
            assert report[name]["passed"] is True and report[name]["shared_weights"]["shared"] > 0
            own = [f for f in record.files if f != f"{component}.onnx.data"]
            further += sum(record.bytes[f] for f in own)
            weights = manifest.components[component].bytes[f"{component}.onnx.data"]
            assert report[name]["shared_weights"]["own_bytes"] <= 0.05 * weights, report[name]
    # The folder against the same folder without the further sizes (a 128x128-only export's files).
    assert folder / (folder - further) <= 1.10


def test_each_size_draws_what_diffusers_draws_at_it(resolutions_tiny):
    import torch

    from common.metrics import psnr
    from common.reference_pipeline import reference_pipeline
    from runtime.artifacts import open_artifacts
    from runtime.backends.ort import OrtBackend
    from runtime.pipeline import Flux2Runtime, Sampling

    pipe = reference_pipeline(open_artifacts(resolutions_tiny).manifest.source.checkpoint, device="cpu")
    for height, width in SIZES:
        opened = open_artifacts(resolutions_tiny, size=(height, width))
        assert (opened.shapes.height, opened.shapes.width) == (height, width)
        runtime = Flux2Runtime(opened, OrtBackend(opened.folder, opened.manifest))
        ours = next(runtime.generate(Sampling("a red fox in the snow", 1, 2, 4.0), progress=False))[1]
        theirs = pipe(prompt="a red fox in the snow", height=height, width=width, num_inference_steps=2,
                      guidance_scale=4.0, generator=torch.Generator().manual_seed(1), max_sequence_length=128,
                      text_encoder_out_layers=tuple(opened.geometry.text_out_layers), output_type="np").images[0]  # fmt: skip
        assert ours.shape == (height, width, 3)
        assert psnr(ours, theirs) >= MIN_PSNR_DB, (height, width)


def test_a_size_not_exported_is_refused_listing_the_exported_ones(resolutions_tiny, tmp_path):
    out = tmp_path / "out"
    result = run_cli("-m", "runtime.generate", "--artifacts", str(resolutions_tiny), "--prompt", "a fox",
                     "--height", "64", "--width", "64", "--out", str(out))  # fmt: skip
    assert_one_line_error(result, "64x64 was not exported", "128x128, 96x160, 160x96")
    assert not out.exists()


def test_export_refuses_a_size_the_vae_cannot_draw(tmp_path):
    from export.run import ExportJob, plan_export

    for sizes, needle in (((128, 128), (100, 128)), "100x128"), (((128, 128), (128, 128)), "names a size twice"):
        job = ExportJob(model="tiny", out=tmp_path / "x", shapes=Shapes(128, 128, 128, resolutions=sizes))
        with pytest.raises(UsageError, match=needle):
            plan_export(job)
    assert not (tmp_path / "x").exists()


def test_tensorrt_rtx_builds_one_plan_per_size(resolutions_tiny, tmp_path):
    from engines.build import build_engines

    folder = rtx_copy(resolutions_tiny, tmp_path)
    manifest = build_engines(artifacts=folder, target="rtx", log=lambda m: None)
    expected = {"text_encoder", "transformer", "vae"} | {
        f"{c}_{h}x{w}" for h, w in SIZES[1:] for c in ("transformer", "vae")
    }
    assert set(manifest.engines) == expected
    for height, width in SIZES[1:]:
        shape = next(t.shape for t in manifest.engines[f"vae_{height}x{width}"].outputs if t.name == "image")
        assert shape[-2:] == (height, width)
