"""LoRA files for the FLUX.2 transformer: read through diffusers, as `Flux2Pipeline.load_lora_weights` reads them.

Formats (all as diffusers 0.42 understands them, through its own converters; no key mapping here):
diffusers/peft (`transformer.*.lora_A/lora_B`, what `save_lora_weights` and ai-toolkit write, with the
adapter's `lora_alpha`/`rank_pattern` in the file's `lora_adapter_metadata`), peft's
`base_model.model.*`, BFL's `diffusion_model.*` and sd-scripts' kohya names over BFL's fused layers
(`lora_unet_double_blocks_0_img_attn_qkv.lora_down/lora_up/alpha`, qkv split by diffusers).

A read LoRA is, per linear of the transformer (diffusers' module path), the pair (A [r, K], B [N, r])
in float32 with the adapter's own scale (peft's `lora_alpha / r`, per module, rsLoRA's
`alpha / sqrt(r)`) folded into A, so that the layer computes W x + scale * B (A x) exactly as peft's
unfused layer does with `set_adapters(..., scale)`. Export bakes it (`export.lora`); the runtime
feeds it into a graph's LoRA slots (`slot_arrays`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UsageError

FIX = "pass a FLUX.2 transformer LoRA (.safetensors)"


@dataclass(frozen=True)
class LoraRequest:
    """One `--lora FILE[:SCALE]`."""

    path: Path
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_lora_request(text: str, flag: str = "--lora") -> LoraRequest:
    """'style.safetensors:0.8' -> LoraRequest; a scale that is not a finite number is refused in one line."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail:  # FILE:SCALE (a path may hold ':' itself, never after its last '/')
        try:
            scale = float(tail)
        except ValueError:
            raise UsageError(
                f"{flag} {text!r}: scale {tail!r} is not a number; write FILE or FILE:SCALE, e.g. a.safetensors:0.8"
            ) from None
        path = head
    if not math.isfinite(scale):
        raise UsageError(
            f"{flag} {text!r}: scale {scale} is not a finite number; write FILE:SCALE, e.g. a.safetensors:0.8"
        )
    return LoraRequest(Path(path).expanduser().absolute(), scale)


@dataclass(frozen=True)
class Lora:
    """A LoRA file read and converted: per linear module, (A scaled by the adapter's alpha/r, B), float32 torch tensors."""

    path: Path
    sha256: str
    format: str  # diffusers | peft | bfl | kohya
    layers: dict = field(repr=False)  # module path -> (A [r, K], B [N, r])

    def ranks(self) -> dict[str, int]:
        return {module: a.shape[0] for module, (a, _) in self.layers.items()}

    def record(self, scale: float) -> dict:
        """What a manifest or a sidecar says about it."""
        ranks = sorted(set(self.ranks().values()))
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "format": self.format,
            "scale": scale,
            "layers": len(self.layers),
            "ranks": ranks,
        }

    def delta(self, module: str):
        """B @ A [N, K] float32, the adapter's scale included (not the request's)."""
        a, b = self.layers[module]
        return b @ a


def detect_format(keys) -> str | None:
    keys = list(keys)
    if any(".lora_down.weight" in k for k in keys):
        return "kohya"
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "bfl"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    return None


def read_lora(path: Path) -> Lora:
    """The LoRA at `path`, converted to diffusers' module names and scaled as peft scales it; one-line errors."""
    tensors, metadata = _load(path)
    kind = detect_format(tensors)
    if kind is None:
        first = next(iter(tensors), "(no tensors)")
        raise UsageError(f"LoRA {path} is no FLUX.2 LoRA diffusers can read (first key {first!r}); {FIX}")
    if kind == "lokr":
        raise UsageError(
            f"LoRA {path} is a LyCORIS LoKr file, which flux2-trt does not apply yet; {FIX} (lora_A/lora_B or kohya lora_down/lora_up)"
        )
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise UsageError(f"LoRA {path} is a DoRA file, which flux2-trt does not apply; {FIX}")
    converted = _convert(path, tensors)
    layers = _pairs(path, converted, metadata)
    return Lora(path, _sha256(path), kind, layers)


def _load(path: Path):
    """(name -> torch tensor, diffusers' adapter metadata or None), with safetensors only."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(f"LoRA {path} {what}; {FIX}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}
            raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"LoRA {path} is damaged or truncated ({reason}); re-download or re-save it") from None
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        raise UsageError(f"LoRA {path} has unreadable lora_adapter_metadata; re-save it with diffusers") from None
    return tensors, metadata


def _convert(path: Path, tensors: dict) -> dict:
    """diffusers' `Flux2LoraLoaderMixin.lora_state_dict`: its converters, on a copy; what they leave is refused."""
    from diffusers import Flux2Pipeline

    from common.hf_quiet import quiet_hf_libraries

    quiet_hf_libraries()
    given = dict(tensors)
    converted = Flux2Pipeline.lora_state_dict(given)  # kohya's converter pops what it understood from `given`
    leftover = list(given) if detect_format(tensors) == "kohya" else []
    if leftover:
        raise UsageError(
            f"LoRA {path} has {len(leftover)} kohya keys diffusers' FLUX.2 converter does not map, e.g. {leftover[0]!r}: "
            f"it was made for another model; {FIX}"
        )
    strange = [k for k in converted if not k.startswith("transformer.") or ".lora_" not in k]
    if strange:
        raise UsageError(f"LoRA {path}: key {strange[0]!r} is no transformer LoRA weight after conversion; {FIX}")
    return {k.removeprefix("transformer."): v for k, v in converted.items()}


