"""Check quantized (FP8, NVFP4) graphs on a CPU end to end through diffusers.

The float32 twin of a quantized graph (`common.cpu_twin`: bf16 widened to float32, FP8 Q/DQ kept,
NVFP4 weights dequantized exactly and its dynamic activation quantization in standard operators)
is what ONNX Runtime's CPU provider runs. Its error against fp32 PyTorch is the quantization
error alone; the bf16 graph adds bf16 rounding on top, which `export.verify.onnx_run`'s reference
evaluator measures on small graphs.

End to end: diffusers' `Flux2Pipeline` in bf16, once as it is and once with its transformer
replaced by `TwinTransformer`, a shim that runs the twin in ONNX Runtime; same prompt, seed and
steps; PSNR between the two images.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.cpu_twin import ort_session
from common.metrics import psnr
from common.specs import LORA_A, LORA_B

# The end-to-end check: a prompt outside the calibration set, FLUX.2 [dev]'s default guidance.
E2E_PROMPT = "A photograph of a red fox sitting in fresh snow at dawn, soft light, shallow depth of field."
E2E_SEED = 0
E2E_STEPS = 8
E2E_GUIDANCE = 4.0


class TwinTransformer(nn.Module):
    """Stands in for diffusers' transformer inside Flux2Pipeline and runs an ONNX graph instead.

    The pipeline calls `transformer(hidden_states=..., encoder_hidden_states=..., timestep=t/1000,
    guidance=..., txt_ids=..., img_ids=..., return_dict=False)`; the graph takes the first four
    (position ids are constants in it). Its output is returned in the pipeline's dtype, so the
    sampler is the pipeline's own.
    """

    def __init__(self, graph: Path, original: nn.Module):
        super().__init__()
        self.session = ort_session(graph)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.empty_slots = {
            i.name: np.zeros(i.shape, np.float32)
            for i in self.session.get_inputs()
            if i.name.startswith((LORA_A, LORA_B))
        }
        self.config = original.config  # the pipeline reads in_channels from it
        self._dtype, self._device = original.dtype, original.device
        self.calls = 0

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    def cache_context(self, name):
        """Flux2KleinPipeline wraps each (CFG) pass in `transformer.cache_context(...)`; the graph caches nothing."""
        return contextlib.nullcontext()

    def forward(self, hidden_states, encoder_hidden_states, timestep, guidance=None, return_dict=False, **_):
        reference_latents = None
        if "reference_latents" in self.input_names:
            # An editing graph: the pipeline concatenated the reference tokens after the latents.
            reference_tokens = self.session.get_inputs()[self.input_names.index("reference_latents")].shape[1]
            split = hidden_states.shape[1] - reference_tokens
            hidden_states, reference_latents = hidden_states[:, :split], hidden_states[:, split:]
        values = {
            "reference_latents": reference_latents,
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "timestep": timestep,
            "guidance": guidance,
        }
        feeds = {name: values[name].detach().float().cpu().numpy() for name in self.input_names if name in values}
        feeds |= self.empty_slots  # LoRA slots at zero: the base model, which the pipeline draws
        (velocity,) = self.session.run(["velocity"], feeds)
        self.calls += 1
        return (torch.from_numpy(velocity).to(hidden_states.device, hidden_states.dtype),)


def end_to_end(checkpoint, geometry, shapes, twin_graph: Path, *, steps: int = E2E_STEPS, name: str = "fp8") -> dict:
    """PSNR of the pipeline with the FP8 twin transformer against the bf16 (and fp32) pipeline."""
    import time

    from export.fp8.calibrate import load_pipeline, pipeline_kwargs

    started = time.perf_counter()

    def draw(pipe):
        generator = torch.Generator(device="cpu").manual_seed(E2E_SEED)
        with torch.no_grad():
            return pipe(prompt=E2E_PROMPT, generator=generator, output_type="np", **kwargs).images[
                0
            ]  # [H, W, 3] in [0, 1]

    bf16_pipe = load_pipeline(checkpoint, torch.bfloat16)
    kwargs = pipeline_kwargs(bf16_pipe, geometry, shapes, steps=steps, guidance=E2E_GUIDANCE)
    bf16_image = draw(bf16_pipe)
    twin = TwinTransformer(twin_graph, bf16_pipe.transformer)
    fp8_pipe = type(bf16_pipe)(**{**bf16_pipe.components, "transformer": twin})
    fp8_pipe.set_progress_bar_config(disable=True)
    fp8_image = draw(fp8_pipe)
    # [klein] base models run true CFG: a second transformer pass per step on the negative prompt.
    passes = 2 if getattr(fp8_pipe, "do_classifier_free_guidance", False) else 1
    if twin.calls != steps * passes:
        raise RuntimeError(
            f"the FP8 twin ran {twin.calls} times for {steps} steps x {passes} passes: the shim was bypassed"
        )
    del bf16_pipe, fp8_pipe, twin
    fp32_image = draw(load_pipeline(checkpoint, torch.float32))
    return {
        "method": "diffusers Flux2Pipeline (bf16) vs the same pipeline with its transformer replaced by the fp32 "
        f"twin of the {name} graph in ONNX Runtime",
        "prompt": E2E_PROMPT,
        "seed": E2E_SEED,
        "steps": steps,
        "guidance": E2E_GUIDANCE,
        "height": shapes.height,
        "width": shapes.width,
        "psnr_db": {
            f"{name}_vs_bf16": psnr(fp8_image, bf16_image),
            f"{name}_vs_fp32": psnr(fp8_image, fp32_image),
            "bf16_vs_fp32": psnr(bf16_image, fp32_image),  # the bf16 pipeline's own distance from fp32
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
