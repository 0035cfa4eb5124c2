"""The FLUX.2 generation loop over any backend: tokenize, encode once, denoise, decode."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from common.tokenizer import PromptTokenizer
from runtime.artifacts import Artifacts
from runtime.scheduler import SchedulerConfig, euler_step, flux2_schedule


def initial_noise(artifacts: Artifacts, seed: int, num_images: int) -> np.ndarray:
    """Packed noise [K, N, C] drawn exactly as diffusers' Flux2Pipeline draws it for one prompt.

    diffusers calls `torch.randn((K, C, H/16, W/16), generator=torch.Generator().manual_seed(seed))`
    on the CPU (float32 pipeline) and packs it to [K, H*W/256, C]; the same call here gives the
    same numbers, so a seed means the same image in both.
    """
    import torch

    geometry, shapes = artifacts.geometry, artifacts.shapes
    step = geometry.pixels_per_token
    shape = (num_images, geometry.in_channels, shapes.height // step, shapes.width // step)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return noise.reshape(num_images, geometry.in_channels, -1).permute(0, 2, 1).contiguous().numpy()


def _concat(arrays):
    """Concatenate on axis 0 in the arrays' own library (numpy or torch)."""
    if isinstance(arrays[0], np.ndarray):
        return np.concatenate(arrays)
    import torch

    return torch.cat(arrays)


def to_image(decoded: np.ndarray) -> np.ndarray:
    """VAE output [B, 3, H, W] in [-1, 1] -> float [B, H, W, 3] in [0, 1], as diffusers' postprocess."""
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


@dataclass
class Timings:
    stages: dict = field(default_factory=lambda: defaultdict(float))
    backend: float = 0.0  # seconds spent inside backend.run / to_host (the rest is our overhead)

    def as_dict(self) -> dict:
        return {**{f"{k}_s": round(v, 6) for k, v in self.stages.items()}, "backend_s": round(self.backend, 6)}


