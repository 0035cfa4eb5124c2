"""A tiny transformer written as the published FLUX.2-dev-NVFP4 files, by comfy-kitchen (tests only).

black-forest-labs/FLUX.2-dev-NVFP4 holds two single files in BFL's key names, made for ComfyUI's
comfy-kitchen kernels; this writes a diffusers state dict the same way, with comfy-kitchen's own
quantizer and layout (`TensorCoreNVFP4Layout`, eager backend), so that the reader
(export/nvfp4/published.py) is checked against the reference implementation and not against itself:
- plain (`flux2-dev-nvfp4.safetensors`): NVFP4 for every single-block linear and, in the double
  blocks, the image qkv and output projections and both MLPs (text attention stays bf16); a static
  `input_scale` on every NVFP4 layer;
- mixed (`flux2-dev-nvfp4-mixed.safetensors`): all double-block attention bf16; no `input_scale` on
  the text MLPs (their activations are scaled dynamically).
Everything else bf16; the header's `_quantization_metadata` names the NVFP4 layers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

VARIANTS = ("plain", "mixed")

# diffusers -> BFL names (BFL's flux2 reference model). Checked on every write: diffusers' own
# converter must turn the result back into the input exactly (bfl_state_dict).
_RENAMES = (
    (r"^time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
    (r"^time_guidance_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer."),
    (r"^time_guidance_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer."),
    (r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.", r"\1.lin."),
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_in\.", r"double_blocks.\1.img_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_out\.", r"double_blocks.\1.img_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in\.", r"double_blocks.\1.txt_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out\.", r"double_blocks.\1.txt_mlp.2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj\.", r"single_blocks.\1.linear1."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_out\.", r"single_blocks.\1.linear2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
)
# Fused in BFL's model: q, k, v rows stacked in this order.
_FUSED = (
    (r"^transformer_blocks\.(\d+)\.attn\.to_([qkv])\.(weight|bias)$", r"double_blocks.\1.img_attn.qkv.\3"),
    (r"^transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.(weight|bias)$", r"double_blocks.\1.txt_attn.qkv.\3"),
)
_FINAL_MODULATION = "norm_out.linear.weight"  # diffusers (scale, shift); BFL (shift, scale)

# Which BFL layers each published file stores in NVFP4, and which of those carry a static input scale.
_PLAIN_NVFP4 = (
    r"^(double_blocks\.\d+\.(img_attn\.qkv|img_attn\.proj|img_mlp\.[02]|txt_mlp\.[02])|single_blocks\.\d+\.linear[12])$"
)
_MIXED_NVFP4 = r"^(double_blocks\.\d+\.(img_mlp\.[02]|txt_mlp\.[02])|single_blocks\.\d+\.linear[12])$"
_MIXED_DYNAMIC = r"^double_blocks\.\d+\.txt_mlp\.[02]$"


def bfl_state_dict(state_dict: Mapping) -> dict:
    """A diffusers Flux2Transformer2DModel state dict under BFL's names (fused qkv, (shift, scale))."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    out, fused = {}, {}
    for name, tensor in state_dict.items():
        if name == _FINAL_MODULATION:
            scale, shift = tensor.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], dim=0)
            continue
        for pattern, replacement in _FUSED:
            if re.match(pattern, name):
                piece = re.match(pattern, name).group(2)
                fused.setdefault(re.sub(pattern, replacement, name), {})[piece] = tensor
                break
        else:
            for pattern, replacement in _RENAMES:
                if re.match(pattern, name):
                    out[re.sub(pattern, replacement, name)] = tensor
                    break
            else:
                raise ValueError(f"no BFL name for diffusers {name}")
    for name, pieces in fused.items():
        out[name] = torch.cat([pieces["q"], pieces["k"], pieces["v"]], dim=0)
    back = convert_flux2_transformer_checkpoint_to_diffusers({name: t.clone() for name, t in out.items()})
    if set(back) != set(state_dict) or any(not torch.equal(back[name], state_dict[name]) for name in back):
        raise ValueError("BFL names do not convert back to the diffusers state dict through diffusers' converter")
    return out


def nvfp4_layers(bfl_names, variant: str) -> list[str]:
    """The BFL layers `variant` ("plain" or "mixed") stores in NVFP4."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; expected one of {VARIANTS}")
    pattern = _PLAIN_NVFP4 if variant == "plain" else _MIXED_NVFP4
    layers = {name.removesuffix(".weight") for name in bfl_names if name.endswith(".weight")}
    return sorted(layer for layer in layers if re.match(pattern, layer))


def write_published_nvfp4(
    state_dict: Mapping, path: Path, *, variant: str = "plain", activation_amax: Mapping[str, float] | float = 16.0
) -> list[str]:
    """Write a diffusers transformer state dict as the published `variant` file; returns its NVFP4 layers.

    Weights are cast to bf16 (as published) and NVFP4 layers quantized by comfy-kitchen from them.
    `activation_amax`: the amax of each NVFP4 layer's input (BFL layer name -> value, or one value for
    all), from which a static `input_scale` = amax / (448 * 6) is written where the variant has one.
    """
    import torch
    from comfy_kitchen.float_utils import F4_E2M1_MAX, F8_E4M3_MAX
    from comfy_kitchen.registry import registry
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout
    from safetensors.torch import save_file

    bfl = {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in bfl_state_dict(state_dict).items()}
    layers = nvfp4_layers(bfl, variant)
    tensors = {}
    with registry.use_backend("eager"):
        for layer in layers:
            qdata, params = TensorCoreNVFP4Layout.quantize(bfl.pop(f"{layer}.weight"))
            for suffix, tensor in TensorCoreNVFP4Layout.state_dict_tensors(qdata, params).items():
                tensors[f"{layer}.weight{suffix}"] = tensor.contiguous()
            if variant == "mixed" and re.match(_MIXED_DYNAMIC, layer):
                continue
            amax = activation_amax if isinstance(activation_amax, float | int) else activation_amax[layer]
            tensors[f"{layer}.input_scale"] = torch.tensor(
                float(amax) / (F8_E4M3_MAX * F4_E2M1_MAX), dtype=torch.float32
            )
    tensors.update(bfl)
    metadata = {"_quantization_metadata": json.dumps({"layers": {layer: {"format": "nvfp4"} for layer in layers}})}
    save_file(tensors, str(path), metadata=metadata)
    return layers
