"""Random LoRA files for a tiny checkpoint, in the two layouts users bring (tests and benchmarks).

- `write_peft_lora`: what diffusers' `save_lora_weights` writes for a peft adapter
  (`transformer.<module>.lora_A/lora_B.weight`, the `LoraConfig` in `lora_adapter_metadata`), written
  by diffusers itself;
- `write_kohya_lora`: sd-scripts' names over BFL's fused layers (`lora_unet_double_blocks_0_img_attn_qkv.
  lora_down/lora_up/alpha`), the layer names from `flux2_tiny.nvfp4_file.bfl_state_dict` (checked
  against diffusers' own converter on every call).

The factors are random with a fixed seed and sized so that a LoRA at scale 1 moves each layer's output
by a few percent of the layer's own: visible in an image, far from breaking it.
"""

from __future__ import annotations

import re
from pathlib import Path

# The block linears a LoRA trains in each of FLUX.2's two block kinds, BFL's names.
_BFL_BLOCK_LAYERS = (
    r"^double_blocks\.\d+\.(img_attn\.qkv|img_attn\.proj|img_mlp\.[02]|txt_attn\.qkv|txt_attn\.proj|txt_mlp\.[02])$",
    r"^single_blocks\.\d+\.linear[12]$",
)


def _transformer_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for file in sorted((Path(checkpoint) / "transformer").glob("*.safetensors")):
        state |= load_file(str(file))
    return state


def _factors(generator, rank: int, weight, strength: float):
    """(down [r, K], up [N, r]) with |up @ down| ~ strength x |weight| per element."""
    import torch

    out_features, in_features = weight.shape
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) / rank**0.5
    return down, up * strength * weight.float().std()


def write_kohya_lora(
    checkpoint: Path,
    out: Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    strength: float = 1.0,
    layers: str = ".*",
) -> Path:
    """A kohya (sd-scripts) FLUX.2 LoRA for the checkpoint's transformer, every block linear matching `layers`."""
    import torch
    from safetensors.torch import save_file

    from flux2_tiny.nvfp4_file import bfl_state_dict

    generator = torch.Generator().manual_seed(seed)
    bfl = bfl_state_dict(_transformer_weights(checkpoint))
    tensors = {}
    for name in sorted(bfl):
        layer = name.removesuffix(".weight")
        if not name.endswith(".weight") or not any(re.match(p, layer) for p in _BFL_BLOCK_LAYERS):
            continue
        if not re.search(layers, layer):
            continue
        key = "lora_unet_" + layer.replace(".", "_")
        down, up = _factors(generator, rank, bfl[name], strength)
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def write_peft_lora(
    checkpoint: Path,
    out: Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 1,
    strength: float = 1.0,
    modules: str = r"^(transformer_blocks|single_transformer_blocks)\.",
) -> Path:
    """A diffusers/peft LoRA (`save_lora_weights`' file) over every block linear whose module path matches `modules`."""
    import torch
    from diffusers import Flux2Pipeline
    from peft import LoraConfig

    generator = torch.Generator().manual_seed(seed)
    weights = _transformer_weights(checkpoint)
    layers, targets = {}, []
    for name in sorted(weights):
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or weights[name].ndim != 2 or not re.search(modules, module):
            continue
        if ".norm" in module or "modulation" in module:
            continue
        down, up = _factors(generator, rank, weights[name], strength)
        layers[f"{module}.lora_A.weight"] = down.contiguous()
        layers[f"{module}.lora_B.weight"] = up.contiguous()
        targets.append(module)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = config.to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    Flux2Pipeline.save_lora_weights(
        str(out.parent),
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=metadata,
        weight_name=out.name,
        safe_serialization=True,
    )
    return out
