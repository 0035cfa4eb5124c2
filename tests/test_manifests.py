"""The typed manifests: what an export and a build write reads back to the same bytes, and a manifest
missing a field or holding one of the wrong type is refused in one line naming the field."""

from __future__ import annotations

import json
import shutil

import pytest

from common.atomic import atomic_write_json
from common.engine_manifest import ENGINE_MANIFEST_NAME, engines_dir, read_engine_manifest
from common.errors import ArtifactsError
from common.manifest import MANIFEST_NAME, ArtifactsManifest, read_manifest
from common.tensorrt_env import Platform
from tests.fake_trt import FakeTrt
from tests.support import assert_one_line_error, run_cli

PLATFORM = Platform("tensorrt", FakeTrt.__version__, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def _as_written(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"  # what atomic_write_json writes


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16 records float32_matmuls, fp32 does not
def test_an_exported_manifest_reads_back_to_the_same_bytes(export_tiny, precision):
    out = export_tiny(precision)
    text = (out / MANIFEST_NAME).read_text(encoding="utf-8")
    manifest = read_manifest(out)
    assert _as_written(manifest.to_json()) == text
    assert (manifest.components["transformer"].float32_matmuls is None) == (precision == "fp32")
    if precision == "fp16":
        assert manifest.components["transformer"].float32_matmuls == ()  # recorded, and empty
    assert manifest.tokenizer.padding_side in ("left", "right") and manifest.tokenizer.files
    assert set(manifest.files()) >= {"transformer.onnx", "transformer.onnx.data", "tokenizer/tokenizer.json"}


def test_a_built_engine_manifest_reads_back_to_the_same_bytes(export_tiny, tmp_path):
    from engines.build import build_engines

    folder = tmp_path / "a"
    shutil.copytree(export_tiny("fp32"), folder, ignore=shutil.ignore_patterns("engines"))
    built = build_engines(artifacts=folder, target="tensorrt", trt=FakeTrt(), platform=PLATFORM, log=lambda m: None)
    path = engines_dir(folder, "tensorrt") / ENGINE_MANIFEST_NAME
    assert _as_written(built.to_json()) == path.read_text(encoding="utf-8")
    assert read_engine_manifest(folder, "tensorrt") == built
    assert {record.platform for record in built.engines.values()} == {PLATFORM}


def _manifest_with(export_tiny, tmp_path, change) -> tuple:
    """A folder holding only the fp32 export's manifest.json, after `change(data)`."""
    data = json.loads((export_tiny("fp32") / MANIFEST_NAME).read_text(encoding="utf-8"))
    change(data)
    tmp_path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(tmp_path / MANIFEST_NAME, data)
    return tmp_path, tmp_path / MANIFEST_NAME


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["components"]["vae"].pop("sha256"), "components.vae has no 'sha256' field"),
        (lambda d: d["components"]["transformer"].update(bytes=[1, 2]), "components.transformer does not parse"),
        (lambda d: d["components"]["vae"]["inputs"][0].pop("shape"), "components.vae has no 'shape' field"),
        (lambda d: d["components"]["vae"].update(files="vae.onnx"), "components.vae does not parse"),
        (lambda d: d.pop("source"), "the manifest has no 'source' field"),
        (lambda d: d["shapes"].update(colour=3), "the manifest does not parse"),
        (lambda d: d["geometry"].pop("latent_channels"), "the manifest does not parse"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_field(export_tiny, tmp_path, change, message):
    folder, path = _manifest_with(export_tiny, tmp_path, change)
    with pytest.raises(ArtifactsError, match=f"^{path} is malformed: {message}.*; re-run export with --force$"):
        read_manifest(folder)


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ArtifactsError, match="holds list, not a manifest object"):
        read_manifest(tmp_path)


def test_generate_on_a_malformed_manifest_is_one_line(export_tiny, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(export_tiny("fp32"), folder, ignore=shutil.ignore_patterns("engines"))
    data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    del data["components"]["transformer"]["key"]
    atomic_write_json(folder / MANIFEST_NAME, data)
    images = tmp_path / "images"
    result = run_cli("-m", "runtime.generate", "--artifacts", str(folder), "--prompt", "a fox", "--out", str(images))
    assert_one_line_error(result, "manifest.json is malformed: components.transformer has no 'key' field")
    assert not (tmp_path / "images").exists()


def test_verify_checks_artifacts_and_every_targets_plans(export_tiny, tmp_path):
    """`python -m runtime.verify` on good artifacts with engines exits 0 and counts the plans; a damaged
    plan or a malformed engine manifest is one line, exit 2."""
    from engines.build import build_engines

    folder = tmp_path / "a"
    shutil.copytree(export_tiny("fp32"), folder, ignore=shutil.ignore_patterns("engines"))
    plain = run_cli("-m", "runtime.verify", str(folder))
    assert plain.returncode == 0, plain.stderr
    files = len(read_manifest(folder).files())
    assert f"verified {files} files" in plain.stdout
    build_engines(artifacts=folder, target="tensorrt", trt=FakeTrt(), platform=PLATFORM, log=lambda m: None)
    with_plans = run_cli("-m", "runtime.verify", str(folder))
    assert with_plans.returncode == 0, with_plans.stderr
    assert f"verified {files + 3} files" in with_plans.stdout  # text encoder, transformer and VAE plans
    plan = engines_dir(folder, "tensorrt") / "vae.plan"
    plan.write_bytes(b" " * plan.stat().st_size)
    damaged = run_cli("-m", "runtime.verify", str(folder))
    assert_one_line_error(damaged, "engines/tensorrt/vae.plan", "damaged", "engines.build", "--target tensorrt")
    path = engines_dir(folder, "tensorrt") / ENGINE_MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["engines"]["vae"]["plan_sha256"]
    atomic_write_json(path, data)
    malformed = run_cli("-m", "runtime.verify", str(folder))
    assert_one_line_error(malformed, f"{path} is malformed: engines.vae has no 'plan_sha256' field", "--force")


def test_manifest_records_are_what_the_runtime_reads(export_tiny):
    """Shapes and geometry come back typed (tuples, not lists), so equality with what export derives holds."""
    from common.specs import component_specs

    manifest = read_manifest(export_tiny("fp32"))
    assert isinstance(manifest, ArtifactsManifest)
    specs = component_specs(manifest.geometry, manifest.shapes)
    for name, record in manifest.components.items():
        assert record.inputs == specs[name].inputs and record.outputs == specs[name].outputs
