"""The artifacts manifest: what was exported, from what, how, and the sha256 of every file.

An artifacts folder is valid when its manifest's keys match what is asked for, never merely
because files exist. Writes go through `atomic_dir`, so a crash leaves no folder a later step
would accept.

The manifest is read into `ArtifactsManifest` (typed records, not a dict passed around): a
manifest missing a field or holding one of the wrong type is refused here, in one line naming the
field, rather than failing as a KeyError wherever the field is first used. `to_json()` writes the
same JSON the format has always had (format_version 1), so folders exported before still open.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import ArtifactsError
from common.specs import Geometry, Shapes, TensorSpec

MANIFEST_NAME = "manifest.json"
FORMAT = "flux2-trt-artifacts"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def key_of(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _names(items) -> tuple[str, ...]:
    if isinstance(items, (str, dict)):
        raise TypeError(f"expected a list of names, got {items!r}")
    return tuple(str(item) for item in items)


def _digests(items: dict) -> dict[str, str]:
    return {str(name): str(digest) for name, digest in items.items()}


def _sizes(items: dict) -> dict[str, int]:
    return {str(name): int(size) for name, size in items.items()}


def tensors_from_json(items) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(str(t["name"]), tuple(int(d) for d in t["shape"]), str(t["dtype"])) for t in items)


def tensors_to_json(tensors: tuple[TensorSpec, ...]) -> list[dict]:
    return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in tensors]


@dataclass(frozen=True)
class Source:
    """The checkpoint exported: its folder, what the user named it, and hashes of its configs and weights."""

    checkpoint: str
    model: str
    config_sha256: str
    weights_fingerprint: str

    def to_json(self) -> dict:
        return asdict(self)

    def key_payload(self) -> dict:
        """What a graph depends on: not the name it was asked for by (`tiny` and its folder are one checkpoint)."""
        return {k: v for k, v in self.to_json().items() if k != "model"}

    @classmethod
    def from_json(cls, data: dict) -> Source:
        return cls(
            str(data["checkpoint"]), str(data["model"]), str(data["config_sha256"]), str(data["weights_fingerprint"])
        )


@dataclass(frozen=True)
class TokenizerRecord:
    """The tokenizer copied into the artifacts: its folder, files (name -> sha256), and how it was read.

    The reading fields are None in manifests written before they were recorded; nothing is compared then.
    """

    folder: str
    files: dict[str, str]
    padding_side: str | None = None
    truncation_side: str | None = None
    pad_id: int | None = None
    pipeline_class: str | None = None

    def reading(self) -> dict:
        """How the export read the tokenizer (`PromptTokenizer.record()`'s fields that were recorded)."""
        fields = ("padding_side", "truncation_side", "pad_id", "pipeline_class")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}

    def to_json(self) -> dict:
        return {"folder": self.folder, "files": dict(self.files), **self.reading()}

    @classmethod
    def from_json(cls, data: dict) -> TokenizerRecord:
        pad_id = data.get("pad_id")
        return cls(
            folder=str(data.get("folder", "tokenizer")),
            files=_digests(data.get("files", {})),
            padding_side=data.get("padding_side"),
            truncation_side=data.get("truncation_side"),
            pad_id=None if pad_id is None else int(pad_id),
            pipeline_class=data.get("pipeline_class"),
        )


@dataclass(frozen=True)
class ComponentRecord:
    """One exported graph: its ONNX file (and external data), their sha256 and sizes, and its I/O."""

    file: str  # the .onnx file; `files` adds its external data
    files: tuple[str, ...]
    sha256: dict[str, str]
    bytes: dict[str, int]
    key: str  # the export cache key: a graph is reused only under the same key
    precision: str  # the graph's own precision: an fp8 export keeps text encoder and VAE at bf16
    opset: int
    nodes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # fp16/bf16 graphs only: the matrix multiplies kept in float32 on purpose (engines.check holds TensorRT to it).
    float32_matmuls: tuple[str, ...] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "files": list(self.files),
            "sha256": dict(self.sha256),
            "bytes": dict(self.bytes),
            "key": self.key,
            "precision": self.precision,
            "opset": self.opset,
            "nodes": self.nodes,
            **({"float32_matmuls": list(self.float32_matmuls)} if self.float32_matmuls is not None else {}),
            "inputs": tensors_to_json(self.inputs),
            "outputs": tensors_to_json(self.outputs),
        }

    @classmethod
    def from_json(cls, data: dict) -> ComponentRecord:
        kept = data.get("float32_matmuls")
        return cls(
            file=str(data["file"]),
            files=_names(data["files"]),
            sha256=_digests(data["sha256"]),
            bytes=_sizes(data["bytes"]),
            key=str(data["key"]),
            precision=str(data["precision"]),
            opset=int(data["opset"]),
            nodes=int(data["nodes"]),
            inputs=tensors_from_json(data["inputs"]),
            outputs=tensors_from_json(data["outputs"]),
            float32_matmuls=None if kept is None else _names(kept),
        )


