"""FP8 calibration: per-Linear input amax collected while diffusers' Flux2Pipeline draws images.

Max calibration, as in NVIDIA's FLUX.2 FP8 recipe: the shipped prompts (`calibration_prompts.txt`)
run through the PyTorch pipeline at the export's resolution and sequence length for a number of
steps; a forward pre-hook on every `nn.Linear` of the transformer and of the text encoder's
language model keeps the largest |input| it sees, across all prompts and timesteps. Seeds are
fixed (prompt i uses seed + i), so the same settings give the same amax.

The result is cached as JSON under `<cache>/calibration/<key>.json`; the key covers the checkpoint
(configs hash and weights fingerprint), the text encoder layers, the shapes, every setting, the
prompts' text and this code's version, so a re-run with the same inputs reuses it and any change
recalibrates. Written atomically.

Why not nvidia-modelopt: its calibration does the same max reduction, but its quantized modules
did not export with the dynamo exporter here and its `[onnx]` extra pins onnx ~=1.21 and
onnxruntime-gpu; twenty lines of hooks give the amax we need with no pins.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_json
from common.cache import default_cache_dir
from common.errors import UsageError
from common.specs import Geometry, Shapes

PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
# Bump when the amax this code collects changes for the same settings: it invalidates caches.
CALIBRATION_VERSION = 1
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class CalibrationSettings:
    prompts: int = 32  # NVIDIA's FLUX.2 demo calibrates on 32 prompts
    steps: int = 20  # ... for 20-30 steps
    seed: int = 0
    guidance: float = 4.0
    device: str = "cpu"  # cpu: float32; cuda: bfloat16 (a 32B transformer does not fit in fp32)

    def validate(self, available: int) -> None:
        if not 1 <= self.prompts <= available:
            raise UsageError(f"--calib-prompts {self.prompts} must be between 1 and {available} ({PROMPTS_FILE})")
        if self.steps < 1:
            raise UsageError(f"--calib-steps {self.steps} must be at least 1")
        if self.device not in DEVICES:
            raise UsageError(f"--calib-device {self.device!r} is not one of {', '.join(DEVICES)}")


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def calibration_key(checkpoint, geometry: Geometry, shapes: Shapes, settings: CalibrationSettings, prompts) -> str:
    payload = {
        "config_sha256": checkpoint.config_hash(),
        "weights_fingerprint": checkpoint.weights_fingerprint(),
        "text_out_layers": list(geometry.text_out_layers),
        "shapes": shapes.to_json(),
        "settings": dataclasses.asdict(settings),
        "prompts": list(prompts),
        "version": CALIBRATION_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(key: str, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "calibration" / f"{key}.json"


def calibrate(
    checkpoint,
    geometry: Geometry,
    shapes: Shapes,
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    cache_dir: Path | None = None,
    log=None,
) -> dict:
    """Input amax per Linear, {"transformer": {path: amax}, "text_encoder": {...}, ...}; cached."""
    log = log or (lambda message: print(message, file=sys.stderr))
    all_prompts = load_prompts()
    settings.validate(len(all_prompts))
    prompts = all_prompts[: settings.prompts]
    key = calibration_key(checkpoint, geometry, shapes, settings, prompts)
    path = cache_path(key, cache_dir)
    cached = _read_cache(path, key)
    if cached is not None:
        cached["reused"] = True
        return cached

    started = time.perf_counter()
    amax = _run_pipeline(checkpoint, geometry, shapes, settings, prompts)
    gc.collect()  # the float32 pipeline is the largest thing an fp8 export holds: free it before exporting
    result = {
        "key": key,
        "settings": dataclasses.asdict(settings),
        "shapes": shapes.to_json(),
        "checkpoint": str(checkpoint.root),
        "prompts": len(prompts),
        "transformer_calls": amax.pop("_transformer_calls"),
        "seconds": round(time.perf_counter() - started, 2),
        **amax,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result, indent=1, sort_keys=True)
    log(f"calibrated FP8 scales on {len(prompts)} prompts x {settings.steps} steps in {result['seconds']} s: {path}")
    result["reused"] = False
    return result


def _read_cache(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("key") != key or not isinstance(data.get("transformer"), dict):
        return None
    return data


def language_model_of(text_encoder):
    """The decoder stack inside a text encoder (Mistral3's language model, a causal LM's `.model`)."""
    for attribute in ("model.language_model", "language_model", "model"):
        module = text_encoder
        for part in attribute.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None and hasattr(module, "layers"):
            return module
    return text_encoder


class AmaxRecorder:
    """Forward pre-hooks on every nn.Linear of a module: the running max of |input|."""

    def __init__(self, module):
        import torch

        self._amax: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear):
                self._handles.append(child.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        import torch

        def record(_module, args):
            current = args[0].detach().abs().amax().float()  # stays on the device: no sync per call
            previous = self._amax.get(name)
            self._amax[name] = current if previous is None else torch.maximum(previous, current)

        return record

    def result(self) -> dict[str, float]:
        return {name: float(value) for name, value in sorted(self._amax.items())}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def load_pipeline(checkpoint, dtype, device: str = "cpu"):
    """diffusers' pipeline for the checkpoint, built from its parts (the published [dev] folder names a
    PixtralProcessor, which needs torchvision: see common/reference_pipeline.py)."""
    from common.reference_pipeline import reference_pipeline

    return reference_pipeline(checkpoint.root, dtype=str(dtype).removeprefix("torch."), device=device)


def pipeline_kwargs(pipe, geometry: Geometry, shapes: Shapes, *, steps: int, guidance: float) -> dict:
    """The call arguments the export shapes fix, for whichever FLUX.2 pipeline class `pipe` is."""
    wanted = {
        "height": shapes.height,
        "width": shapes.width,
        "num_inference_steps": steps,
        "max_sequence_length": shapes.max_sequence_length,
        "text_encoder_out_layers": tuple(geometry.text_out_layers),
    }
    if geometry.guidance_embeds:
        wanted["guidance_scale"] = guidance
    if shapes.reference_images:  # editing artifacts: calibrate (and check) with K reference images
        from export.verify.reference import check_reference_pil_images

        wanted["image"] = check_reference_pil_images(shapes)
    accepted = inspect.signature(type(pipe).__call__).parameters
    return {name: value for name, value in wanted.items() if name in accepted}


def _run_pipeline(checkpoint, geometry, shapes, settings: CalibrationSettings, prompts) -> dict:
    import torch
    from tqdm import tqdm

    dtype = torch.float32 if settings.device == "cpu" else torch.bfloat16
    pipe = load_pipeline(checkpoint, dtype, settings.device)
    transformer = AmaxRecorder(pipe.transformer)
    text_encoder = AmaxRecorder(language_model_of(pipe.text_encoder))
    calls = [0]
    counter = pipe.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    kwargs = pipeline_kwargs(pipe, geometry, shapes, steps=settings.steps, guidance=settings.guidance)
    try:
        with torch.no_grad():
            for index, prompt in enumerate(tqdm(prompts, desc="FP8 calibration", unit="prompt", file=sys.stderr)):
                generator = torch.Generator(device="cpu").manual_seed(settings.seed + index)
                pipe(prompt=prompt, generator=generator, output_type="latent", **kwargs)
    finally:
        transformer.remove()
        text_encoder.remove()
        counter.remove()
    return {"transformer": transformer.result(), "text_encoder": text_encoder.result(), "_transformer_calls": calls[0]}
