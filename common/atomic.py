"""Atomic writes, the one way this project writes files: build beside the target, then rename.

A crash, an interrupt or a full disk never leaves a file or folder that a later step would accept:
the partial copy has a hidden temporary name and is removed on any exception. The name records the
owner process (`common.staging`), so what a `kill -9` leaves is found and removed by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.staging import owner_tag, track, untrack


def atomic_write_via(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write(temporary)` fill a hidden sibling of `path` (a library's own save()), then rename it over `path`."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-{owner_tag()}-", dir=path.parent)
    os.close(handle)
    track(temporary)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    finally:
        untrack(temporary)


def atomic_write_bytes(path: Path, data) -> None:
    """Write `data` (bytes or any buffer, e.g. TensorRT's IHostMemory: no copy) atomically to `path`."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as out:
            out.write(data)

    atomic_write_via(path, write)


def atomic_write_json(path: Path, data, *, indent: int = 2, sort_keys: bool = False) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a fresh temporary sibling of `target`; on success it replaces `target` in one rename.

    On any exception the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{owner_tag()}-", dir=target.parent))
    track(staging)
    try:
        yield staging
        replace_dir(staging, target)
    finally:
        untrack(staging)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def replace_dir(staging: Path, target: Path) -> None:
    """Put the finished folder `staging` at `target` (a sibling), replacing what was there.

    The old folder is first renamed aside into a hidden owned sibling, so `target` is at every moment
    either the old folder or the new one; the old one is then removed.
    """
    retired = None
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{owner_tag()}-", dir=target.parent))
        os.rename(target, retired / "old")
    os.rename(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def writable_error(folder: Path) -> str | None:
    """None when a file can be created in the existing folder `folder`, else the reason (strerror).

    Tried rather than read from permission bits: root passes os.access even on read-only mounts.
    """
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=folder))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
