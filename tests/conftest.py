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
    from export.tiny import ensure_tiny_checkpoint

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


@pytest.fixture(scope="session")
def tiny_klein_checkpoint(_cache_dir) -> Path:
    """The tiny FLUX.2 [klein] base model (true classifier-free guidance)."""
    from export.tiny import ensure_tiny_checkpoint
    from export.tiny_klein import KLEIN_BASE

    return ensure_tiny_checkpoint(KLEIN_BASE)


@pytest.fixture(scope="session")
def tiny_klein_distilled_checkpoint(_cache_dir) -> Path:
    """The tiny FLUX.2 [klein] step-distilled model (`is_distilled`: no guidance)."""
    from export.tiny import ensure_tiny_checkpoint
    from export.tiny_klein import KLEIN_DISTILLED

    return ensure_tiny_checkpoint(KLEIN_DISTILLED)
