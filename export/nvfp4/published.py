"""The published FLUX.2 NVFP4 transformer file (black-forest-labs/FLUX.2-dev-NVFP4), read into the
project's canonical NVFP4 form (common/nvfp4.py) under diffusers' names.

The file's layout, as comfy-kitchen 0.2.40 writes and reads it (`comfy_kitchen/tensor/nvfp4.py`,
`backends/eager/quantization.py`, `float_utils.to_blocked`) and ComfyUI loads it (`comfy/ops.py`:
`weight_scale_2` is the layout's `scale`, `weight_scale` its `block_scale`; `comfy/utils.py`
`convert_old_quants` reads the header's layer list):
- one safetensors file in BFL's key names (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`,
  `final_layer.adaLN_modulation.1` ...); `__metadata__["_quantization_metadata"]` is JSON
  `{"layers": {"<layer>": {"format": "nvfp4"}, ...}}` naming the NVFP4 layers;
- an NVFP4 layer holds `weight` U8 [N, K/2] with element 2j in the HIGH nibble (comfy-kitchen's
  `hi_first=True`), `weight_scale` F8_E4M3 block scales in cuBLAS' 128x4 tiled order, zero-padded
  to [roundup(N, 128), roundup(K/16, 4)], `weight_scale_2` F32 0-d (the global scale, amax / 2688)
  and, where the activation scale is static, `input_scale` F32 0-d (the input's global scale);
- every other tensor is plain (bf16 as published).

Names go through diffusers' own converter (`convert_flux2_transformer_checkpoint_to_diffusers`):
it is run once over stand-in tensors whose values are their own row numbers, which tells for each
diffusers tensor the file tensor and the rows it takes (fused qkv split by rows, the final
modulation's (shift, scale) halves swapped). The same rows are then taken from an NVFP4 layer's
codes and unswizzled block scales; its global scales are shared by the pieces.

Only the header is read when opening; tensors are read one at a time (the real file is ~20 GB).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InternalError, UsageError
from common.nvfp4 import BLOCK, Nvfp4Tensor

QUANTIZATION_METADATA = "_quantization_metadata"
# A layer's format in that metadata: the key of ComfyUI's QUANT_ALGOS (comfy/quant_ops.py), a name of
# the file's, not the project's precision (common/precision.py).
LAYER_FORMAT = "nvfp4"
# What ComfyUI's loaders prefix a diffusion model's keys with; a file saved from ComfyUI may carry it.
_COMFY_PREFIX = "model.diffusion_model."
_SCALE_PARTS = ("weight_scale", "weight_scale_2", "input_scale")
_PLAIN_DTYPES = ("BF16", "F16", "F32")
_PROBE_STRIDE = 1 << 24  # stand-in value = file tensor index * stride + row; float64 holds it exactly


def roundup(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def swizzled_scales_shape(rows: int, blocks: int) -> tuple[int, int]:
    """The shape of [rows, blocks] block scales in cuBLAS' 128x4 tiles (padded with zeros)."""
    return roundup(rows, 128), roundup(blocks, 4)


