"""Initializers in external data, read and written one tensor at a time.

A graph is loaded without its weights (`onnx.load(..., load_external_data=False)`); each tensor
is memory-mapped from the data file when it is needed and appended to the new data file in
chunks. A rewrite of a 60 GiB graph then holds one converted tensor in memory, not the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.dtypes import numpy_of_onnx


def _external(tensor) -> dict[str, str] | None:
    if not tensor.external_data:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


CHUNK_ELEMENTS = 1 << 24  # temporaries while converting one tensor stay at ~64 MiB per float32 copy


class TensorReader:
    """Reads initializers of a graph loaded without external data, from `folder`.

    External tensors are memory-mapped, not read: their pages are file-backed and the kernel drops
    them as needed, so converting a 600 MiB weight does not cost 600 MiB of anonymous memory.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def array(self, tensor) -> np.ndarray:
        info = _external(tensor)
        if info is None:
            from onnx import numpy_helper

            return numpy_helper.to_array(tensor)
        dtype = numpy_of_onnx(tensor.data_type)
        count = int(info["length"]) // dtype.itemsize
        if count == 0:
            return np.zeros(tuple(tensor.dims), dtype)
        path = self.folder / info["location"]
        return np.memmap(path, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))

    def packed(self, tensor) -> np.ndarray:
        """A tensor's stored bytes as uint8 (4-bit types pack two elements per byte: `array` cannot shape them)."""
        info = _external(tensor)
        if info is None:
            return np.frombuffer(tensor.raw_data, dtype=np.uint8)
        length = int(info["length"])
        path = self.folder / info["location"]
        return np.memmap(path, dtype=np.uint8, mode="r", offset=int(info.get("offset", 0)), shape=(length,))


def flat_chunks(values: np.ndarray):
    """(start, chunk) views over a tensor's elements, CHUNK_ELEMENTS at a time."""
    flat = values.reshape(-1)
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        yield start, flat[start : start + CHUNK_ELEMENTS]


class TensorWriter:
    """Appends tensors to one external-data file and points their TensorProto at it."""

    ALIGN = 64

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handle = open(self.path, "wb")  # noqa: SIM115
        self.offset = 0

    def put(self, tensor, values: np.ndarray) -> None:
        from onnx import TensorProto

        pad = (-self.offset) % self.ALIGN
        if pad:
            self.handle.write(b"\0" * pad)
            self.offset += pad
        for _, chunk in flat_chunks(values):
            self.handle.write(np.ascontiguousarray(chunk).view(np.uint8))
        del tensor.external_data[:]
        tensor.ClearField("raw_data")
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(values.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL
        self.offset += values.nbytes

    def close(self):
        self.handle.close()


def copy_with_external_data(model, source_folder: Path, target: Path, transform=None) -> None:
    """Write `model` to `target` + `target.data`, reading external tensors from `source_folder`.

    `transform(tensor, reader)` may return a new array for a tensor (it may also change the
    tensor's data_type in place); tensors with inline data stay inline.
    """
    import onnx

    target = Path(target)
    data_path = target.with_name(target.name + ".data")
    reader, writer = TensorReader(source_folder), TensorWriter(data_path)
    try:
        for tensor in model.graph.initializer:
            values = transform(tensor, reader) if transform else None
            if values is None and _external(tensor) is not None:
                values = reader.array(tensor)
            if values is not None:
                writer.put(tensor, values)
            del values
    finally:
        writer.close()
    onnx.save_model(model, str(target))