@dataclass(frozen=True)
class ArtifactsManifest:
    """`ARTIFACTS/manifest.json`: what was exported, from what, how, and every file's sha256."""

    created: str
    precision: str  # what was asked for: fp32 | fp16 | bf16 | fp8
    source: Source
    geometry: Geometry
    shapes: Shapes
    versions: dict[str, str]
    tokenizer: TokenizerRecord
    scheduler_config: str
    components: dict[str, ComponentRecord]
    # LoRAs baked into the transformer at export (`--lora`), in order: file, sha256, format, scale,
    # the layers they touched (export.lora.records). Absent from the JSON when there are none.
    loras: tuple = ()

    def further_size_graphs(self) -> set[str]:
        """Names of the graphs at the further `--resolutions` sizes (`transformer_<H>x<W>`, ...)."""
        from common.specs import RESOLUTION_COMPONENTS, graph_name

        return {
            graph_name(component, self.shapes, height, width)
            for height, width in self.shapes.sizes[1:]
            for component in RESOLUTION_COMPONENTS
        }

    def files(self) -> dict[str, str]:
        """Every file the manifest records a sha256 for: relative path -> sha256."""
        files = {}
        for record in self.components.values():
            files.update(record.sha256)
        for name, digest in self.tokenizer.files.items():
            files[f"{self.tokenizer.folder}/{name}"] = digest
        return files

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": self.created,
            "precision": self.precision,
            "source": self.source.to_json(),
            "geometry": self.geometry.to_json(),
            "shapes": self.shapes.to_json(),
            "versions": dict(self.versions),
            "tokenizer": self.tokenizer.to_json(),
            "scheduler_config": self.scheduler_config,
            "components": {name: record.to_json() for name, record in self.components.items()},
            **({"loras": list(self.loras)} if self.loras else {}),
        }

    @classmethod
    def from_json(cls, data: dict, path: Path, *, fix: str) -> ArtifactsManifest:
        """The manifest in `data` (read from `path`); ArtifactsError naming the field when one is missing or malformed."""
        return parse_manifest(
            path,
            fix,
            lambda: cls(
                created=str(data.get("created", "")),
                precision=str(data["precision"]),
                source=Source.from_json(data["source"]),
                geometry=Geometry.from_json(data["geometry"]),
                shapes=Shapes(**data["shapes"]),
                versions=_digests(data.get("versions", {})),
                tokenizer=TokenizerRecord.from_json(data.get("tokenizer", {})),
                scheduler_config=str(data.get("scheduler_config", "scheduler_config.json")),
                components=parse_records(data["components"], "components", ComponentRecord.from_json),
                loras=tuple(data.get("loras", ())),
            ),
        )


class _Malformed(Exception):
    """A record that did not parse: (where, the KeyError/TypeError/ValueError/AttributeError)."""


_PARSE_ERRORS = (KeyError, TypeError, ValueError, AttributeError)


def parse_records(items: dict, section: str, parse) -> dict:
    """{name: parse(entry)}; an entry that does not parse is reported as `section.name`."""
    records = {}
    for name, entry in items.items():
        try:
            records[str(name)] = parse(entry)
        except _PARSE_ERRORS as exc:
            raise _Malformed(f"{section}.{name}", exc) from None
    return records


def parse_manifest(path: Path, fix: str, parse):
    """parse(), with a missing or malformed field refused in one line that names it and `fix`."""
    try:
        return parse()
    except _Malformed as exc:
        where, cause = exc.args
    except _PARSE_ERRORS as exc:
        where, cause = "the manifest", exc
    if isinstance(cause, KeyError):
        raise ArtifactsError(f"{path} is malformed: {where} has no {cause.args[0]!r} field; {fix}")
    raise ArtifactsError(f"{path} is malformed: {where} does not parse ({cause}); {fix}")


def read_manifest(folder: Path) -> ArtifactsManifest:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ArtifactsError(f"artifacts folder {folder} does not exist; run `python -m export --out {folder}` first")
    if not path.is_file():
        raise ArtifactsError(
            f"{folder} has no {MANIFEST_NAME}; it is not a finished export, run `python -m export --out {folder}`"
        )
    fix = "re-run export with --force"
    return ArtifactsManifest.from_json(read_versioned_json(path, FORMAT, FORMAT_VERSION, fix=fix), path, fix=fix)


def read_versioned_json(path: Path, expected_format: str, expected_version: int, *, fix: str) -> dict:
    """A manifest file's JSON, refused (with `fix`) when unreadable or of another format/version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactsError(f"{path} is not readable JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ArtifactsError(f"{path} holds {type(data).__name__}, not a manifest object; {fix}")
    if data.get("format") != expected_format or data.get("format_version") != expected_version:
        raise ArtifactsError(
            f"{path} is format {data.get('format')!r} version {data.get('format_version')!r}; "
            f"this flux2-trt reads {expected_format!r} version {expected_version}: {fix}"
        )
    return data


def manifest_hash(folder: Path) -> str:
    return sha256_file(Path(folder) / MANIFEST_NAME)


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