def unswizzle_block_scales(tiled: np.ndarray, rows: int, blocks: int) -> np.ndarray:
    """Block scales from cuBLAS' 128x4 tiled order back to row-major [rows, blocks].

    The tiled buffer, read flat, runs over (row tile, column tile, row % 32, (row % 128) // 32,
    column % 4) (cuBLAS' "1D block scaling factors layout"; comfy-kitchen's `to_blocked`).
    """
    padded_rows, padded_blocks = swizzled_scales_shape(rows, blocks)
    if tiled.size != padded_rows * padded_blocks:
        raise ValueError(f"tiled block scales hold {tiled.size} values, expected {padded_rows}x{padded_blocks}")
    tiles = np.ascontiguousarray(tiled).reshape(padded_rows // 128, padded_blocks // 4, 32, 4, 4)
    plain = tiles.transpose(0, 3, 2, 1, 4).reshape(padded_rows, padded_blocks)
    return np.ascontiguousarray(plain[:rows, :blocks])


def swap_nibbles(packed: np.ndarray) -> np.ndarray:
    """Even element high (comfy-kitchen, the published file) <-> even element low (ONNX, canonical)."""
    packed = np.asarray(packed, dtype=np.uint8)
    return ((packed << 4) | (packed >> 4)).astype(np.uint8)


@dataclass(frozen=True)
class PublishedTensor:
    """One tensor of the diffusers state dict, read from the file."""

    name: str  # diffusers' key, e.g. transformer_blocks.0.attn.to_q.weight
    source: str  # the file's key it came from, e.g. double_blocks.0.img_attn.qkv.weight
    value: object  # torch.Tensor in the file's dtype (plain) or Nvfp4Tensor (canonical layout)
    input_scale: np.float32 | None = None  # static activation global scale; None: plain, or dynamic

    @property
    def is_nvfp4(self) -> bool:
        return isinstance(self.value, Nvfp4Tensor)


@dataclass(frozen=True)
class _Plan:
    source: str  # file key (an NVFP4 layer's `.weight`)
    rows: np.ndarray  # int64 rows of the source, in order
    nvfp4: bool


@dataclass(frozen=True)
class PublishedTransformer:
    """The header of a published transformer file, checked against a config; tensors read on demand."""

    path: Path
    prefix: str  # "" or ComfyUI's "model.diffusion_model."
    names: tuple[str, ...]  # diffusers keys, in the model's state-dict order
    nvfp4_layers: tuple[str, ...]  # BFL layer names the header declares NVFP4
    static_input_layers: tuple[str, ...]  # those of them with an `input_scale`
    _plans: Mapping[str, _Plan]

    @property
    def nvfp4_names(self) -> tuple[str, ...]:
        """Diffusers keys whose value is an Nvfp4Tensor."""
        return tuple(name for name in self.names if self._plans[name].nvfp4)

    @property
    def static_input_names(self) -> tuple[str, ...]:
        """Diffusers keys of NVFP4 weights whose layer has a static `input_scale` in the file."""
        static = set(self.static_input_layers)
        return tuple(n for n in self.nvfp4_names if self._plans[n].source.removesuffix(".weight") in static)

    def tensors(self) -> Iterator[PublishedTensor]:
        """Every tensor, one at a time, in state-dict order."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            for name in self.names:
                yield self._read(handle, name)

    def tensor(self, name: str) -> PublishedTensor:
        from safetensors import safe_open

        if name not in self._plans:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            return self._read(handle, name)

    def _read(self, handle, name: str) -> PublishedTensor:
        plan = self._plans[name]
        key = self.prefix + plan.source
        if not plan.nvfp4:
            return PublishedTensor(name, plan.source, _take_rows(handle, key, plan.rows))
        layer = key.removesuffix(".weight")
        codes = _take_rows(handle, key, plan.rows).numpy()
        rows, half = handle.get_slice(key).get_shape()
        tiled = _float8_e4m3(handle.get_tensor(f"{layer}.weight_scale"))
        block_scales = unswizzle_block_scales(tiled, rows, 2 * half // BLOCK)[plan.rows]
        global_scale = np.float32(handle.get_tensor(f"{layer}.weight_scale_2").item())
        input_scale = None
        if f"{layer}.input_scale" in handle.keys():
            input_scale = np.float32(handle.get_tensor(f"{layer}.input_scale").item())
        value = Nvfp4Tensor(swap_nibbles(codes), np.ascontiguousarray(block_scales), global_scale)
        return PublishedTensor(name, plan.source, value, input_scale)


def read_published(path: str | Path, config: Mapping) -> PublishedTransformer:
    """Open a single-file FLUX.2 transformer in BFL naming (the published NVFP4 files, or plain bf16)
    and check every tensor's name, dtype and shape against the transformer `config` (config.json's
    dict). Reads the header only; refuses, in one line naming the first mismatching tensor, a file
    that does not match."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"transformer weights {path} is not a file; expected a FLUX.2 single-file .safetensors")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            header = {
                key: (handle.get_slice(key).get_dtype(), tuple(handle.get_slice(key).get_shape()))
                for key in handle.keys()
            }
    except SafetensorError as error:
        raise UsageError(
            f"transformer weights {path} is not a readable safetensors file ({_one_line(error)}); "
            "it may be truncated or damaged: download it again"
        ) from None
    prefix = _COMFY_PREFIX if header and all(key.startswith(_COMFY_PREFIX) for key in header) else ""
    header = {key.removeprefix(prefix): entry for key, entry in header.items()}
    layers = _nvfp4_layers(path, metadata, header, prefix)
    base = _check_layers(path, header, layers)
    plans = _plans_from_converter(base, layers)
    names = _check_against_config(path, header, plans, config)
    static = tuple(layer for layer in layers if f"{layer}.input_scale" in header)
    return PublishedTransformer(path, prefix, names, tuple(layers), static, plans)


