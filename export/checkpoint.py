"""Open a FLUX.2 checkpoint folder (diffusers layout), validate it, and load its PyTorch modules.

Validation happens before any weight is read: a wrong path, a folder that is not FLUX.2, or a
truncated safetensors file is reported in one line, not as a traceback from deep inside a loader.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from common.errors import CheckpointError
from common.family import Family
from common.hf_quiet import quiet_hf_libraries
from common.specs import Geometry, geometry_from_configs

LAYOUT_HINT = "expected a FLUX.2 diffusers folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/)"
# BFL's own single-file releases (flux2-dev.safetensors, flux-2-klein-4b.safetensors) hold the
# transformer alone, under BFL's key names; diffusers can load only the transformer from one.
SINGLE_FILE_HINT = (
    "this is a single-file BFL checkpoint (the transformer alone); export needs the diffusers layout: "
    "download the whole repository, e.g. `hf download black-forest-labs/FLUX.2-dev --local-dir DIR` "
    "(or FLUX.2-klein-4B / -9B), and pass DIR as --model"
)
_CONFIG_FILES = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json"}
# Where the language model's weights live inside a text encoder checkpoint, newest layout first:
# transformers 5 Mistral3 (`model.language_model.`), transformers 4 Mistral3 as published with
# FLUX.2 [dev] (`language_model.model.`), and a plain causal LM such as klein's Qwen3 (`model.`).
LANGUAGE_MODEL_PREFIXES = (r"^model\.language_model\.", r"^language_model\.model\.", r"^model\.")


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    model_index: dict
    configs: dict  # component -> config dict

    def geometry(self, text_out_layers: tuple[int, ...] | None = None) -> Geometry:
        return geometry_from_configs(
            self.model_index,
            self.configs["text_encoder"],
            self.configs["transformer"],
            self.configs["vae"],
            text_out_layers,
        )

    def config_hash(self) -> str:
        """Content hash of every config file and safetensors index: what defines the model."""
        digest = hashlib.sha256()
        for path in sorted(self.root.rglob("*.json")):
            digest.update(str(path.relative_to(self.root)).encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def weights_fingerprint(self) -> str:
        """Names and sizes of the weight files: cheap, and changes when weights are replaced."""
        digest = hashlib.sha256()
        for path in sorted(self.root.rglob("*.safetensors")):
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}:{stat.st_size}:{int(stat.st_mtime)}".encode())
        return digest.hexdigest()

    def component_dir(self, component: str) -> Path:
        return self.root / component


def open_checkpoint(path: str | Path) -> Checkpoint:
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint {root} does not exist; pass a FLUX.2 diffusers folder or --model tiny")
    if not root.is_dir():
        if root.suffix in (".safetensors", ".sft"):
            raise CheckpointError(f"checkpoint {root}: {SINGLE_FILE_HINT}")
        raise CheckpointError(f"checkpoint {root} is not a folder; {LAYOUT_HINT}")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        single = sorted(p.name for p in root.glob("*.safetensors"))
        if single:
            raise CheckpointError(f"checkpoint {root} holds {single[0]} but no model_index.json; {SINGLE_FILE_HINT}")
        raise CheckpointError(f"checkpoint {root} has no model_index.json; {LAYOUT_HINT}")
    model_index = _read_json(index_path)
    pipeline_class = model_index.get("_class_name")
    if pipeline_class not in tuple(Family):
        raise CheckpointError(
            f"checkpoint {root} is a {pipeline_class!r} pipeline, not FLUX.2; "
            f"expected _class_name one of {Family.names()} in {index_path}"
        )
    configs = {}
    for component, name in _CONFIG_FILES.items():
        config_path = root / component / name
        if not config_path.is_file():
            raise CheckpointError(f"checkpoint {root} has no {component}/{name}; {LAYOUT_HINT}")
        configs[component] = _read_json(config_path)
    if not (root / "tokenizer").is_dir():
        raise CheckpointError(f"checkpoint {root} has no tokenizer/; {LAYOUT_HINT}")
    if not (root / "tokenizer" / "tokenizer.json").is_file():  # read before writing (export.run.plan_export)
        raise CheckpointError(f"checkpoint {root} has no tokenizer/tokenizer.json; {LAYOUT_HINT}")
    for component in _CONFIG_FILES:
        for file in weight_files(root / component):
            validate_safetensors(file)
    return Checkpoint(root=root, model_index=model_index, configs=configs)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); restore it from the original checkpoint") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component: those its index names, or the single file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = _read_json(indexes[0]).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(
                    f"{indexes[0]} names shard {file.name}, which is missing from {folder}; "
                    "re-download the checkpoint's missing shards"
                )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no .safetensors weights; {LAYOUT_HINT} (only safetensors are loaded)")
    return files


def validate_safetensors(path: Path) -> None:
    """Check the header and that the file is as long as the header says: catches truncation cheaply."""
    fix = "re-download or re-save this file"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"safetensors file {path} is truncated ({size} bytes, no header); {fix}")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, 100 * 1024 * 1024):
                raise CheckpointError(
                    f"safetensors file {path} is truncated or corrupt: its header claims {header_len} bytes, "
                    f"the file has {size}; {fix}"
                )
            header = json.loads(handle.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"safetensors file {path} has a corrupt header; {fix}") from None
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"safetensors file {path} is truncated: header needs {8 + header_len + end} bytes, file has {size}; {fix}"
        )


def language_model_config(checkpoint: Checkpoint, geometry: Geometry):
    """The text encoder's language-model config, cut after the last layer FLUX.2 reads (+1, see below)."""
    import copy

    from transformers import AutoConfig

    quiet_hf_libraries()
    folder = checkpoint.component_dir("text_encoder")
    config = AutoConfig.from_pretrained(folder)
    text_config = copy.deepcopy(getattr(config, "text_config", None) or config)
    deepest = max(geometry.text_out_layers)
    if deepest > text_config.num_hidden_layers:
        raise CheckpointError(
            f"text encoder layer {deepest} requested but {folder} has {text_config.num_hidden_layers} layers; "
            "pass --text-encoder-layers within range"
        )
    text_config.num_hidden_layers = min(text_config.num_hidden_layers, deepest + 1)
    return text_config


