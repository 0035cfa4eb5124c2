"""`runtime.generate --lora FILE[:SCALE]`: LoRA files fed into the artifacts' LoRA slots (docs/lora.md).

The artifacts must have been exported with `--lora-rank R`; each file is read through diffusers'
converters (`common.lora`), checked against the slots' layers and shapes, and the files stack along the
rank, their scales folded in (`common.lora.slot_arrays`). Nothing is rebuilt: the slots are the
transformer's inputs.
"""

from __future__ import annotations

from common.errors import UsageError
from common.lora import LoraRequest, check_rank, check_targets, read_lora, slot_arrays
from common.specs import LORA_BLOCK_PREFIXES, Shapes


def open_loras(requests: tuple[LoraRequest, ...], folder, shapes: Shapes) -> tuple:
    """(Lora, scale) per request, each checked against the slots of the artifacts at `folder`; one-line errors."""
    if not requests:
        return ()
    if not shapes.lora_rank:
        raise UsageError(
            f"--lora {requests[0].path}: the artifacts {folder} have no LoRA slots (exported without --lora-rank); "
            "re-export with --lora-rank R to swap LoRAs at run time, or bake it in with python -m export --lora FILE"
        )
    opened = tuple((read_lora(request.path), request.scale) for request in requests)
    check_loras(opened, folder, shapes)
    return opened


def check_loras(loras: tuple, folder, shapes: Shapes) -> None:
    """Refuse (Lora, scale) pairs the slots of the artifacts at `folder` cannot take: layers, shapes, total rank.

    For LoRAs already read (a server reads each file once and checks every request's set here).
    """
    linears = {module: (k, n) for module, k, n in shapes.lora_targets}
    for lora, _ in loras:
        outside = [m for m in lora.layers if m not in linears and not m.startswith(LORA_BLOCK_PREFIXES)]
        uncovered = (
            f"only the transformer blocks' {len(linears)} linears have slots; bake this LoRA in at export "
            f"(python -m export --lora {lora.path}), which covers every linear"
            if outside
            else ""
        )
        check_targets(lora, linears, what=f"the LoRA slots of {folder}", uncovered=uncovered)
    check_rank(loras, shapes.lora_targets, shapes.lora_rank)


def lora_arrays(loras: tuple, shapes: Shapes) -> dict:
    """The transformer's LoRA-slot inputs for `loras` (zeros for none), numpy float32."""
    return slot_arrays(loras, shapes.lora_targets, shapes.lora_rank)