def _nvfp4_layers(path: Path, metadata: Mapping, header: Mapping, prefix: str) -> list[str]:
    """The layers the header's `_quantization_metadata` declares NVFP4 (BFL names, prefix removed)."""
    quantized = sorted(key for key in header if key.rpartition(".")[2] in _SCALE_PARTS or header[key][0] == "U8")
    raw = metadata.get(QUANTIZATION_METADATA)
    if raw is None:
        if quantized:
            raise UsageError(
                f"transformer weights {path} holds quantized tensors ({quantized[0]}) but its header has no "
                f"__metadata__[{QUANTIZATION_METADATA!r}] naming its NVFP4 layers; expected the published "
                "FLUX.2-dev-NVFP4 layout"
            )
        return []
    try:
        declared = json.loads(raw)["layers"]
        if not isinstance(declared, dict):
            raise TypeError("layers is not an object")
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"transformer weights {path}: __metadata__[{QUANTIZATION_METADATA!r}] is not JSON with a "
            f'"layers" object ({_one_line(error)}); expected {{"layers": {{"<layer>": {{"format": "nvfp4"}}}}}}'
        ) from None
    layers = []
    for layer, conf in declared.items():
        fmt = conf.get("format") if isinstance(conf, dict) else conf
        if fmt != LAYER_FORMAT:
            raise UsageError(
                f"transformer weights {path}: layer {layer} is declared {fmt!r}; only NVFP4 layers "
                '({"format": "nvfp4"}) and plain bf16 tensors can be imported'
            )
        layers.append(layer.removeprefix(prefix))
    return layers


