"""LoRA at export: `--lora FILE[:SCALE]` baked into the transformer's weights, `--lora-rank R` slots for the runtime.

Baking: each file is read through diffusers' converters (`common.lora.read_lora`), checked against
the checkpoint's linears, and merged, W += scale x (alpha / r) x B A per layer, in float32 and cast
back to the checkpoint's dtype, a tensor at a time while the transformer is staged as a diffusers
folder beside the output (`export.nvfp4.importing.stage_checkpoint`, as `--transformer-weights` is):
every later step (tracing, FP8/NVFP4 calibration and quantization, the check against PyTorch) reads
the merged weights as if they were the checkpoint's. The staged copy costs the transformer's bytes
on disk while the export runs.

Slots: the block linears of the checkpoint's transformer, read from its config (an empty model),
become `Shapes.lora_targets` (`export.graphs.lora_slots`).
"""

from __future__ import annotations

from common.lora import Lora, LoraRequest, check_targets, read_lora

# Bump when baking writes different weights for the same files (it is part of the transformer's cache key).
CODE_VERSION = 1


def _empty_transformer(checkpoint):
    import torch

    from export.components import COMPONENTS

    model, _ = COMPONENTS["transformer"].empty(checkpoint, checkpoint.geometry(), torch.float32)
    return model


def linear_shapes(checkpoint) -> dict[str, tuple[int, int]]:
    """module path -> (in_features, out_features) of every nn.Linear of the checkpoint's transformer."""
    from torch import nn

    return {
        name: (module.in_features, module.out_features)
        for name, module in _empty_transformer(checkpoint).named_modules()
        if isinstance(module, nn.Linear)
    }


def slot_targets(checkpoint) -> tuple[tuple[str, int, int], ...]:
    from export.graphs.lora_slots import slot_targets as targets_of

    return targets_of(_empty_transformer(checkpoint))


def open_loras(requests: tuple[LoraRequest, ...], checkpoint) -> tuple[tuple[Lora, float], ...]:
    """Each `--lora` read and checked against the checkpoint's transformer; one line naming the first misfit."""
    if not requests:
        return ()
    linears = linear_shapes(checkpoint)
    opened = []
    for request in requests:
        lora = read_lora(request.path)
        check_targets(lora, linears, what=f"the transformer of {checkpoint.root}")
        opened.append((lora, request.scale))
    return tuple(opened)


def records(loras) -> list[dict]:
    """The manifest's (and the cache key's) account of the baked LoRAs, in order."""
    records = []
    for lora, scale in loras:
        record = lora.record(scale)
        record["layers_touched"] = sorted(lora.layers)
        records.append(record)
    return records


def baked(tensors, loras, traced_dtype):
    """(name, tensor) of `tensors` with every LoRA's delta added to the weights it targets, one tensor at a time.

    A merged weight is stored in the wider of its own dtype and the graph's (`traced_dtype`): a bf16
    checkpoint exported at fp32 keeps W + delta in float32, as diffusers' unfused fp32 pipeline
    computes it (rounding the sum to bf16 put the fp32 transformer 2.7e-3 rel L2 from diffusers,
    tiny default); at bf16 the sum is rounded once, as the bf16 graph and diffusers' `fuse_lora` do.
    """
    import torch

    for name, tensor in tensors:
        module = name.removesuffix(".weight")
        hits = [(lora, scale) for lora, scale in loras if name.endswith(".weight") and module in lora.layers]
        if hits:
            merged = tensor.float()
            for lora, scale in hits:
                merged += scale * lora.delta(module)
            tensor = merged.to(torch.promote_types(tensor.dtype, traced_dtype))
        yield name, tensor


def checkpoint_tensors(checkpoint):
    """(name, tensor) of the checkpoint's transformer safetensors, one at a time."""
    from safetensors import safe_open

    from export.checkpoint import weight_files

    for file in weight_files(checkpoint.component_dir("transformer")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
