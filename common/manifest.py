"""The artifacts manifest: what was exported, from what, how, and the sha256 of every file.

An artifacts folder is valid when its manifest's keys match what is asked for, never merely
because files exist. Writes go through `atomic_dir`, so a crash leaves no folder a later step
would accept.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.errors import ArtifactsError

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


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ArtifactsError(f"artifacts folder {folder} does not exist; run `python -m export --out {folder}` first")
    if not path.is_file():
        raise ArtifactsError(
            f"{folder} has no {MANIFEST_NAME}; it is not a finished export, run `python -m export --out {folder}`"
        )
    return read_versioned_json(path, FORMAT, FORMAT_VERSION, fix="re-run export with --force")


def read_versioned_json(path: Path, expected_format: str, expected_version: int, *, fix: str) -> dict:
    """A manifest file's JSON, refused (with `fix`) when unreadable or of another format/version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactsError(f"{path} is not readable JSON ({exc}); {fix}") from None
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
