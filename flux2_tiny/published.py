"""Writing a tiny checkpoint in the layout of the published FLUX.2 folders.

What the published black-forest-labs folders hold, and this writes the same way:
- [dev] tokenizer/: a saved `PixtralProcessor` (tokenizer.json, tokenizer_config.json naming
  `LlamaTokenizerFast` and `processor_class: PixtralProcessor`, special_tokens_map.json,
  processor_config.json, preprocessor_config.json, chat_template.jinja holding Mistral Small 3.1's
  real template). `PixtralProcessor` itself cannot be constructed here (it needs torchvision), so
  its two JSON files are written as a processor save writes them.
- [klein] tokenizer/: a `Qwen2TokenizerFast` save with Qwen3's real chat template.
- text_encoder/: bf16 shards with an index; [dev]'s keys as transformers 4 saved
  `Mistral3ForConditionalGeneration` (`language_model.model.*`, `language_model.lm_head.*`,
  `vision_tower.*`, `multi_modal_projector.*`).
- transformer/: bf16 shards with an index. vae/: one float32 file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from common.hf_quiet import quiet_hf_libraries

TEMPLATES = Path(__file__).with_name("templates")
MISTRAL_TEMPLATE = TEMPLATES / "mistral_small_3_1.jinja"
QWEN3_TEMPLATE = TEMPLATES / "qwen3.jinja"

# transformers 5 names Mistral3's parameters `model.language_model.*`; the published [dev] files
# use the transformers 4 names, which transformers 5 maps back when loading.
_MISTRAL3_PUBLISHED_KEYS = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^lm_head\.", "language_model.lm_head."),
)

PROCESSOR_CONFIG = {
    "image_break_token": "[IMG_BREAK]",
    "image_end_token": "[IMG_END]",
    "image_token": "[IMG]",
    "patch_size": 14,
    "processor_class": "PixtralProcessor",
    "spatial_merge_size": 2,
}
PREPROCESSOR_CONFIG = {
    "crop_size": None,
    "do_center_crop": None,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "PixtralImageProcessorFast",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": {"height": 14, "width": 14},
    "processor_class": "PixtralProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 1540},
}


def write_pixtral_tokenizer(tokenizer, folder: Path, chat_template: str) -> None:
    """The [dev] tokenizer folder as a PixtralProcessor save writes it (tokenizer + processor files)."""
    folder = Path(folder)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # As in the published file: the class transformers 4 saved, the processor that owns it, and no
    # padding_side (so the side is the one transformers derives; see common.tokenizer.padding_side).
    config.pop("padding_side", None)
    config.pop("backend", None)
    config.update(tokenizer_class="LlamaTokenizerFast", processor_class="PixtralProcessor")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token") if key in config}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (folder / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n", encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n", encoding="utf-8")


def write_sharded(state_dict: dict, folder: Path, stem: str, shards: int = 2, metadata: dict | None = None) -> None:
    """`<stem>-0000i-of-0000n.safetensors` files and `<stem>.safetensors.index.json`, as save_pretrained shards."""
    from safetensors.torch import save_file

    names = list(state_dict)
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        part = names[index * per_shard : (index + 1) * per_shard]
        file = f"{stem}-{index + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {name: state_dict[name].contiguous() for name in part}
        save_file(tensors, str(folder / file), metadata=metadata or {"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n", encoding="utf-8")


def save_text_encoder(model, folder: Path, *, mistral3_keys: bool) -> None:
    """config.json as save_pretrained writes it, weights as bf16 shards (published key names for [dev])."""
    import torch

    quiet_hf_libraries()
    folder = Path(folder)
    model = model.to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    for file in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        file.unlink()
    state_dict = {}
    for name, tensor in model.state_dict().items():
        if mistral3_keys:
            for pattern, replacement in _MISTRAL3_PUBLISHED_KEYS:
                name = re.sub(pattern, replacement, name)
        state_dict[name] = tensor.detach().clone()
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
        getattr(model.config, "text_config", None), "tie_word_embeddings", False
    ):
        state_dict = {name: t for name, t in state_dict.items() if not name.endswith("lm_head.weight")}
    write_sharded(state_dict, folder, "model")


def save_diffusers_bf16(model, folder: Path) -> None:
    """A diffusers model as bf16 shards with an index (the published transformer's layout)."""
    import torch

    quiet_hf_libraries()
    folder = Path(folder)
    model = model.to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    write_sharded(state_dict, folder, "diffusion_pytorch_model")
