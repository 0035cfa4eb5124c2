"""Export of the tiny checkpoint: numerics per precision, graph properties, manifest, caching."""

import json

import numpy as np
import onnx
import pytest

from common.manifest import read_manifest, sha256_file
from common.onnx_checks import dynamic_dims, float64_uses
from common.specs import COMPONENTS

BOUNDS = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_export_matches_pytorch_fp32(export_tiny, precision):
    out = export_tiny(precision)
    report = json.loads((out / "reports" / "export_check.json").read_text())["components"]
    expected_method = "onnx-reference-evaluator" if precision == "bf16" else "onnxruntime-cpu"
    for component in COMPONENTS:
        entry = report[component]
        assert entry["method"] == expected_method
        assert entry["passed"] is True
        (metrics,) = entry["outputs"].values()
        assert metrics["rel_l2"] <= BOUNDS[precision], (component, metrics)
        assert metrics["cosine"] >= 0.999
        if precision == "fp32":
            assert metrics["max_abs"] < 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphs_are_deployable(export_tiny, precision):
    out = export_tiny(precision)
    manifest = read_manifest(out)
    assert manifest.precision == precision
    for component in COMPONENTS:
        entry = manifest.components[component]
        path = out / entry.file
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
        assert float64_uses(model) == []
        assert dynamic_dims(model) == []
        assert [i.name for i in model.graph.input] == [t.name for t in entry.inputs]
        for name, digest in entry.sha256.items():
            assert sha256_file(out / name) == digest
        # weights live in exactly one file beside the graph
        assert entry.files == (entry.file, entry.file + ".data")
        elem_types = {t.data_type for t in model.graph.initializer}
        want = {"fp32": onnx.TensorProto.FLOAT, "bf16": onnx.TensorProto.BFLOAT16}[precision]
        assert want in elem_types
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "scheduler_config.json").is_file()
    assert len(manifest.source.config_sha256) == 64
    assert manifest.versions["torch"].startswith("2.")


@pytest.mark.slow
def test_rerun_reuses_and_force_redoes(tmp_path, tiny_checkpoint, small_shapes):
    from export.run import export_artifacts

    out = tmp_path / "a"
    logs = []
    kwargs = dict(
        model=str(tiny_checkpoint), out=out, precision="fp32", components=("vae",), shapes=small_shapes, log=logs.append
    )
    first = export_artifacts(**kwargs)
    second = export_artifacts(**kwargs)
    assert "reused" in logs[-1] and "exported" not in logs[-1]
    assert first.components == second.components
    # a damaged weight file is noticed by its sha256, and the component is redone
    data = out / "vae.onnx.data"
    data.write_bytes(b"\0" * data.stat().st_size)
    export_artifacts(**kwargs)
    assert "exported" in logs[-1]
    assert sha256_file(data) == first.components["vae"].sha256["vae.onnx.data"]
    export_artifacts(**kwargs, force=True)
    assert "exported" in logs[-1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_re_export_keeps_the_engines_and_only_changed_graphs_need_new_plans(
    export_tiny, tiny_checkpoint, small_shapes, tmp_path
):
    """An export re-run into a folder with engines (an idempotent deploy script) links them into the new
    folder: unchanged graphs keep their plans; a changed graph's plan is refused until rebuilt, alone."""
    import shutil

    from common.engine_manifest import check_engines_usable, engines_dir, read_engine_manifest
    from common.errors import ArtifactsError
    from common.tensorrt_env import Platform
    from engines.build import build_engines
    from export.run import export_artifacts
    from tests.fake_trt import FakeTrt

    platform = Platform("tensorrt", FakeTrt.__version__, gpu="GPU-X", compute_capability="9.0")
    folder = tmp_path / "a"
    shutil.copytree(export_tiny("fp32"), folder, ignore=shutil.ignore_patterns("engines"))
    build_engines(artifacts=folder, target="tensorrt", trt=FakeTrt(), platform=platform, log=lambda m: None)
    plans = engines_dir(folder, "tensorrt")
    inodes = {p.name: p.stat().st_ino for p in plans.iterdir()}
    logs = []
    export_artifacts(model=str(tiny_checkpoint), out=folder, precision="fp32", shapes=small_shapes, log=logs.append)
    assert "exported" not in logs[-1]  # every graph reused ...
    assert {p.name: p.stat().st_ino for p in plans.iterdir()} == inodes  # ... and every engine file kept, linked
    assert any(line.startswith(f"kept {len(inodes)} engine files") for line in logs), logs
    check_engines_usable(read_engine_manifest(folder, "tensorrt"), read_manifest(folder), platform, folder)
    # The VAE re-exported at fp16: its plan no longer matches and is refused, then rebuilt on its own.
    export_artifacts(model=str(tiny_checkpoint), out=folder, precision="fp16", components=("vae",),
                     shapes=small_shapes, skip_check=True, log=lambda m: None)  # fmt: skip
    with pytest.raises(ArtifactsError, match="built from other vae ONNX files"):
        check_engines_usable(read_engine_manifest(folder, "tensorrt"), read_manifest(folder), platform, folder)
    logs.clear()
    build_engines(artifacts=folder, target="tensorrt", trt=FakeTrt(), platform=platform, log=logs.append)
    assert [line for line in logs if ": building (" in line] == [
        f"[1/1] vae: building (onnx_sha256 changed) from {folder / 'vae.onnx'}"
    ]
    check_engines_usable(read_engine_manifest(folder, "tensorrt"), read_manifest(folder), platform, folder)


def test_onnx_runtime_output_of_exported_graph_is_what_report_says(export_tiny):
    """Re-run one graph independently, so the report is not trusted blindly."""
    import onnxruntime as ort
    import torch

    from common.specs import component_specs
    from export.checkpoint import open_checkpoint
    from export.verify.reference import ReferenceInputs, build_graph_module

    out = export_tiny("fp32")
    manifest = read_manifest(out)
    checkpoint = open_checkpoint(manifest.source.checkpoint)
    geometry = checkpoint.geometry()
    shapes = manifest.shapes
    spec = component_specs(geometry, shapes)["transformer"]
    feeds = ReferenceInputs(checkpoint, geometry, shapes).feeds(spec)
    got = ort.InferenceSession(str(out / "transformer.onnx")).run(None, feeds)[0]
    with torch.no_grad():
        want = build_graph_module("transformer", checkpoint, geometry, shapes, "fp32")(
            *[torch.from_numpy(feeds[t.name]) for t in spec.inputs]
        ).numpy()
    assert np.abs(got - want).max() < 1e-4