def _check_layers(path: Path, header: Mapping, layers: list[str]) -> dict[str, tuple[int, ...]]:
    """Every declared layer has its NVFP4 parts, every other tensor is plain; the shape of each file
    tensor that diffusers' converter will see (an NVFP4 weight's logical [N, K])."""
    base: dict[str, tuple[int, ...]] = {}
    declared = set(layers)
    for layer in layers:
        weight = f"{layer}.weight"
        expected = {weight: "U8", f"{layer}.weight_scale": "F8_E4M3", f"{layer}.weight_scale_2": "F32"}
        for key, dtype in expected.items():
            if key not in header:
                raise UsageError(
                    f"transformer weights {path}: NVFP4 layer {layer} has no {key}; the file is incomplete"
                )
            if header[key][0] != dtype:
                raise UsageError(f"transformer weights {path}: {key} is {header[key][0]}, expected {dtype} (NVFP4)")
        rows, half = _two_d(path, weight, header[weight][1])
        if (2 * half) % BLOCK:
            raise UsageError(
                f"transformer weights {path}: {weight} packs {2 * half} columns, not a multiple of {BLOCK}"
            )
        wanted = swizzled_scales_shape(rows, 2 * half // BLOCK)
        if header[f"{layer}.weight_scale"][1] != wanted:
            raise UsageError(
                f"transformer weights {path}: {layer}.weight_scale has shape {list(header[f'{layer}.weight_scale'][1])}, "
                f"expected {list(wanted)} (block scales of a [{rows}, {2 * half}] weight in cuBLAS' 128x4 tiles)"
            )
        for part in ("weight_scale_2", "input_scale"):
            key = f"{layer}.{part}"
            if key in header and (header[key][0] != "F32" or header[key][1] not in ((), (1,))):
                raise UsageError(
                    f"transformer weights {path}: {key} is {header[key][0]} {list(header[key][1])}, expected F32 0-d"
                )
        base[weight] = (rows, 2 * half)
    for key, (dtype, shape) in header.items():
        layer, _, part = key.rpartition(".")
        if layer in declared and part != "bias":  # a bias stays plain beside NVFP4 weights
            if part not in ("weight", *_SCALE_PARTS):
                raise UsageError(f"transformer weights {path}: {key} is not a part of NVFP4 layer {layer}")
            continue
        if part in _SCALE_PARTS or dtype not in _PLAIN_DTYPES:
            raise UsageError(
                f"transformer weights {path}: {key} is {dtype}, expected a plain {'/'.join(_PLAIN_DTYPES)} tensor "
                f"(only the layers the header's {QUANTIZATION_METADATA} declares NVFP4 hold quantized parts)"
            )
        base[key] = shape
    return base


def _two_d(path: Path, key: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise UsageError(f"transformer weights {path}: {key} has shape {list(shape)}, expected 2-d packed NVFP4 codes")
    return shape[0], shape[1]


def _plans_from_converter(base: Mapping[str, tuple[int, ...]], layers: list[str]) -> dict[str, _Plan]:
    """Diffusers key -> (file key, rows), learned by running diffusers' converter over stand-ins."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    keys = list(base)
    probes = {}
    for index, key in enumerate(keys):
        rows = base[key][0] if base[key] else 1
        if rows >= _PROBE_STRIDE:
            raise InternalError(f"{key}: {rows} rows exceed the stand-in encoding")
        probes[key] = torch.arange(rows, dtype=torch.float64) + float(index * _PROBE_STRIDE)
    converted = convert_flux2_transformer_checkpoint_to_diffusers(probes)
    nvfp4 = {f"{layer}.weight" for layer in layers}
    plans = {}
    for name, probe in converted.items():
        values = probe.reshape(-1).to(torch.int64).numpy()
        sources = np.unique(values // _PROBE_STRIDE)
        if sources.size != 1:
            raise InternalError(f"diffusers' converter made {name} from several file tensors; not supported")
        source = keys[int(sources[0])]
        plans[name] = _Plan(source, values % _PROBE_STRIDE, source in nvfp4)
    return plans


def _check_against_config(path: Path, header: Mapping, plans: Mapping[str, _Plan], config: Mapping) -> tuple[str, ...]:
    expected = expected_shapes(config)
    for name, plan in plans.items():
        if name not in expected:
            raise UsageError(
                f"transformer weights {path}: {plan.source} (diffusers {name}) is not a tensor of the folder's "
                "transformer config; the file is for another model"
            )
    for name, shape in expected.items():
        if name not in plans:
            raise UsageError(
                f"transformer weights {path} has no tensor for diffusers {name} {list(shape)}; the file is for "
                "another model or incomplete"
            )
        plan = plans[name]
        dtype, file_shape = header[plan.source]
        got = (len(plan.rows), 2 * file_shape[1]) if plan.nvfp4 else (len(plan.rows), *file_shape[1:])
        if not file_shape:
            got = ()
        if got != tuple(shape):
            raise UsageError(
                f"transformer weights {path}: {plan.source} gives diffusers {name} shape {list(got)}, the folder's "
                f"config expects {list(shape)}; the file is for another model"
            )
    return tuple(expected)


def expected_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """The diffusers state dict's shapes for a transformer config, built on the meta device (no memory)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    config = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _take_rows(handle, key: str, rows: np.ndarray):
    """Rows of a file tensor; a contiguous run is read as a slice, so a piece of a fused qkv reads only its rows."""
    shape = handle.get_slice(key).get_shape()
    if not shape:
        return handle.get_tensor(key)
    start = int(rows[0])
    if np.array_equal(rows, np.arange(start, start + len(rows))):
        return handle.get_slice(key)[start : start + len(rows)].contiguous()
    import torch

    return handle.get_tensor(key)[torch.from_numpy(rows)].contiguous()


def _float8_e4m3(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    return tensor.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
