"""Shared fixtures: the tiny checkpoint and exports of it, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import RESOLUTIONS, SMALL, VARIANT, run_cli


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    if not os.environ.get("FLUX2_TRT_CACHE"):
        os.environ["FLUX2_TRT_CACHE"] = str(tmp_path_factory.mktemp("flux2-trt-cache"))
    yield Path(os.environ["FLUX2_TRT_CACHE"])


@pytest.fixture(scope="session")
def tiny_checkpoint(_cache_dir) -> Path:
    from flux2_tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def small_shapes():
    from common.specs import Shapes

    return Shapes(**SMALL)


@pytest.fixture(scope="session")
def export_tiny(tmp_path_factory, tiny_checkpoint, small_shapes):
    """Export the tiny checkpoint once per precision; returns {precision: artifacts folder}."""
    from export.run import export_artifacts

    done: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in done:
            out = tmp_path_factory.mktemp(f"artifacts-{precision}") / "tiny"
            export_artifacts(
                model=str(tiny_checkpoint), out=out, precision=precision, shapes=small_shapes, log=lambda m: None
            )
            done[precision] = out
        return done[precision]

    return get


@pytest.fixture(scope="session")
def export_klein(tmp_path_factory, tiny_klein_checkpoint, tiny_klein_distilled_checkpoint, small_shapes):
    """The tiny [klein] exports, once per session: ("base" | "base-b2" | "distilled", precision) -> folder.

    "base-b2" is the base model at batch 2 (both CFG passes in one transformer call). Checked like
    every export, at the suite's small shapes; the runtime, export and TensorRT-RTX tests share them.
    """
    import dataclasses

    from export.run import export_artifacts

    done: dict[tuple[str, str], Path] = {}
    sources = {
        "base": tiny_klein_checkpoint,
        "base-b2": tiny_klein_checkpoint,
        "distilled": tiny_klein_distilled_checkpoint,
    }

    def get(name: str, precision: str = "fp32") -> Path:
        if (name, precision) not in done:
            shapes = dataclasses.replace(small_shapes, batch_size=2) if name.endswith("b2") else small_shapes
            out = tmp_path_factory.mktemp(f"klein-{name}-{precision}") / "artifacts"
            export_artifacts(model=str(sources[name]), out=out, precision=precision, shapes=shapes, log=lambda m: None)
            done[(name, precision)] = out
        return done[(name, precision)]

    return get


@pytest.fixture(scope="session")
def variant_artifacts(tmp_path_factory) -> Path:
    """A tiny configuration no other fixture uses, exported at fp32 through the command lines."""
    root = tmp_path_factory.mktemp("variant")
    made = run_cli(
        "-m", "flux2_tiny", "--out", str(root / "checkpoint"), *[a for pair in VARIANT for a in ("--set", pair)]
    )
    assert made.returncode == 0, made.stderr
    result = run_cli("-m", "export", "--model", str(root / "checkpoint"), "--out", str(root / "artifacts"),
                     "--height", "192", "--width", "320", "--max-sequence-length", "120")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root / "artifacts"


@pytest.fixture(scope="session")
def tiny_klein_checkpoint(_cache_dir) -> Path:
    """The tiny FLUX.2 [klein] base model (true classifier-free guidance)."""
    from flux2_tiny import ensure_tiny_checkpoint
    from flux2_tiny.klein import KLEIN_BASE

    return ensure_tiny_checkpoint(KLEIN_BASE)


@pytest.fixture(scope="session")
def tiny_klein_distilled_checkpoint(_cache_dir) -> Path:
    """The tiny FLUX.2 [klein] step-distilled model (`is_distilled`: no guidance)."""
    from flux2_tiny import ensure_tiny_checkpoint
    from flux2_tiny.klein import KLEIN_DISTILLED

    return ensure_tiny_checkpoint(KLEIN_DISTILLED)


@pytest.fixture(scope="session")
def tiny_plain_checkpoint(_cache_dir) -> Path:
    """The tiny [dev] checkpoint in the older layout (plain fast tokenizer, float32 single files)."""
    import dataclasses

    from flux2_tiny import ensure_tiny_checkpoint
    from flux2_tiny.config import DEFAULT

    return ensure_tiny_checkpoint(dataclasses.replace(DEFAULT, layout="plain"))


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory, tiny_checkpoint):
    """kohya (rank 4, alpha 2: scale 0.5 folded by diffusers' converter) and peft (rank 4, alpha 8: scaling 2).

    In one folder of their own, with a rank-16 file: test_deploy_server.py serves that folder (--lora-dir).
    """
    from flux2_tiny.lora_files import write_kohya_lora, write_peft_lora

    folder = tmp_path_factory.mktemp("loras")
    return {
        "kohya": write_kohya_lora(tiny_checkpoint, folder / "kohya.safetensors", rank=4, alpha=2, seed=0, strength=3.0),
        "peft": write_peft_lora(tiny_checkpoint, folder / "peft.safetensors", rank=4, alpha=8, seed=1, strength=3.0),
        "rank16": write_peft_lora(tiny_checkpoint, folder / "rank16.safetensors", rank=16, seed=2),
    }


@pytest.fixture(scope="session")
def lora_tiny(tmp_path_factory, tiny_checkpoint, small_shapes, lora_files):
    """The tiny default at fp32 with the kohya LoRA baked in at 0.8 and rank-8 slots: both modes in one export."""
    import dataclasses

    from common.lora import LoraRequest
    from export.run import export_artifacts

    out = tmp_path_factory.mktemp("lora") / "tiny"
    export_artifacts(
        model=str(tiny_checkpoint),
        out=out,
        precision="fp32",
        shapes=dataclasses.replace(small_shapes, lora_rank=8),
        loras=(LoraRequest(lora_files["kohya"], 0.8),),
        log=lambda m: None,
    )
    return out


@pytest.fixture(scope="session")
def resolutions_tiny(tmp_path_factory, tiny_checkpoint):
    """The tiny default at fp32 exported at three sizes (--resolutions): test_resolutions.py and the server's."""
    from common.specs import Shapes
    from export.run import export_artifacts

    out = tmp_path_factory.mktemp("resolutions") / "tiny"
    shapes = Shapes(height=128, width=128, max_sequence_length=128, resolutions=RESOLUTIONS)
    export_artifacts(model=str(tiny_checkpoint), out=out, precision="fp32", shapes=shapes, log=lambda m: None)
    return out


# The fast lane (`make test-fast`, `-m "not slow"`) is unit tests: anything that needs an export
# of a checkpoint, end to end, is `slow`, whether it asks for one through these fixtures or marks
# itself.
EXPORTING_FIXTURES = {
    "export_tiny",
    "export_klein",
    "variant_artifacts",
    "klein_artifacts",
    "exported",
    "editing",
    "fp8_tiny",
    "served",
    "lora_tiny",
    "resolutions_tiny",
    "cached_tiny",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cached_tiny(tmp_path_factory, tiny_checkpoint):
    """The tiny default at fp32 with the step cache's head/tail/out graphs (--step-cache), 128 x 128, 128 tokens:
    tests/test_step_cache.py and the served `cached` model (tests/test_deploy_server.py)."""
    from common.specs import Shapes
    from export.run import export_artifacts

    out = tmp_path_factory.mktemp("step-cache") / "tiny"
    shapes = Shapes(height=128, width=128, max_sequence_length=128)
    export_artifacts(model=str(tiny_checkpoint), out=out, shapes=shapes, step_cache=True, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def nvfp4_tiny(tmp_path_factory, tiny_checkpoint, small_shapes):
    """The tiny default exported once at nvfp4, its text encoder NVFP4 too (calibrated on 3 prompts x 2
    steps): the nvfp4 export, text-encoder, reference and engine tests share it."""
    from export.fp8.calibrate import CalibrationSettings
    from export.fp8.run import Fp8Options
    from export.run import export_artifacts

    options = Fp8Options(
        precision="nvfp4", text_encoder_precision="nvfp4", calibration=CalibrationSettings(prompts=3, steps=2)
    )
    out = tmp_path_factory.mktemp("nvfp4") / "tiny"
    export_artifacts(
        model=str(tiny_checkpoint), out=out, precision="nvfp4", shapes=small_shapes, fp8=options, log=lambda m: None
    )
    return out
