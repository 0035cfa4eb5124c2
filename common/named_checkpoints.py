"""Checkpoints known by name (`--model tiny`), found through the `flux2_trt.checkpoints` entry point.

The embedded tiny checkpoints are a separate package (`flux2_tiny`) that registers its names
here; production code never imports it, so a deployment that leaves it out loses only the names.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from common.errors import UsageError

GROUP = "flux2_trt.checkpoints"


def checkpoint_names() -> tuple[str, ...]:
    return tuple(sorted(ep.name for ep in entry_points(group=GROUP)))


def resolve_model(model: str | Path) -> Path:
    """A checkpoint folder for `model`: a path as given, or a registered name generated on first use."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == str(model)]
    if found:
        return Path(found[0].load()(str(model)))
    if str(model).startswith("tiny") and not Path(model).exists():
        raise UsageError(
            f"--model {model}: no checkpoint of that name is installed ({', '.join(checkpoint_names()) or 'none'}); "
            "install flux2-trt with its tiny checkpoints, or pass a checkpoint folder"
        )
    return Path(model).expanduser().resolve()
