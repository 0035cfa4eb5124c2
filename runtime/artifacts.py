"""Open an artifacts folder for inference: manifest, file presence, specs, tokenizer, scheduler."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import ArtifactsError, UsageError
from common.integrity import verify_artifacts
from common.manifest import ArtifactsManifest, manifest_hash, read_manifest
from common.specs import (
    EDITING_COMPONENTS,
    RESOLUTION_COMPONENTS,
    ComponentSpec,
    Geometry,
    Shapes,
    component_specs,
    graph_name,
)
from common.tokenizer import PromptTokenizer

REQUIRED = ("text_encoder", "transformer", "vae")


@dataclass(frozen=True)
class Artifacts:
    folder: Path
    manifest: ArtifactsManifest
    manifest_sha256: str
    specs: dict[str, ComponentSpec]

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def geometry(self) -> Geometry:
        return self.manifest.geometry

    @property
    def shapes(self) -> Shapes:
        return self.manifest.shapes

    def prompt_tokenizer(self) -> PromptTokenizer:
        """The copied tokenizer at the exported length; refused where it reads otherwise than export recorded."""
        tokenizer = PromptTokenizer(
            self.folder / "tokenizer", self.shapes.max_sequence_length, pipeline_class=self.geometry.pipeline_class
        )
        tokenizer.check_record(self.manifest.tokenizer.reading(), self.folder / "manifest.json")
        return tokenizer

    def check_prompt_room(self) -> None:
        """ArtifactsError where the chat template alone fills max_sequence_length: a model that can never serve.

        Export refuses such a length; this catches folders exported before it did (deploy.triton, the
        Triton model's initialize).
        """
        subject = f"artifacts {self.folder} (exported with max_sequence_length {self.shapes.max_sequence_length})"
        self.prompt_tokenizer().check_prompt_room(subject, "re-export them with", ArtifactsError)

    def scheduler_json(self) -> dict:
        return json.loads((self.folder / self.manifest.scheduler_config).read_text(encoding="utf-8"))


def at_size(manifest: ArtifactsManifest, folder: Path, size: tuple[int, int] | None) -> ArtifactsManifest:
    """The manifest as one exported size sees it: `transformer` and `vae` are that size's graphs, the shapes its own.

    A folder exported with `--resolutions` holds `transformer_<H>x<W>` (and the VAE's) beside the first
    size's; every consumer (backends, checks, the server) then reads the view as a one-size folder. A size
    that was not exported is refused in one line listing those that were. None: the first exported size.
    """
    sizes = manifest.shapes.sizes
    height, width = size or sizes[0]
    if (height, width) not in sizes:
        listed = ",".join(f"{h}x{w}" for h, w in sizes)
        raise UsageError(
            f"--height/--width {height}x{width} was not exported in {folder}, which draws {listed.replace(',', ', ')}; "
            f"pick one of them, or re-export with --resolutions {listed},{height}x{width}"
        )
    components = {}
    for name, record in manifest.components.items():
        if name in manifest.further_size_graphs():
            continue
        components[name] = record
    for component in RESOLUTION_COMPONENTS:
        graph = graph_name(component, manifest.shapes, height, width)
        if graph in manifest.components:
            components[component] = manifest.components[graph]
    return dataclasses.replace(manifest, components=components, shapes=manifest.shapes.at(height, width))


def open_artifacts(
    folder: str | Path, *, verify: bool = False, log=None, size: tuple[int, int] | None = None
) -> Artifacts:
    """The artifacts in `folder` at `size` (height, width; default the first exported), every file they
    read checked against the manifest's sha256 (`common.integrity`).

    `verify=True` re-hashes every file even when its verified stamp still matches.
    """
    folder = Path(folder).expanduser()
    manifest = at_size(read_manifest(folder), folder, size)
    components, shapes = manifest.components, manifest.shapes
    # Editing artifacts (exported with --reference-images K) also need the VAE encoder.
    required = REQUIRED + (EDITING_COMPONENTS if shapes.reference_images else ())
    missing = [c for c in required if c not in components]
    if missing:
        raise ArtifactsError(
            f"artifacts {folder} lack {', '.join(missing)}; re-run `python -m export --out {folder}` with all components"
        )
    for component in required:
        for name, size in components[component].bytes.items():
            path = folder / name
            if not path.is_file():
                raise ArtifactsError(
                    f"artifacts {folder} are incomplete: {name} is missing; re-run export with --force"
                )
            if path.stat().st_size != size:
                raise ArtifactsError(
                    f"artifacts {folder} are damaged: {name} has {path.stat().st_size} bytes, the manifest says {size}; "
                    "re-run export with --force"
                )
    for name in ("tokenizer.json",):
        if not (folder / "tokenizer" / name).is_file():
            raise ArtifactsError(
                f"artifacts {folder} are incomplete: tokenizer/{name} is missing; re-run export with --force"
            )
    if not (folder / manifest.scheduler_config).is_file():
        raise ArtifactsError(
            f"artifacts {folder} are incomplete: scheduler_config.json is missing; re-run export with --force"
        )
    verify_artifacts(folder, manifest, force=verify, log=log)
    specs = component_specs(manifest.geometry, shapes)
    for component in required:
        declared = [(t.name, t.shape) for t in components[component].inputs]
        if declared != [(t.name, t.shape) for t in specs[component].inputs]:
            raise ArtifactsError(
                f"artifacts {folder}: the {component} inputs in the manifest {declared} differ from what this flux2-trt "
                "derives from the same configs; re-export with this version (--force)"
            )
    return Artifacts(folder, manifest, manifest_hash(folder), specs)
