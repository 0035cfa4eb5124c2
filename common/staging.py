"""Who owns a staging folder, which ones a dead process left behind, and one writer per output folder.

Every temporary sibling that `common.atomic` creates carries its owner in its name:
`.NAME.tmp-PID-START@HOST-XXXXXXXX` (START is the process's start time in clock ticks since boot,
so a recycled pid is not mistaken for the owner). A `kill -9`, an out-of-memory kill or a power
cut skips every `finally`, and such a folder can hold tens of GB of half-written weights; the next
export or engine build into the same place finds it, sees its owner is gone and removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import time
from pathlib import Path

from common.errors import UsageError

_STAGED = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-(?P<start>\d+)@(?P<host>[A-Za-z0-9._]+)-[^-]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "unknown"


def _start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (starttime); 0 where /proc is absent (then only the pid is compared)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_tag() -> str:
    """`PID-START@HOST`: this process, as staging names record it."""
    pid = os.getpid()
    return f"{pid}-{_start_time(pid)}@{_host()}"


def _alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return start == 0 or _start_time(pid) in (0, start)


def remove_stale_staging(folder: Path, *, name: str | None = None, log=print) -> list[Path]:
    """Remove the staging entries in `folder` (for target `name`, or all) whose owner process is gone.

    Entries of a live process, or of another host (whose processes cannot be seen from here), stay.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    here = _host()
    for entry in entries:
        match = _STAGED.match(entry.name)
        if not match or (name is not None and match["name"] != name):
            continue
        pid, start, host = int(match["pid"]), int(match["start"]), match["host"]
        if host != here:
            log(f"note: left {entry}: written by pid {pid} on host {host}; remove it by hand if that run is over")
            continue
        if _alive(pid, start):
            continue
        size = _size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not entry.exists():
            removed.append(entry)
            log(f"removed {entry} ({size / 2**20:.1f} MiB), left by process {pid} that is no longer running")
    return removed


# Paths being written right now, removed by `remove_in_progress` when a signal ends the process.
_IN_PROGRESS: dict[Path, None] = {}


def track(path: Path) -> None:
    _IN_PROGRESS[Path(path)] = None


def untrack(path: Path) -> None:
    _IN_PROGRESS.pop(Path(path), None)


def remove_in_progress() -> None:
    """Remove every staging folder, temporary file and lock this process is writing (newest first)."""
    for path in reversed(list(_IN_PROGRESS)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    _IN_PROGRESS.clear()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for file in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, file)).st_size
    return total


@contextlib.contextmanager
def folder_lock(target: Path, what: str):
    """Hold `.NAME.lock` beside `target` for the block: a second writer is refused, not silently overwriting.

    flock(2) is released by the kernel when the holder dies, even by `kill -9`; the file is removed
    on release (after re-checking, on acquiring, that the path still names the inode locked). Where no
    lock file can be made (no such folder, read-only) the block runs unlocked: it cannot write there
    either, and says so with its own error.
    """
    target = Path(target)
    path = target.parent / f".{target.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UsageError(
                f"{target} is being written by another {what} ({holder}); wait for it to finish or choose another folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file as we opened it: take the new one
    track(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        untrack(path)
