"""Disk faults as one line: what was being written, where, why, and the space needed and free."""

from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path

from common.errors import StorageError

# The errors a disk (not the program) causes: full, over quota, over a file-size limit, failing,
# read-only or not ours.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM})
_FIX = {
    errno.ENOSPC: "free space there or choose a folder on a larger disk",
    errno.EDQUOT: "free space within your quota or choose another folder",
    errno.EFBIG: "raise the file-size limit or choose a filesystem that takes larger files",
    errno.EIO: "the device reported an I/O error: check the disk (dmesg) before trusting anything on it",
    errno.EROFS: "the filesystem is read-only: choose a writable folder",
    errno.EACCES: "no permission: make the folder writable or choose another",
    errno.EPERM: "no permission: make the folder writable or choose another",
}


def is_storage_error(exc: OSError) -> bool:
    """True for an OSError the disk caused. numpy's `tofile` (onnx_ir writes weights with it) drops the
    errno and says only "problem writing element N to file": counted too, diagnosed by `storage_error`."""
    return exc.errno in STORAGE_ERRNOS or (exc.errno is None and str(exc).startswith("problem writing"))


def _diagnose(where: Path | None) -> tuple[int | None, str]:
    """The likely errno of a failed write that lost its own: a file-size limit, else a full disk."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return errno.EFBIG, f"File too large (files are limited to {_gib(soft)} here, `ulimit -f`)"
    free = free_bytes(where) if where is not None else None
    if free is not None and free < 2**26:
        return errno.ENOSPC, "No space left on device"
    return None, "a write failed"


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"


def storage_error(exc: OSError, what: str, where: Path | str | None, needed: int | None = None) -> StorageError:
    """A StorageError for `exc`, raised while `what` (e.g. "export") wrote into `where`."""
    place = exc.filename or where or "the output folder"
    code, reason = (exc.errno, exc.strerror or str(exc)) if exc.errno is not None else _diagnose(where)
    text = f"{what} failed: {reason}, writing {place}"
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and where is not None:
        free = free_bytes(Path(where))
        if needed is not None:
            text += f"; about {_gib(needed)} needed"
        if free is not None:
            text += f"; {_gib(free)} free there"
    fix = _FIX.get(code)
    return StorageError(f"{text}; {fix}; nothing partial was kept" if fix else f"{text}; nothing partial was kept")


def ensure_space(folder: Path, needed: int, what: str) -> None:
    """Refuse, before writing, when the disk holding `folder` has less than `needed` bytes free."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise StorageError(
            f"not enough space for {what} in {folder}: about {_gib(needed)} needed, {_gib(free)} free; "
            "free space there or choose a folder on a larger disk"
        )
