"""One copy of the weights for several graphs: a graph's external tensors pointed at another graph's data file.

`--resolutions` writes the transformer and the VAE once per image size. Their weights are the same
tensors (the same checkpoint, precision and processing; only the shapes of activations, and small
tables such as RoPE's, differ), so each further graph is written as usual and then rewritten here:
every external initializer whose name, type, shape and bytes equal an initializer of the first
graph (or, for a tensor whose name differs, type, shape and bytes alone) is pointed at the first graph's data file (ONNX external data may be shared between graphs,
its `location`/`offset`/`length` are per tensor); what differs goes to a small data file of the
graph's own, and the full copy it was written with is removed.

Bytes are compared, not assumed: a tensor that merely shares a name stays the graph's own. The copy
costs one write and one read of the weights per further size while the export runs (disk: the first
graph plus one further one at a time).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from common.external_data import TensorReader, TensorWriter, _external

_COMPARE_BYTES = 64 * 2**20
OWN_KEYS = "flux2_trt."  # the rewrites' own entries (which layer a Q/DQ belongs to) stay


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    step = _COMPARE_BYTES
    return all(np.array_equal(a[start : start + step], b[start : start + step]) for start in range(0, a.size, step))


def share_weights(primary: Path, graph: Path, keep: tuple[str, ...] = ()) -> dict:
    """Point `graph`'s external tensors at `primary`'s data where they are the same; rewrite `graph` in place.

    The graph's node metadata is dropped except the keys in `keep`: torch's stack traces and scopes are
    most of a graph file's bytes (80 % on the tiny default), a further size's graph is never traced back
    to source, and the rewrites that read scopes have run by now. Returns {"shared": n, "own": n,
    "own_bytes": b, "files": external data files the graph now reads}.
    """
    import onnx

    primary_model = onnx.load(str(primary), load_external_data=False)
    model = onnx.load(str(graph), load_external_data=False)
    primary_reader, reader = TensorReader(primary.parent), TensorReader(graph.parent)
    theirs = {t.name: t for t in primary_model.graph.initializer if _external(t) is not None}
    by_content = _ContentIndex(theirs.values(), primary_reader)
    own_path = graph.with_name(graph.name + ".own.data")
    writer = TensorWriter(own_path)
    shared = own = 0
    old_files, seen, renamed, dropped = set(), {}, {}, []
    for tensor in model.graph.initializer:
        info = _external(tensor)
        if info is None:
            continue
        old_files.add(info["location"])
        values = reader.packed(tensor)
        match = theirs.get(tensor.name)
        if not _same(match, tensor, primary_reader, values):
            match = by_content.find(tensor, values)
        if match is not None:
            del tensor.external_data[:]
            tensor.external_data.extend(match.external_data)
            shared += 1
            continue
        # The exporter folds a copy of a size's own tables (RoPE's) per use: one copy is kept.
        digest = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(values).hexdigest())
        if digest in seen:
            renamed[tensor.name] = seen[digest]
            dropped.append(tensor)
            continue
        seen[digest] = tensor.name
        writer.put(tensor, values)
        own += 1
    writer.close()
    _drop_duplicates(model, renamed, dropped)
    _drop_metadata(model, keep)
    own_bytes = own_path.stat().st_size
    for name in old_files:
        if name != _location(theirs):
            os.unlink(graph.parent / name)
    own_name = graph.name + ".data"
    files = [_location(theirs)] if shared else []
    if own:
        os.replace(own_path, graph.parent / own_name)
        for tensor in model.graph.initializer:
            info = _external(tensor)
            if info is not None and info["location"] == own_path.name:
                _set_location(tensor, own_name)
        files.append(own_name)
    else:
        own_path.unlink()
    onnx.save(model, str(graph))
    return {"shared": shared, "own": own, "own_bytes": own_bytes if own else 0, "files": files}


def _same(match, tensor, primary_reader, values) -> bool:
    return (
        match is not None
        and match.data_type == tensor.data_type
        and list(match.dims) == list(tensor.dims)
        and _same_bytes(primary_reader.packed(match), values)
    )


class _ContentIndex:
    """The primary's tensors found by type, shape and bytes: a graph traced from another module of the same
    model (the step cache's head and tail, export/graphs/step_cache.py) names its folded, transposed weights
    `val_<n>` with other numbers than the full graph does. Each candidate's digest is computed once, and only
    for the shapes asked about."""

    def __init__(self, tensors, reader: TensorReader):
        self.reader = reader
        self.candidates: dict = {}
        for tensor in tensors:
            self.candidates.setdefault((tensor.data_type, tuple(tensor.dims)), []).append(tensor)
        self.digests: dict = {}  # primary tensor name -> sha256

    def find(self, tensor, values: np.ndarray):
        candidates = self.candidates.get((tensor.data_type, tuple(tensor.dims)), [])
        if not candidates:
            return None
        wanted = hashlib.sha256(values).hexdigest()
        for candidate in candidates:
            if candidate.name not in self.digests:
                self.digests[candidate.name] = hashlib.sha256(self.reader.packed(candidate)).hexdigest()
            if self.digests[candidate.name] == wanted and _same_bytes(self.reader.packed(candidate), values):
                return candidate
        return None


def _drop_duplicates(model, renamed: dict, dropped: list) -> None:
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    for tensor in dropped:
        model.graph.initializer.remove(tensor)


def _drop_metadata(model, keep: tuple[str, ...]) -> None:
    for node in model.graph.node:
        kept = [(p.key, p.value) for p in node.metadata_props if p.key in keep or p.key.startswith(OWN_KEYS)]
        del node.metadata_props[:]
        for key, value in kept:
            entry = node.metadata_props.add()
            entry.key, entry.value = key, value
        node.doc_string = ""


def _location(tensors: dict) -> str:
    return _external(next(iter(tensors.values())))["location"] if tensors else ""


def _set_location(tensor, name: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = name