def _pairs(path: Path, state: dict, metadata: dict | None) -> dict:
    """module -> (A * peft's scaling for it, B), scaling as peft's LoraModel computes it from diffusers' LoraConfig."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    if any(k.endswith(".bias") for k in state):
        raise UsageError(f"LoRA {path} has lora_B biases, which flux2-trt does not apply; {FIX}")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    for module in modules:
        for part in ("lora_A", "lora_B"):
            if f"{module}.{part}.weight" not in state:
                raise UsageError(
                    f"LoRA {path} has no {module}.{part}.weight for its {module} layer; the file is incomplete; {FIX}"
                )
    ranks = {f"^{module}.lora_B.weight": state[f"{module}.lora_B.weight"].shape[1] for module in modules}
    adapter = metadata
    if adapter is not None:
        adapter = {k.removeprefix("transformer."): v for k, v in adapter.items()}
    config = _create_lora_config(state, None, adapter, ranks)
    layers = {}
    for module in modules:
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UsageError(
                f"LoRA {path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, not [r, K] and [N, r]; {FIX}"
            )
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        layers[module] = (a * scaling, b)
    return layers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_targets(lora: Lora, linears: dict[str, tuple[int, int]], *, what: str, uncovered: str = "") -> None:
    """Refuse a LoRA whose layers do not fit `linears` (module -> (in, out)): shapes first, then missing layers.

    `uncovered` is the end of the message for a layer `linears` lacks (default: made for another model).
    """
    for module, (a, b) in lora.layers.items():
        if module not in linears:
            continue
        k, n = linears[module]
        if a.shape[1] != k or b.shape[0] != n:
            raise UsageError(
                f"LoRA {lora.path} was made for another model: {module}.lora_A is {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, this model's {module} is [{n}, {k}]; {FIX} made for this checkpoint"
            )
    missing = [module for module in lora.layers if module not in linears]
    if missing:
        end = uncovered or f"it was made for another model; {FIX} made for this checkpoint"
        raise UsageError(
            f"LoRA {lora.path} targets {len(missing)} layer(s) {what} does not have, e.g. {missing[0]}: {end}"
        )


def check_rank(loras, targets, rank: int) -> None:
    """Refuse LoRAs whose ranks at one layer add up past the slots' `rank`, naming the layer and the files."""
    for module, _, _ in targets:
        stacked = [(lora, lora.layers[module][0].shape[0]) for lora, _ in loras if module in lora.layers]
        total = sum(r for _, r in stacked)
        if total > rank:
            names = " + ".join(f"{lora.path.name} (rank {r})" for lora, r in stacked)
            raise UsageError(
                f"LoRA {names} need rank {total} at {module}, past the artifacts' LoRA slots of rank {rank}; "
                f"re-export with --lora-rank {total} or more, or pass fewer LoRAs"
            )


def slot_arrays(loras, targets, rank: int) -> dict:
    """The LoRA slots' inputs (`common.specs.lora_slot_inputs`) for `loras` ((Lora, scale) pairs), numpy float32.

    Several LoRAs stack along the rank: LoRA i fills rows [o_i, o_i + r_i) of A (its scale folded in) and
    the same columns of B, so B A is the sum of their deltas. The rest stays zero. A layer's total rank
    past `rank` is refused, naming it.
    """
    import numpy as np

    from common.specs import LORA_A, LORA_B

    check_rank(loras, targets, rank)
    arrays = {}
    for module, in_features, out_features in targets:
        a = np.zeros((rank, in_features), np.float32)
        b = np.zeros((out_features, rank), np.float32)
        offset = 0
        for lora, scale in loras:
            if module not in lora.layers:
                continue
            down, up = lora.layers[module]
            r = down.shape[0]
            a[offset : offset + r] = scale * down.numpy()
            b[:, offset : offset + r] = up.numpy()
            offset += r
        arrays[f"{LORA_A}{module}"], arrays[f"{LORA_B}{module}"] = a, b
    return arrays


def load_into_pipeline(pipe, loras) -> None:
    """Give diffusers' pipeline exactly `loras` ((Lora, scale) pairs) as unfused peft adapters; () removes them.

    The PyTorch side of every comparison (the torch backend, runtime.check's reference): each LoRA goes in
    through `load_lora_weights` under diffusers' names with its adapter scale already in A (so alpha = r),
    and `set_adapters` gives the request's scales, as a diffusers user would.
    """
    transformer = pipe.transformer
    if getattr(transformer, "peft_config", None):
        transformer.delete_adapters(list(transformer.peft_config))
    if not loras:
        return
    names = []
    for index, (lora, _) in enumerate(loras):
        state = {}
        for module, (a, b) in lora.layers.items():
            state[f"transformer.{module}.lora_A.weight"] = a.to(transformer.dtype)
            state[f"transformer.{module}.lora_B.weight"] = b.to(transformer.dtype)
        names.append(f"flux2_trt_{index}")
        pipe.load_lora_weights(state, adapter_name=names[-1])
    pipe.set_adapters(names, [scale for _, scale in loras])


def baked_loras(records, where: str) -> tuple:
    """(Lora, scale) of a manifest's baked LoRAs, each file read again and held to its recorded sha256."""
    opened = []
    for record in records:
        path = Path(record["file"])
        if not path.is_file():
            raise UsageError(
                f"{where} has LoRA {path} baked in, which is not there: diffusers' modules need it to draw the same "
                "model; restore the file or use the graphs (--backend ort or trt)"
            )
        lora = read_lora(path)
        if lora.sha256 != record["sha256"]:
            raise UsageError(
                f"LoRA {path} changed since it was baked into {where} (sha256 differs); restore it or re-export"
            )
        opened.append((lora, float(record["scale"])))
    return tuple(opened)
