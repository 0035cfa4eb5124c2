"""diffusers' FLUX.2 pipeline built from its parts: the numerics reference of runtime.check, the torch
backend and FP8 calibration (in common/ because both export and runtime use it).

`Flux2Pipeline.from_pretrained` instantiates every class model_index.json names. The published
FLUX.2 [dev] folder names `PixtralProcessor` as its tokenizer, and in transformers 5 that class
requires torchvision, which has no build for the pinned CPU torch 2.13 (PyPI's torchvision 0.28.0,
the only one for torch 2.13.0, is the CUDA build; beside the CPU torch its import fails with
"operator torchvision::nms does not exist"; 0.29 needs torch >= 2.14). FLUX.2 uses only the
processor's text side (`apply_chat_template` on a system + user message, text only), which is the
tokenizer in the same folder with the same chat template. So the pipeline is constructed here from
its components, with a plain tokenizer, and the processor class never matters. diffusers'
`__call__`, `encode_prompt` and every computation stay diffusers' own.

Imported lazily by its callers: diffusers and transformers are needed only where a reference runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import CheckpointError
from common.family import Family
from common.hf_quiet import quiet_hf_libraries

PIPELINE_CLASSES = tuple(Family)
# The text encoder classes model_index.json may name, and where transformers keeps them.
TEXT_ENCODER_CLASSES = ("Mistral3ForConditionalGeneration", "Qwen3ForCausalLM")


def load_reference_tokenizer(folder: Path):
    """The tokenizer diffusers' pipeline would use from this folder (a processor's text side is its tokenizer).

    A processor folder saved before chat_template.jinja existed keeps the template in
    chat_template.json (or processor_config.json), which only the processor reads; the tokenizer
    gets it here so that `apply_chat_template` renders what the processor would.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(tokenizer, "chat_template", None) is None:
        for name in ("chat_template.json", "processor_config.json"):
            path = Path(folder) / name
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.is_file() else None
            if isinstance(template, str):
                tokenizer.chat_template = template
                break
    return tokenizer


def reference_pipeline(checkpoint: Path, *, dtype: str = "float32", device: str | None = None):
    """diffusers' Flux2Pipeline / Flux2KleinPipeline for `checkpoint`, built from its parts, on `device`."""
    import diffusers
    import torch
    import transformers

    quiet_hf_libraries()
    root = Path(checkpoint).expanduser()
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"checkpoint {root} has no model_index.json; pass the FLUX.2 diffusers folder")
    model_index = json.loads(index_path.read_text(encoding="utf-8"))
    pipeline_class = model_index.get("_class_name")
    if pipeline_class not in PIPELINE_CLASSES:
        raise CheckpointError(f"checkpoint {root} is a {pipeline_class!r} pipeline; expected one of {Family.names()}")
    text_encoder_class = (model_index.get("text_encoder") or [None, None])[1]
    if text_encoder_class not in TEXT_ENCODER_CLASSES:
        raise CheckpointError(
            f"{index_path} names text encoder {text_encoder_class!r}; expected one of {', '.join(TEXT_ENCODER_CLASSES)}"
        )
    torch_dtype = getattr(torch, dtype)
    parts = {
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        "vae": diffusers.AutoencoderKLFlux2.from_pretrained(root / "vae", dtype=torch_dtype),
        "transformer": diffusers.Flux2Transformer2DModel.from_pretrained(root / "transformer", dtype=torch_dtype),
        "text_encoder": getattr(transformers, text_encoder_class).from_pretrained(
            root / "text_encoder", dtype=torch_dtype
        ),
        "tokenizer": load_reference_tokenizer(root / "tokenizer"),
    }
    if pipeline_class == Family.KLEIN:
        parts["is_distilled"] = bool(model_index.get("is_distilled", False))
    pipe = getattr(diffusers, pipeline_class)(**parts)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
