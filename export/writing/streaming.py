"""Streaming export: trace a module that holds no weights, then stream them from safetensors into the ONNX file.

Loading a module and exporting it holds a copy of every weight that changes dtype on the way
(measured on a full-width FLUX.2 [dev] 1+1 slice: 4.77 GiB of anonymous memory for 4.26 GiB of
bf16 weights exported to fp16, ~65 GiB for the real transformer). Here the weights never become
a module's memory:

1. The exportable module is built with its parameters on the meta device (accelerate's
   `init_empty_weights`, as diffusers' `from_pretrained` does) and the default dtype set to the
   target, as `from_pretrained(torch_dtype=...)` does. Buffers stay real: non-persistent ones
   (the rotary `inv_freq`) come from their constructors, persistent ones (the VAE's BatchNorm
   statistics) are read from the checkpoint, and the graph wrappers derive theirs (the
   transformer's RoPE tables, the VAE's `bn_mean`/`bn_std`) exactly as in the plain path.
2. Buffers are set aside, every parameter and buffer becomes a fake CPU tensor (shape and dtype,
   no storage; not meta, so that operators dispatch as on the CPU, as in the plain path), and
   dynamo traces it (`optimize=False`): the graph's initializers are named by parameter path.
3. Buffers get their values back. Weights small enough for the optimizer to fold (onnxscript's
   input size limit) are read now, so it folds them as in the plain path; every other weight
   becomes a `StreamedWeight` that reads nothing until it is written.
4. `Transpose(weight)`, which the optimizer always folds into a transposed copy, becomes a
   transposed `StreamedWeight` instead.
5. onnxscript's optimizer runs as `torch.onnx.export(optimize=True)` runs it, with the streamed
   weights sealed: reading one there is a bug and raises. It removes what TensorRT cannot parse
   (SequenceAt and friends) and folds the shape arithmetic.
6. `onnx_ir.save` writes the external-data file; each streamed weight writes itself in chunks of
   `CHUNK_BYTES`: read from safetensors, cast to the target dtype as `Tensor.to` does in
   `from_pretrained`, transposed where folded.

So peak memory is the traced graph plus one chunk, whatever the model size and precision.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from common.dtypes import numpy_view, torch_of_ir
from common.errors import CheckpointError, InternalError
from common.precision import precision as declared
from common.specs import ComponentSpec, Geometry, Shapes
from export import checkpoint as ckpt
from export.components import COMPONENTS
from export.graphs.fp16_linear import check_attention_scores, check_float16, check_row_scales, row_scales, scale_rows
from export.writing.trace import check_graph, data_file_name, example_inputs, trace

# Bytes of target-precision data a streamed weight holds at once while it is written.
CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class WeightRef:
    """Where one tensor lives: a safetensors file and its key there."""

    file: Path
    key: str
    shape: tuple[int, ...]


@dataclass
class WeightlessGraph:
    """An exportable module whose tensors hold no data, with what it needs to become real again."""

    module: object  # torch.nn.Module; every parameter and buffer is a fake CPU tensor
    fake_mode: object  # the FakeTensorMode those tensors belong to; example inputs are made in it
    buffers: dict  # initializer name -> real torch.Tensor (buffers and derived tables)
    weights: dict  # initializer name -> WeightRef
    # initializer name of a weight -> its float32 row scales (the fp16 transformer's linears,
    # export.graphs.fp16_linear): the weight is written divided by them.
    row_scales: dict = dataclasses.field(default_factory=dict)


def _open_safetensors(file: Path):
    """The one place weights are opened (tests wrap it to see which tensors are read)."""
    from safetensors import safe_open

    return safe_open(str(file), framework="pt")


def checkpoint_weights(folder: Path, wanted, rename=None) -> dict[str, WeightRef]:
    """Where each of the `wanted` tensors of a component folder lives; reads safetensors headers only.

    Keys are matched after `rename` (the text encoder's language-model prefixes); tensors that no
    wanted name matches (a vision tower, an lm_head, layers after the cut) are never read.
    """
    refs: dict[str, WeightRef] = {}
    for file in ckpt.weight_files(folder):
        with _open_safetensors(file) as handle:
            for key in handle.keys():
                name = rename(key) if rename else key
                if name not in wanted:
                    continue
                if name in refs:
                    raise CheckpointError(
                        f"{folder} holds two tensors for {name} ({refs[name].key} in {refs[name].file.name} and "
                        f"{key} in {file.name}); remove the duplicate from the checkpoint"
                    )
                refs[name] = WeightRef(file, key, tuple(handle.get_slice(key).get_shape()))
    return refs


def read_tensor(ref: WeightRef):
    with _open_safetensors(ref.file) as handle:
        return handle.get_tensor(ref.key)


def build_weightless_graph(
    component: str, checkpoint: ckpt.Checkpoint, geometry: Geometry, shapes: Shapes, precision: str
) -> WeightlessGraph:
    """The exportable module of `component` holding no weights, and the sources of its initializers."""
    import torch

    declaration = COMPONENTS[component]
    folder = declaration.weights_dir(checkpoint)
    model, rename = declaration.empty(checkpoint, geometry, declared(precision).torch_dtype())
    wanted = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    refs = checkpoint_weights(folder, wanted, rename)
    missing = [name for name, _ in model.named_parameters() if name not in refs]
    if missing:
        raise CheckpointError(
            f"{folder} has no weight for {len(missing)} parameter(s) of {type(model).__name__}, e.g. {missing[0]}; "
            "the checkpoint does not match its config.json: re-download it"
        )
    # Persistent buffers (the VAE's BatchNorm statistics) are checkpoint tensors: a few small
    # ones, read now and cast into the buffer's dtype as loading does.
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, buffer in module.named_buffers(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if name not in module._non_persistent_buffers_set and full in refs:
                    buffer.copy_(read_tensor(refs[full]))
    model.eval()
    graph = declaration.wrap(model, geometry, shapes).eval()
    buffers = {name: buffer.detach().clone() for name, buffer in graph.named_buffers()}
    weights = {declaration.initializer_prefix + name: refs[name] for name, _ in model.named_parameters()}
    row_scales = {}
    scaled = getattr(graph, "row_scaled", {})
    for weight, scale in _scan_progress(scaled.items(), weights, component):
        row_scales[weight] = buffers[scale] = weight_row_scales(weights[weight])
    if scaled and declared(precision).torch_dtype() == torch.float16:
        rest = {name: read_tensor(ref) for name, ref in weights.items() if name not in scaled}
        for name, tensor in rest.items():  # the small rest (norms, biases), as attach_weights reads them
            ref = weights[name]
            check_float16(tensor.to(torch.float16), tensor, f"weight {ref.key} in {ref.file}")
        check_attention_scores(rest, f"{folder}")
    return WeightlessGraph(graph, _make_fake(graph), buffers, weights, row_scales)


# Weights read before tracing (the fp16 row scales) show a progress bar past this many bytes.
SCAN_PROGRESS_BYTES = 2**30


def _scan_progress(items, weights: dict, component: str):
    """`items`, with a progress bar over the weights they read where that is long work (real checkpoints)."""
    items = list(items)
    total = sum(math.prod(weights[name].shape) * 2 for name, _ in items)
    if total < SCAN_PROGRESS_BYTES:
        return items
    import sys

    from tqdm import tqdm

    return tqdm(items, desc=f"{component:<12} fp16 row scales", unit="weight", file=sys.stderr)


def weight_row_scales(ref: WeightRef):
    """The fp16 row scales of one stored weight, read in row blocks of ~CHUNK_BYTES of float32."""
    import torch

    rows, row_elements = ref.shape[0], math.prod(ref.shape[1:])
    step = max(1, CHUNK_BYTES // max(1, row_elements * 4))
    parts = []
    with _open_safetensors(ref.file) as handle:
        source = handle.get_slice(ref.key)
        for start in range(0, rows, step):
            block = source[start : start + step]
            scales = row_scales(block)
            check_row_scales(scales, block, f"weight {ref.key} in {ref.file}", start)
            parts.append(scales)
    return torch.cat(parts)


def _make_fake(module):
    """Replace every parameter and buffer by a fake CPU tensor (shape and dtype, no storage).

    Not meta tensors: operators dispatch on the device, and the plain path traces on the CPU
    (SDPA, for one, decomposes differently on meta), so the graph would differ from it.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    with fake_mode:
        for submodule in module.modules():
            for name, param in list(submodule._parameters.items()):
                if param is not None:
                    fake = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                    submodule._parameters[name] = torch.nn.Parameter(fake, requires_grad=False)
            for name, buffer in list(submodule._buffers.items()):
                if buffer is not None:
                    submodule._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")
    return fake_mode


# --- onnx_ir tensors -----------------------------------------------------------------------


def cast_weight(tensor, dtype, row_scale, where: str):
    """A checkpoint tensor in the graph's dtype, as `Tensor.to` casts it in `from_pretrained`; divided by
    its fp16 row scales first where it has them. A value that float16 cannot hold is refused, naming it."""
    if row_scale is not None:
        return scale_rows(tensor, row_scale, dtype)
    out = tensor.to(dtype)
    check_float16(out, tensor, where)
    return out


def _ir_tensor(tensor, name: str):
    return ir.Tensor(numpy_view(tensor), name=name)


def _ir_dtype_of(dtype):
    return next(ir_dtype for ir_dtype, candidate in torch_of_ir().items() if candidate == dtype)


class StreamedWeight(ir.LazyTensor):
    """A weight that stays in its safetensors file until written: then chunk by chunk, cast, transposed if folded.

    `numpy()`/`tobytes()` still work (they read the whole tensor), except while `sealed`.
    """

    def __init__(self, ref: WeightRef, dtype, *, transposed: bool = False, name: str | None = None, row_scale=None):
        shape = ref.shape[::-1] if transposed else ref.shape
        super().__init__(self._materialize, dtype=_ir_dtype_of(dtype), shape=ir.Shape(shape), name=name)
        self.ref = ref
        self.torch_dtype = dtype
        self.transposed = transposed
        self.row_scale = row_scale  # float32 [rows of the stored weight], or None
        self.sealed = False

    def transpose(self, name: str | None = None) -> StreamedWeight:
        return StreamedWeight(
            self.ref, self.torch_dtype, transposed=not self.transposed, name=name, row_scale=self.row_scale
        )

    def _check_open(self) -> None:
        if self.sealed:
            raise InternalError(
                f"weight {self.ref.key} of {self.ref.file} was read while the graph was being "
                "optimised; the streaming export would hold every weight in memory"
            )

    def _materialize(self):
        self._check_open()
        tensor = cast_weight(read_tensor(self.ref), self.torch_dtype, self.row_scale, self._where())
        return _ir_tensor(tensor.T if self.transposed else tensor, self.name)

    def _where(self, start: int = 0) -> str:
        return f"weight {self.ref.key} in {self.ref.file}" + (f" (from row {start})" if start else "")

    def chunks(self):
        """The target-precision tensor as consecutive row blocks of at most ~CHUNK_BYTES.

        Each block is valid until the next one is asked for: the buffers are reused, so that
        memory stays at two blocks (fresh ones per block fragment the heap: measured ~9 blocks).
        """
        import torch

        self._check_open()
        dtype = self.torch_dtype
        itemsize = max(1, int(self.dtype.itemsize))
        with _open_safetensors(self.ref.file) as handle:
            if not self.ref.shape:
                yield cast_weight(handle.get_tensor(self.ref.key), dtype, None, self._where())
                return
            source = handle.get_slice(self.ref.key)  # a view of the memory-mapped file
            if self.transposed:
                yield from self._transposed_chunks(source, itemsize)
                return
            length, row = self.ref.shape[0], self.ref.shape[1:]
            step = max(1, min(length, CHUNK_BYTES // max(1, math.prod(row) * itemsize)))
            buffer = None
            for start in range(0, length, step):
                view = source[start : start + step]
                if view.dtype == dtype and self.row_scale is None:
                    yield view  # same dtype: straight from the file's pages, no copy
                    continue
                if self.row_scale is not None:
                    yield scale_rows(view, self.row_scale[start : start + view.shape[0]], dtype)
                    continue
                if buffer is None:
                    buffer = torch.empty((step, *row), dtype=dtype)
                out = buffer[: view.shape[0]]
                out.copy_(view)
                check_float16(out, view, self._where(start))
                yield out

    def _transposed_chunks(self, source, itemsize: int):
        import torch

        dtype = self.torch_dtype
        rows, cols = self.ref.shape  # of the stored weight; the output is [cols, rows]
        step = max(1, min(cols, CHUNK_BYTES // (rows * itemsize)))
        # Cast into a contiguous block, then transpose: transposing the strided view of
        # the file directly is ~6x slower (measured, bf16 to bf16).
        block = torch.empty((rows, step), dtype=dtype)
        flipped = torch.empty((step, rows), dtype=dtype)
        for start in range(0, cols, step):
            width = min(step, cols - start)
            part = block if width == step else torch.empty((rows, width), dtype=dtype)
            view = source[:, start : start + width]
            if self.row_scale is None:
                part.copy_(view)
                check_float16(part, view, self._where())
            else:
                part.copy_(scale_rows(view, self.row_scale, dtype))
            out = flipped[:width]
            out.copy_(part.T)
            yield out

    def tofile(self, file) -> None:
        import torch

        for chunk in self.chunks():
            file.write(chunk.reshape(-1).view(torch.uint8).numpy().data)


def attach_weights(model, hollow: WeightlessGraph, *, eager_max_elements: int) -> list:
    """Give every initializer of the traced graph its value; returns the streamed weights."""
    streamed = []
    for name, value in model.graph.initializers.items():
        placeholder = value.const_value
        dtype = torch_of_ir()[placeholder.dtype]
        shape = tuple(placeholder.shape)
        if name in hollow.buffers:
            tensor = hollow.buffers[name]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise InternalError(
                    f"buffer {name} is {tensor.dtype}{list(tensor.shape)}, the graph wants {dtype}{list(shape)}"
                )
            value.const_value = _ir_tensor(tensor, name)
        elif name in hollow.weights:
            ref = hollow.weights[name]
            if ref.shape != shape:
                raise CheckpointError(
                    f"weight {ref.key} in {ref.file} has shape {list(ref.shape)}, the model's config wants "
                    f"{list(shape)}; the checkpoint does not match its config.json"
                )
            scales = hollow.row_scales.get(name)
            if math.prod(shape) <= eager_max_elements:
                tensor = cast_weight(read_tensor(ref), dtype, scales, f"weight {ref.key} in {ref.file}")
                value.const_value = _ir_tensor(tensor, name)
            else:
                value.const_value = StreamedWeight(ref, dtype, name=name, row_scale=scales)
                streamed.append(value.const_value)
        else:
            raise InternalError(
                f"graph initializer {name} is neither a weight nor a buffer of the module; "
                "the streaming export cannot give it a value"
            )
    return streamed


def fold_weight_transposes(model) -> int:
    """Replace Transpose(weight) by a transposed streamed weight, as the optimizer would fold it."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        weight = source.const_value
        if not isinstance(weight, StreamedWeight) or not source.is_initializer() or len(weight.shape) != 2:
            continue
        perm = node.attributes.get_ints("perm", [1, 0])
        if list(perm) != [1, 0] or len(source.uses()) != 1:  # the optimizer folds single-use weights only
            continue
        output = node.outputs[0]
        if output.is_graph_output():
            continue
        name = output.name
        folded_value = ir.Value(name=name, shape=ir.Shape(weight.shape[::-1]), type=ir.TensorType(weight.dtype))
        folded_value.const_value = weight.transpose(name)
        output.replace_all_uses_with(folded_value)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        output.name = None
        graph.register_initializer(folded_value)
        folded += 1
    return folded


def optimize_sealed(model, streamed: list) -> None:
    """onnxscript's optimizer as torch.onnx.export(optimize=True) runs it, never reading a streamed weight."""
    from onnxscript.optimizer import optimize_ir

    def should_fold(node):
        if any(v is not None and isinstance(v.const_value, StreamedWeight) for v in node.inputs):
            return False
        return None

    for weight in streamed:
        weight.sealed = True
    try:
        optimize_ir(model, should_fold=should_fold)
    finally:
        for weight in streamed:
            weight.sealed = False


def export_streaming(hollow: WeightlessGraph, spec: ComponentSpec, path: Path) -> dict:
    """Write the graph of `hollow` (`build_weightless_graph`) to `path` (+ `path.data`); facts for the manifest."""
    from onnxscript.optimizer import _constant_folding

    with hollow.fake_mode:
        example = example_inputs(spec)
    program = trace(hollow.module, example, spec, optimize=False)
    model = program.model
    del program
    streamed = attach_weights(
        model, hollow, eager_max_elements=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT
    )
    fold_weight_transposes(model)
    optimize_sealed(model, streamed)
    ir.save(model, path, external_data=data_file_name(path.name))
    return check_graph(path, spec)
