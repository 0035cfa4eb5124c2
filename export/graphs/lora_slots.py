"""LoRA slots (`python -m export --lora-rank R`): a low-rank branch on every block linear, its factors graph inputs.

Each linear of the transformer's double and single blocks (`Shapes.lora_targets`) computes
`W x + B (A x)` with A [R, K] and B [N, R] two more inputs of the graph (`common.specs.lora_slot_inputs`):
zeros draw the base model; one LoRA, or several stacked along R with their scales folded into A
(`common.lora.slot_arrays`), draw what peft's unfused layers draw. No refit, no rebuild: a TensorRT
engine takes them as ordinary bindings.

The branch is a forward hook on diffusers' own module, so parameter names (and the streaming export
that reads them by name) do not change. It computes in the graph's compute dtype (float32, bf16,
float16; FP8 and NVFP4 graphs are traced at bf16 and their rewrites quantize only linears whose
weight is an initializer, so the branch stays bf16 while the base weight is FP8 or NVFP4).
"""

from __future__ import annotations

import torch
from torch import nn

from common.specs import LORA_BLOCK_PREFIXES


def slot_targets(model: nn.Module) -> tuple[tuple[str, int, int], ...]:
    """(module path, in_features, out_features) of every nn.Linear in the transformer's blocks, in module order."""
    return tuple(
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(LORA_BLOCK_PREFIXES)
    )


def _branch_hook(store: list, index: int, dtype):
    def hook(module, args, output):
        a, b = store[2 * index], store[2 * index + 1]  # [R, K], [N, R] float32 inputs
        branch = nn.functional.linear(nn.functional.linear(args[0].to(dtype), a.to(dtype)), b.to(dtype))
        return output + branch.to(output.dtype)

    return hook


class LoraSlots(nn.Module):
    """Mixin for a transformer graph module: the last 2 x len(targets) inputs are the slots' factors."""

    def install_slots(self, targets: tuple[tuple[str, int, int], ...], dtype) -> None:
        self.slot_count = len(targets)
        self.slot_store: list = []
        for index, (name, _, _) in enumerate(targets):
            self.model.get_submodule(name).register_forward_hook(_branch_hook(self.slot_store, index, dtype))

    def forward(self, *inputs):
        count = 2 * self.slot_count
        self.slot_store[:] = inputs[-count:]
        try:
            return super().forward(*inputs[:-count])
        finally:
            self.slot_store.clear()


def with_slots(cls: type, model: nn.Module, geometry, shapes, targets=None):
    """An instance of `cls` (a transformer graph class) with LoRA slots on `targets` (default `shapes.lora_targets`;
    a step-cache graph takes those of the blocks it runs)."""
    slotted = type(f"LoraSlots{cls.__name__}", (LoraSlots, cls), {})
    graph = slotted(model, geometry, shapes)
    graph.install_slots(shapes.lora_targets if targets is None else targets, _compute_dtype(model))
    return graph


def _compute_dtype(model: nn.Module):
    weight = model.x_embedder.weight
    return torch.float16 if weight.dtype == torch.float16 else weight.dtype
