"""Shared fixtures: the tiny checkpoint and exports of it, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Small shapes keep the suite fast; the 1024x1024 / 512-token defaults are exercised by `make demo`.
SMALL = {"height": 256, "width": 256, "max_sequence_length": 128}


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


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


VARIANT = (
    "text_hidden_size=48", "text_num_layers=5", "text_num_heads=6", "text_num_kv_heads=3", "text_out_layers=1,3,5",
    "num_layers=1", "num_single_layers=3", "num_attention_heads=3", "attention_head_dim=24", "axes_dims_rope=6,6,6,6",
    "latent_channels=4", "vae_block_out_channels=8,16,16", "seed=11",
)  # fmt: skip


@pytest.fixture(scope="session")
def variant_artifacts(tmp_path_factory) -> Path:
    """A tiny configuration no other fixture uses, exported at fp32 through the command lines."""
    root = tmp_path_factory.mktemp("variant")
    made = run_cli(
        "-m", "flux2_tiny", "--out", str(root / "checkpoint"), *[a for pair in VARIANT for a in ("--set", pair)]
    )
    assert made.returncode == 0, made.stderr
    result = run_cli("-m", "export", "--model", str(root / "checkpoint"), "--out", str(root / "artifacts"),
                     "--height", "192", "--width", "320", "--max-sequence-length", "96")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root / "artifacts"


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user mistake: exit 2, exactly one line on stderr, no traceback, naming what matters."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


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
