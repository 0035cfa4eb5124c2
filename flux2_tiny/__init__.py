"""Tiny, randomly initialised FLUX.2 checkpoints in the diffusers layout: the embedded default.

The test subject of the suite and the `--model tiny` of the command lines. Production code
(export, engines, runtime) never imports this package: the command lines find it by name through
the `flux2_trt.checkpoints` entry point (`common.named_checkpoints`).

Deterministic: the same `TinyConfig` always gives the same bytes of weights, so the cache key
is the config itself. Built once into the cache folder (atomically) and reused.
"""

from __future__ import annotations

from pathlib import Path

from common.atomic import atomic_dir
from common.cache import default_cache_dir
from flux2_tiny.config import DEFAULT, TinyConfig
from flux2_tiny.klein import KLEIN_BASE, KLEIN_DISTILLED

# The names `python -m export --model` accepts for the embedded checkpoints.
TINY_MODELS = ("tiny", "tiny-klein", "tiny-klein-distilled")


def tiny_preset(name: str) -> TinyConfig:
    """The config of one of TINY_MODELS."""
    if name == "tiny":
        return DEFAULT
    return {"tiny-klein": KLEIN_BASE, "tiny-klein-distilled": KLEIN_DISTILLED}[name]


def ensure_tiny_checkpoint(config: TinyConfig = DEFAULT, cache_dir: Path | None = None) -> Path:
    """Return the folder of the tiny checkpoint for `config`, generating it on first use."""
    prefix = "tiny" if config.family == "dev" else f"tiny-{config.family}"
    target = (cache_dir or default_cache_dir()) / f"{prefix}-{config.key()}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Deterministic bytes: a concurrent writer of the same config writes the same folder.
    with atomic_dir(target) as staging:
        writer_for(config)(staging, config)
    return target


def writer_for(config: TinyConfig):
    if config.family == "klein":
        from flux2_tiny.klein import write_tiny_klein_checkpoint

        return write_tiny_klein_checkpoint
    from flux2_tiny.dev import write_tiny_checkpoint

    return write_tiny_checkpoint


def named_checkpoint(name: str) -> Path:
    """Entry point `flux2_trt.checkpoints`: the folder of one of TINY_MODELS, generated on first use."""
    return ensure_tiny_checkpoint(tiny_preset(name))
