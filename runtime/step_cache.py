"""The first-block step cache (`runtime.generate --cache-threshold T`, docs/cache.md).

Each step runs the head graph (embedders + the first double block) and compares its image residual
r = h1 - h0 with r_prev, the residual of the last step on which the tail ran:
diff = mean|r - r_prev| / mean|r_prev|. Above T (or with no r_prev) the tail graph runs the other
blocks and the output layers, and its tail residual (the image tokens entering norm_out, minus h1)
and r are kept; otherwise the small out graph draws norm_out(h1 + kept tail residual), skipping the
blocks. This is ParaAttention's FBCache rule as `diffusers.hooks.first_block_cache` applies it,
written against FLUX.2's real block structure (the single blocks work on the joint text + image
stream, which diffusers' own hook gets wrong: LESSONS.md).

The decision is computed where the backend's arrays live (numpy for ONNX Runtime, torch on the GPU
for TensorRT), in float32; the one scalar read per step is what chooses the next graph.
"""

from __future__ import annotations

import math

import numpy as np

from common.errors import ArtifactsError, UsageError
from common.specs import STEP_CACHE_COMPONENTS

HEAD, TAIL, OUT = STEP_CACHE_COMPONENTS


def check_threshold(threshold: float, name: str = "--cache-threshold") -> None:
    if not math.isfinite(threshold) or threshold < 0:
        raise UsageError(
            f"{name} {threshold} must be a finite number >= 0 (0: no step cache; 0.05-0.6 skip more steps as it grows)"
        )


def check_artifacts(manifest, folder) -> None:
    """Refuse, in one line, artifacts exported without the step cache's graphs."""
    missing = [name for name in STEP_CACHE_COMPONENTS if name not in manifest.components]
    if missing:
        raise ArtifactsError(
            f"artifacts {folder} have no {', '.join(missing)} graph(s), which --cache-threshold runs; "
            f"re-export with `python -m export --out {folder} --step-cache` (or use --cache-threshold 0)"
        )


def check_run(threshold: float, artifacts, backend=None) -> None:
    """Before any work: a threshold above 0 needs the step cache's graphs and (once chosen) a backend that runs graphs."""
    if threshold:
        check_artifacts(artifacts.manifest, artifacts.folder)
        if backend is not None:
            check_backend(backend)


def check_backend(backend) -> None:
    """Refuse a backend that does not run the exported graphs (torch runs diffusers' own modules)."""
    if not getattr(backend, "runs_graphs", True):
        raise UsageError(
            f"--cache-threshold runs the step cache's graphs; the {backend.name} backend runs diffusers' modules "
            "instead: use --backend ort or trt, or --cache-threshold 0"
        )


def relative_change(residual, previous) -> float:
    """mean|r - r_prev| / mean|r_prev| in float32, computed where the arrays live; inf when r_prev is all zeros."""
    if isinstance(residual, np.ndarray):
        residual, previous = residual.astype(np.float32, copy=False), previous.astype(np.float32, copy=False)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = float(np.abs(residual - previous).mean() / np.abs(previous).mean())
    else:
        residual, previous = residual.float(), previous.float()
        ratio = float((residual - previous).abs().mean() / previous.abs().mean())  # one scalar read from the device
    return ratio if math.isfinite(ratio) else math.inf


class StepCache:
    """One transformer pass's cache across the denoising steps (true CFG keeps one per pass).

    `inputs` maps each step-cache graph to its input names (the manifest's records), so each graph is
    fed only what it takes.
    """

    def __init__(self, threshold: float, inputs: dict[str, tuple[str, ...]]):
        self.threshold = threshold
        self.inputs = inputs
        self.first_residual = None  # r of the last step that ran the tail
        self.tail_residual = None
        self.ran_tail: list[bool] = []  # per step: True where the tail ran
        self.changes: list[float] = []  # per step: diff (inf where there was no r_prev)

    def _feeds(self, component: str, values: dict) -> dict:
        return {name: values[name] for name in self.inputs[component]}

    def velocity(self, feeds: dict, run):
        """The transformer's velocity for one step's `feeds` (the full graph's inputs, LoRA slots included);
        `run(component, feeds)` runs one graph and returns its outputs."""
        head = run(HEAD, self._feeds(HEAD, feeds))
        residual = head["first_residual"]
        change = math.inf if self.first_residual is None else relative_change(residual, self.first_residual)
        self.changes.append(change)
        values = {**feeds, **head}
        if change > self.threshold:
            tail = run(TAIL, self._feeds(TAIL, values))
            self.first_residual, self.tail_residual = residual, tail["tail_residual"]
            self.ran_tail.append(True)
            return tail["velocity"]
        self.ran_tail.append(False)
        return run(OUT, self._feeds(OUT, {**values, "tail_residual": self.tail_residual}))["velocity"]


def new_caches(threshold: float, artifacts, passes: int) -> list[StepCache]:
    """One cache per transformer pass of a step (true CFG: the conditional and the unconditional); none at 0."""
    if threshold == 0:
        return []
    check_threshold(threshold, "cache_threshold")
    manifest = artifacts.manifest
    check_artifacts(manifest, artifacts.folder)
    inputs = {name: tuple(t.name for t in manifest.components[name].inputs) for name in STEP_CACHE_COMPONENTS}
    return [StepCache(threshold, inputs) for _ in range(passes)]


def summary(threshold: float, caches) -> dict:
    """The sidecar's `cache` record: transformer evaluations (steps x passes) and how many skipped the tail."""
    decisions = [ran for cache in caches for ran in cache.ran_tail]
    return {"threshold": threshold, "skipped": decisions.count(False), "steps": len(decisions)}
