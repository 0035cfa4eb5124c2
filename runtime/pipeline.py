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
        self.tokenizer = PromptTokenizer(artifacts.folder / "tokenizer", artifacts.shapes.max_sequence_length)
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

    def encode_prompt(self, prompt: str, timings: Timings):
        started = time.perf_counter()
        ids, mask = self.tokenizer.encode([prompt] * self.batch)
        timings.stages["tokenize"] += time.perf_counter() - started
        started = time.perf_counter()
        feeds = {"input_ids": self.backend.from_host(ids), "attention_mask": self.backend.from_host(mask)}
        embeds = self._run("text_encoder", feeds, timings)["prompt_embeds"]
        timings.stages["text_encoder"] += time.perf_counter() - started
        return embeds

    def denoise(self, latents, prompt_embeds, *, steps: int, guidance: float, timings: Timings, progress: bool = True):
        """Run the sampling loop on backend arrays; no host round trip inside the loop."""
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

    def generate(
        self, prompt: str, *, seed: int, steps: int, guidance: float, num_images: int = 1, progress: bool = True
    ):
        """Yield (index, image float [H, W, 3] in [0, 1], timings) per image, as each is finished."""
        timings = Timings()
        prompt_embeds = self.encode_prompt(prompt, timings)
        noise = initial_noise(self.artifacts, seed, num_images)
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
            )
            images = self.decode(latents, image_timings)
            image_timings.stages["total"] = time.perf_counter() - began + sum(timings.stages.values()) * (start == 0)
            for offset in range(min(self.batch, num_images - start)):
                yield start + offset, images[offset], image_timings