class Flux2Runtime:
    def __init__(self, artifacts: Artifacts, backend):
        self.artifacts = artifacts
        self.backend = backend
        pipeline_class = artifacts.geometry.pipeline_class
        self.tokenizer = PromptTokenizer(
            artifacts.folder / "tokenizer", artifacts.shapes.max_sequence_length, pipeline_class=pipeline_class
        )
        self.tokenizer.check_record(artifacts.manifest.get("tokenizer") or {}, artifacts.folder / "manifest.json")
        self.pipeline_class = pipeline_class
        self.scheduler = SchedulerConfig.from_json(
            artifacts.scheduler_json(), str(artifacts.folder / "scheduler_config.json")
        )
        self.batch = artifacts.shapes.batch_size

    def _run(self, component: str, feeds: dict, timings: Timings) -> dict:
        started = time.perf_counter()
        out = self.backend.run(component, feeds)
        timings.backend += time.perf_counter() - started
        return out

    def uses_cfg(self, guidance: float) -> bool:
        """True classifier-free guidance: klein base models with a scale above 1, as diffusers decides."""
        geometry = self.artifacts.geometry
        return self.pipeline_class == "Flux2KleinPipeline" and not geometry.is_distilled and guidance > 1

    def guidance_warning(self, guidance: float) -> str | None:
        if self.pipeline_class == "Flux2KleinPipeline" and self.artifacts.geometry.is_distilled and guidance > 1:
            return f"Guidance scale {guidance} is ignored for step-wise distilled models."
        return None

    def encode_prompt(self, prompt: str | list[str], timings: Timings):
        """Embeddings for the graph's batch: one prompt repeated, or exactly `batch` prompts."""
        prompts = [prompt] * self.batch if isinstance(prompt, str) else list(prompt)
        started = time.perf_counter()
        ids, mask = self.tokenizer.encode(prompts)
        timings.stages["tokenize"] += time.perf_counter() - started
        started = time.perf_counter()
        feeds = {"input_ids": self.backend.from_host(ids), "attention_mask": self.backend.from_host(mask)}
        embeds = self._run("text_encoder", feeds, timings)["prompt_embeds"]
        timings.stages["text_encoder"] += time.perf_counter() - started
        return embeds

    def denoise(
        self,
        latents,
        prompt_embeds,
        *,
        steps: int,
        guidance: float,
        timings: Timings,
        progress: bool = True,
        negative_embeds=None,
    ):
        """Run the sampling loop on backend arrays; no host round trip inside the loop.

        With `negative_embeds` (klein base, CFG): v = v_neg + g * (v_cond - v_neg), from two
        transformer evaluations per step, as diffusers' Flux2KleinPipeline does. Batch-2
        artifacts instead pass `prompt_embeds` holding [prompt, negative] and latents [x, x]:
        one evaluation, rows 0 and 1 combined the same way.
        """
        from tqdm import tqdm

        started = time.perf_counter()
        schedule = flux2_schedule(self.scheduler, steps, latents.shape[1])
        b = self.batch
        timestep_feeds = [self.backend.from_host(np.full((b,), t, np.float32)) for t in schedule.transformer_timesteps]
        guidance_feed = self.backend.from_host(np.full((b,), guidance, np.float32))
        for index in tqdm(
            range(schedule.steps), desc="denoise", unit="step", disable=not progress, file=sys.stderr, leave=False
        ):
            feeds = {
                "hidden_states": latents,
                "encoder_hidden_states": prompt_embeds,
                "timestep": timestep_feeds[index],
            }
            if self.artifacts.geometry.guidance_embeds:
                feeds["guidance"] = guidance_feed
            velocity = self._run("transformer", feeds, timings)["velocity"]
            if negative_embeds is not None:
                negative = self._run("transformer", {**feeds, "encoder_hidden_states": negative_embeds}, timings)[
                    "velocity"
                ]
                velocity = negative + guidance * (velocity - negative)
            elif self.paired_cfg:
                cond, negative = velocity[:1], velocity[1:2]
                velocity = _concat([negative + guidance * (cond - negative)] * 2)
            latents = euler_step(latents, velocity, schedule.dt(index))
        timings.stages["denoise"] += time.perf_counter() - started
        return latents

    def decode(self, latents, timings: Timings) -> np.ndarray:
        started = time.perf_counter()
        decoded = self._run("vae", {"packed_latents": latents}, timings)["image"]
        host_started = time.perf_counter()
        decoded = self.backend.to_host(decoded)
        timings.backend += time.perf_counter() - host_started
        timings.stages["vae"] += time.perf_counter() - started
        return to_image(decoded)

    paired_cfg = False  # set per call: the CFG pair evaluated as one batch-2 call

    def generate(
        self,
        prompt: str,
        *,
        seed: int,
        steps: int,
        guidance: float,
        num_images: int = 1,
        progress: bool = True,
        negative_prompt: str = "",
    ):
        """Yield (index, image float [H, W, 3] in [0, 1], timings) per image, as each is finished."""
        timings = Timings()
        noise = initial_noise(self.artifacts, seed, num_images)
        self.paired_cfg = self.uses_cfg(guidance) and self.batch == 2
        if self.paired_cfg:
            yield from self._generate_paired(prompt, negative_prompt, noise, steps, guidance, timings, progress)
            return
        prompt_embeds = self.encode_prompt(prompt, timings)
        negative_embeds = self.encode_prompt(negative_prompt, timings) if self.uses_cfg(guidance) else None
        for start in range(0, num_images, self.batch):
            image_timings = (
                Timings(stages=defaultdict(float, timings.stages), backend=timings.backend) if start == 0 else Timings()
            )
            chunk = noise[start : start + self.batch]
            if chunk.shape[0] < self.batch:  # pad the last chunk to the engine's static batch
                chunk = np.concatenate([chunk, np.zeros((self.batch - chunk.shape[0], *chunk.shape[1:]), np.float32)])
            began = time.perf_counter()
            latents = self.denoise(
                self.backend.from_host(chunk),
                prompt_embeds,
                steps=steps,
                guidance=guidance,
                timings=image_timings,
                progress=progress,
                negative_embeds=negative_embeds,
            )
            images = self.decode(latents, image_timings)
            image_timings.stages["total"] = time.perf_counter() - began + sum(timings.stages.values()) * (start == 0)
            for offset in range(min(self.batch, num_images - start)):
                yield start + offset, images[offset], image_timings

    def _generate_paired(self, prompt, negative_prompt, noise, steps, guidance, timings, progress):
        """Batch-2 artifacts with CFG: rows are [prompt, negative] over the same latents."""
        prompt_embeds = self.encode_prompt([prompt, negative_prompt], timings)
        for index in range(noise.shape[0]):
            image_timings = timings if index == 0 else Timings()
            began = time.perf_counter()
            pair = self.backend.from_host(np.concatenate([noise[index : index + 1]] * 2))
            latents = self.denoise(
                pair, prompt_embeds, steps=steps, guidance=guidance, timings=image_timings, progress=progress
            )
            image = self.decode(latents, image_timings)[0]
            encode = timings.stages["tokenize"] + timings.stages["text_encoder"] if index == 0 else 0.0
            image_timings.stages["total"] = time.perf_counter() - began + encode
            yield index, image, image_timings
