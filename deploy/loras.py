"""The LoRA files one served model may apply: `deploy.triton --lora-dir DIR`, a request's `loras` input.

A request names files of DIR by their stem (`DIR/style.safetensors` is `style`). Each file is read and
converted once (`common.lora.read_lora`: diffusers' converters) and kept while it stays the same file:
the cache is keyed by path, size and modification time, so a file replaced in DIR is read again at
its next use and a removed one is forgotten. Every request's set is checked against the artifacts'
LoRA slots (`runtime.lora.check_loras`); what cannot be served is a BadRequest (HTTP 400) in one line.
No Triton here: unit-tested without a server.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import UsageError
from common.lora import read_lora
from deploy.request import BadRequest
from runtime.lora import check_loras

SUFFIX = ".safetensors"


class LoraFolder:
    def __init__(self, folder: Path, *, artifacts_folder: Path, shapes):
        self.folder = Path(folder)
        self.artifacts_folder = artifacts_folder
        self.shapes = shapes
        self._read: dict[Path, tuple[tuple[int, int], object]] = {}  # path -> ((size, mtime_ns), Lora)

    def names(self) -> list[str]:
        """The stems a request may name, listed at each request: a file added to DIR is servable at once."""
        return sorted(p.stem for p in self.folder.glob(f"*{SUFFIX}") if p.is_file())

    def open(self, wanted: tuple[tuple[str, float], ...]) -> tuple:
        """(name, scale) pairs -> (Lora, scale) pairs the slots take, for Flux2Runtime.use_loras; BadRequest else."""
        if not wanted:
            return ()
        names = self.names()
        unknown = [name for name, _ in wanted if name not in names]
        if unknown:
            held = ", ".join(names) if names else "no .safetensors files"
            raise BadRequest(f"loras: no LoRA named {unknown[0]!r} in this model's --lora-dir; it holds: {held}")
        self._forget_removed(names)
        try:
            opened = tuple((self._lora(self.folder / f"{name}{SUFFIX}"), scale) for name, scale in wanted)
            check_loras(opened, self.artifacts_folder, self.shapes)
        except UsageError as exc:  # a damaged file, another model's, a rank past the slots
            raise BadRequest(f"loras: {exc}") from None
        return opened

    def _lora(self, path: Path):
        try:
            status = path.stat()
        except FileNotFoundError:
            raise UsageError(f"LoRA {path} was removed while the request was read; send the request again") from None
        stamp = (status.st_size, status.st_mtime_ns)
        cached = self._read.get(path)
        if cached is None or cached[0] != stamp:
            self._read[path] = (stamp, read_lora(path))
        return self._read[path][1]

    def _forget_removed(self, names: list[str]) -> None:
        present = {self.folder / f"{name}{SUFFIX}" for name in names}
        for path in [p for p in self._read if p not in present]:
            del self._read[path]


def same_loras(one: tuple, other: tuple) -> bool:
    """Whether two (Lora, scale) sets are the same files at the same scales (the cache hands out one object per file)."""
    return len(one) == len(other) and all(a is b and s == t for (a, s), (b, t) in zip(one, other, strict=True))
