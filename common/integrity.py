"""Artifact files against the manifest's sha256, without re-hashing tens of GB at every start.

A file is hashed once; what was verified is recorded in `.verified.json` in the same folder, per
file: its sha256 and the file's identity (size, mtime, ctime, inode, device). On later opens a file
whose identity is unchanged is trusted; any change re-hashes it. ctime is in the key because
nothing but the kernel sets it: bytes overwritten in place and the mtime put back (`touch -r`)
still change it. `force=True` (`--verify`, `python -m runtime.verify`) re-hashes everything.
A read-only folder (a deployment mount) is verified the same way; only the record is not kept.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from common.errors import ArtifactsError
from common.manifest import ArtifactsManifest, sha256_file

STAMP_NAME = ".verified.json"


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_stamp(folder: Path) -> dict:
    try:
        stamp = json.loads((folder / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(folder: Path, stamp: dict) -> None:
    from common.atomic import atomic_write_json

    with contextlib.suppress(OSError):  # read-only or full: verification stands, it is just not remembered
        atomic_write_json(folder / STAMP_NAME, stamp, sort_keys=True)


def verify_files(folder: Path, expected: dict[str, str], *, force: bool = False, fix: str, log=None) -> list[str]:
    """Check each `folder/name` against its sha256; return the names hashed (the rest were trusted).

    Raises ArtifactsError naming the first missing or damaged file and `fix`.
    """
    folder = Path(folder)
    stamp = _read_stamp(folder)
    hashed = []
    try:
        for name, digest in expected.items():
            path = folder / name
            if not path.is_file():
                raise ArtifactsError(f"artifacts {folder} are incomplete: {name} is missing; {fix}")
            identity = _identity(path)
            if not force and stamp.get(name) == {"sha256": digest, "identity": identity}:
                continue
            if log is not None and identity[0] >= 2**30:
                log(f"verifying the sha256 of {path} ({identity[0] / 2**30:.1f} GiB; once, until the file changes)")
            actual = sha256_file(path)
            hashed.append(name)
            if actual != digest:
                stamp.pop(name, None)
                raise ArtifactsError(
                    f"artifacts {folder} are damaged: {name} has sha256 {actual[:16]}..., the manifest says "
                    f"{digest[:16]}...; {fix}"
                )
            stamp[name] = {"sha256": digest, "identity": identity}
    finally:
        if hashed:
            _write_stamp(folder, stamp)
    return hashed


def record_verified(folder: Path, expected: dict[str, str]) -> None:
    """Stamp files whose sha256 the caller just computed from them (an export), so the first use skips hashing."""
    folder = Path(folder)
    stamp = _read_stamp(folder)
    for name, digest in expected.items():
        with contextlib.suppress(OSError):
            stamp[name] = {"sha256": digest, "identity": _identity(folder / name)}
    _write_stamp(folder, stamp)


def verify_artifacts(folder: Path, manifest: ArtifactsManifest, *, force: bool = False, log=None) -> list[str]:
    """An artifacts folder's graphs, weights and tokenizer against its manifest (see the module doc)."""
    fix = f"restore the folder or re-export it (`python -m export --out {folder} --force`)"
    return verify_files(folder, manifest.files(), force=force, fix=fix, log=log)
