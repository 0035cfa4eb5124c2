"""`python -m export --transformer-weights FILE`: a single-file transformer in BFL naming replaces the folder's.

The file (the published FLUX.2-dev-NVFP4 files, or a plain bf16 single file) is read by
`export.nvfp4.published` under diffusers' names. The export then runs as it always does, from a
staged checkpoint: a folder beside the output whose entries link to the user's checkpoint, except
`transformer/`, which holds the config and one safetensors file written here, a tensor at a time,
with the file's plain tensors as stored and each NVFP4 weight dequantized to bf16 (what the bf16
graph is traced with and what diffusers' bf16 pipeline draws in the end-to-end check).

The NVFP4 rewrite (`export.nvfp4.rewrite`) does not quantize an imported layer: it writes the file's
own codes, block scales and global scales, and its static `input_scale` where the file has one;
where it has none the activation's global scale is computed in the graph (amax / 2688 per call,
as ComfyUI does). Which layers are NVFP4 is the file's choice, read from its header.

The staged transformer costs bf16's bytes on disk while the export runs (the bf16 graph it is traced
into costs as much again); it is removed when the export ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from common.errors import UsageError
from common.precision import PRECISIONS

NVFP4 = PRECISIONS["nvfp4"]
_SAFETENSORS_DTYPES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}


def open_weights(path: str | Path, checkpoint, precision):
    """The file read and checked against the checkpoint's transformer config; refuses what the export cannot use."""
    from export.nvfp4.published import read_published

    path = Path(path).expanduser().absolute()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(f"--transformer-weights {path} {what}; pass a single-file FLUX.2 transformer (.safetensors)")
    published = read_published(path, checkpoint.configs["transformer"])
    if published.nvfp4_layers and precision.rewrite != NVFP4.rewrite:
        raise UsageError(
            f"--transformer-weights {path} holds {len(published.nvfp4_layers)} NVFP4 layers "
            f"(e.g. {published.nvfp4_layers[0]}); export it with --precision {NVFP4.name}, not {precision}"
        )
    return published


def fingerprint(published) -> dict:
    """What the graphs depend on: the file's name, size, time and a hash of its header (cheap for 20 GB)."""
    stat = published.path.stat()
    with open(published.path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = handle.read(length)
    return {
        "file": str(published.path),
        "bytes": stat.st_size,
        "mtime": int(stat.st_mtime),
        "header_sha256": hashlib.sha256(header).hexdigest(),
        "nvfp4_layers": len(published.nvfp4_layers),
        "static_input_layers": len(published.static_input_layers),
    }


def stage_checkpoint(tensors, checkpoint, folder: Path):
    """A checkpoint at `folder` that is `checkpoint` with these transformer tensors ((name, tensor), streamed); opened."""
    from export import checkpoint as ckpt

    folder.mkdir(parents=True)
    for entry in checkpoint.root.iterdir():
        if entry.name != "transformer":
            os.symlink(entry.absolute(), folder / entry.name)
    transformer = folder / "transformer"
    transformer.mkdir()
    shutil.copy2(checkpoint.component_dir("transformer") / "config.json", transformer / "config.json")
    write_safetensors(transformer / "diffusion_pytorch_model.safetensors", tensors)
    return ckpt.open_checkpoint(folder)


def plain_tensors(published):
    """(name, torch tensor) for every tensor of the file, NVFP4 weights dequantized to bf16, one at a time."""
    import torch

    from common import nvfp4

    for tensor in published.tensors():
        if tensor.is_nvfp4:
            yield tensor.name, torch.from_numpy(nvfp4.dequantize(tensor.value)).to(torch.bfloat16)
        else:
            yield tensor.name, tensor.value


def write_safetensors(path: Path, tensors) -> None:
    """A safetensors file written a tensor at a time (safetensors' own writer holds them all in memory).

    The header comes first in the format but is known only at the end: the data goes to a second
    file and the two are joined (one more sequential copy of the data; a follow-up could stream
    the file's tensors into the export without staging them).
    """
    import torch

    data_path = path.with_name(path.name + ".part")
    header, offset = {}, 0
    with open(data_path, "wb") as data:
        for name, tensor in tensors:
            tensor = tensor.contiguous()
            dtype = _SAFETENSORS_DTYPES[str(tensor.dtype)]
            raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else np.zeros(0, np.uint8)
            header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + raw.nbytes]}
            data.write(raw.tobytes())
            offset += raw.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        shutil.copyfileobj(data, out, 64 * 2**20)
    data_path.unlink()


def remove_staged(folder: Path) -> None:
    """The staged checkpoint: its links and its transformer; never what the links point at."""
    if not folder.exists():
        return
    for entry in folder.iterdir():
        if entry.is_symlink():
            entry.unlink()
    shutil.rmtree(folder, ignore_errors=True)