def load_language_model(checkpoint: Checkpoint, geometry: Geometry, dtype):
    """The text encoder's language model alone, cut after the last layer FLUX.2 reads.

    The vision tower and lm_head are never loaded (their keys do not map onto the language
    model). Layers after `max(text_out_layers)` cannot influence the hidden states FLUX.2
    reads, so they are not loaded either; one extra layer is kept so that transformers'
    `hidden_states[max]` stays the raw layer output rather than the final-norm output it
    substitutes for the last entry.
    """
    from transformers import AutoModel

    folder = checkpoint.component_dir("text_encoder")
    text_config = language_model_config(checkpoint, geometry)
    key_mapping = {prefix: "" for prefix in LANGUAGE_MODEL_PREFIXES}
    try:
        model = AutoModel.from_pretrained(folder, config=text_config, key_mapping=key_mapping, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the text encoder from {folder}: {_first_line(exc)}") from None
    return model.eval()


def load_transformer(checkpoint: Checkpoint, dtype):
    from diffusers import Flux2Transformer2DModel

    return _load_diffusers(Flux2Transformer2DModel, checkpoint.component_dir("transformer"), dtype)


def load_vae(checkpoint: Checkpoint, dtype):
    from diffusers import AutoencoderKLFlux2

    return _load_diffusers(AutoencoderKLFlux2, checkpoint.component_dir("vae"), dtype)


def _load_diffusers(cls, folder: Path, dtype):
    quiet_hf_libraries()
    try:
        return cls.from_pretrained(folder, dtype=dtype).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {cls.__name__} from {folder}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
