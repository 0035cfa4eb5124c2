"""The FLUX.2 generation loop over any backend: tokenize, encode once, denoise, decode."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from common.errors import NonFiniteError, UsageError
from common.family import Family
from common.tokenizer import PromptTokenizer
from runtime.artifacts import Artifacts
from runtime.backends import Backend
from runtime.scheduler import SchedulerConfig, euler_step, flux2_schedule


def check_seed(seed: int, name: str = "--seed", error: type = UsageError) -> None:
    """The one seed rule: what a request's int64 seed tensor carries and `initial_noise` draws from."""
    if not 0 <= seed < 2**63:
        raise error(f"{name} {seed} must be in [0, 2**63)")


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


def count_non_finite(array) -> int:
    """NaN and Inf values in a numpy or torch array, counted where the array lives (the GPU for torch).

    The common case costs one reduction and one scalar read; the count is made only when one is found.
    """
    if isinstance(array, np.ndarray):
        finite = np.isfinite(
            array if array.dtype.kind in "fc" and array.dtype.itemsize >= 2 else array.astype(np.float32)
        )
        return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))
    import torch

    if array.device.type == "cpu" and array.dtype in (torch.float32, torch.float16):
        # numpy's isfinite is ~50x faster than torch's on the CPU (0.04 vs 3 ms for [1, 4096, 128], one thread)
        return count_non_finite(array.detach().numpy())
    finite = torch.isfinite(array)
    return 0 if bool(finite.all()) else int(finite.numel() - finite.sum().item())


def _numel(array) -> int:
    return int(array.size) if isinstance(array, np.ndarray) else int(array.numel())


def to_image(decoded: np.ndarray) -> np.ndarray:
    """VAE output [B, 3, H, W] in [-1, 1] -> float [B, H, W, 3] in [0, 1], as diffusers' postprocess."""
    return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


class GenerationCancelled(Exception):
    """The caller's `cancelled()` said stop; raised between denoising steps (a server's cancelled request)."""


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


@dataclass
class Timings:
    stages: dict = field(default_factory=lambda: defaultdict(float))
    backend: float = 0.0  # seconds spent inside backend.run / to_host (the rest is our overhead)

    def as_dict(self) -> dict:
        return {**{f"{k}_s": round(v, 6) for k, v in self.stages.items()}, "backend_s": round(self.backend, 6)}


class Flux2Runtime:
    def __init__(self, artifacts: Artifacts, backend: Backend, *, check_finite: bool = True):
        self.artifacts = artifacts
        # Every stage's output is checked for NaN/Inf: a damaged weight or an overflow otherwise ends
        # as a black image and exit 0. runtime.check turns it off to measure how far off the outputs are.
        self.check_finite = check_finite
        self.backend = backend
        pipeline_class = artifacts.geometry.pipeline_class
        self.tokenizer = PromptTokenizer(
            artifacts.folder / "tokenizer", artifacts.shapes.max_sequence_length, pipeline_class=pipeline_class
        )
        self.tokenizer.check_record(artifacts.manifest.tokenizer.reading(), artifacts.folder / "manifest.json")
        self.pipeline_class = pipeline_class
        self.scheduler = SchedulerConfig.from_json(
            artifacts.scheduler_json(), str(artifacts.folder / "scheduler_config.json")
        )
        self.batch = artifacts.shapes.batch_size

    def _run(self, component: str, feeds: dict, timings: Timings, where: str = "") -> dict:
        started = time.perf_counter()
        out = self.backend.run(component, feeds)
        timings.backend += time.perf_counter() - started
        # On a GPU backend the scalar read waits for the stage: the host no longer queues the next step
        # ahead of the device. Its cost against a transformer step is not measured here (no GPU).
        if self.check_finite:
            for name, value in out.items():
                if bad := count_non_finite(value):
                    raise NonFiniteError(
                        f"{component} output {name} has {bad} NaN/Inf values of {_numel(value)}{where}; "
                        f"no image was written for it. The {self.artifacts.precision} weights are damaged or the "
                        f"arithmetic overflowed: run `python -m runtime.verify {self.artifacts.folder}` and "
                        f"`python -m runtime.check --artifacts {self.artifacts.folder}`"
                    )
        return out

    def uses_cfg(self, guidance: float) -> bool:
        """True classifier-free guidance: klein base models with a scale above 1, as diffusers decides."""
        geometry = self.artifacts.geometry
        return self.pipeline_class == Family.KLEIN and not geometry.is_distilled and guidance > 1

    def guidance_warning(self, guidance: float) -> str | None:
        if self.pipeline_class == Family.KLEIN and self.artifacts.geometry.is_distilled and guidance > 1:
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

    def encode_references(self, images: np.ndarray, timings: Timings):
        """Reference images [K, 3, H, W] in [-1, 1] -> the transformer's `reference_latents` [B, K*M, C], once.

        The VAE encoder graph gives one row of M tokens per image; Flux2Pipeline concatenates the
        K rows into one sequence and repeats it for every row of the batch.
        """
        started = time.perf_counter()
        tokens = self._run("vae_encoder", {"reference_images": self.backend.from_host(images)}, timings)
        tokens = tokens["reference_tokens"]
        k, m, c = tokens.shape
        joined = tokens.reshape(1, k * m, c)
        timings.stages["vae_encoder"] += time.perf_counter() - started
        return _concat([joined] * self.batch)

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
        paired_cfg: bool = False,
        reference_latents=None,
        cancelled=None,
    ):
        """Run the sampling loop on backend arrays; no host round trip inside the loop.

        With `negative_embeds` (klein base, CFG): v = v_neg + g * (v_cond - v_neg), from two
        transformer evaluations per step, as diffusers' Flux2KleinPipeline does. Batch-2
        artifacts instead pass `prompt_embeds` holding [prompt, negative] and latents [x, x]:
        one evaluation (`paired_cfg`), rows 0 and 1 combined the same way.
        `cancelled`, a callable, is asked before each step; True raises GenerationCancelled.
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
            if cancelled is not None and cancelled():
                raise GenerationCancelled(f"cancelled before denoising step {index + 1} of {schedule.steps}")
            feeds = {
                "hidden_states": latents,
                "encoder_hidden_states": prompt_embeds,
                "timestep": timestep_feeds[index],
            }
            if reference_latents is not None:
                feeds["reference_latents"] = reference_latents
            if self.artifacts.geometry.guidance_embeds:
                feeds["guidance"] = guidance_feed
            where = f" at denoising step {index + 1} of {schedule.steps}"
            velocity = self._run("transformer", feeds, timings, where)["velocity"]
            if negative_embeds is not None:
                negative_feeds = {**feeds, "encoder_hidden_states": negative_embeds}
                negative = self._run("transformer", negative_feeds, timings, f"{where} (negative prompt)")["velocity"]
                velocity = negative + guidance * (velocity - negative)
            elif paired_cfg:
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
        reference_images: np.ndarray | None = None,
        cancelled=None,
    ):
        """Yield (index, image float [H, W, 3] in [0, 1], timings) per image, as each is finished.

        `reference_images` [K, 3, H, W] in [-1, 1] (`runtime.reference_images.load_references`) are
        encoded once and condition every step, for artifacts exported with K reference images.
        `cancelled()` (optional) is polled between denoising steps: a server stops work for a
        request its client gave up on.
        """
        from runtime.reference_images import CountWords, check_count

        given = 0 if reference_images is None else reference_images.shape[0]
        words = CountWords(
            "reference image(s) given",
            f"the artifacts {self.artifacts.folder} take",
            "pass {expected} --image",
            "re-export with",
        )
        check_count(given, self.artifacts.shapes.reference_images, words)
        timings = Timings()
        noise = initial_noise(self.artifacts, seed, num_images)
        references = None if reference_images is None else self.encode_references(reference_images, timings)
        if self.uses_cfg(guidance) and self.batch == 2:  # the CFG pair evaluated as one batch-2 call
            yield from self._generate_paired(
                prompt, negative_prompt, noise, steps, guidance, timings, progress, references, cancelled
            )
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
                reference_latents=references,
                cancelled=cancelled,
            )
            images = self.decode(latents, image_timings)
            image_timings.stages["total"] = time.perf_counter() - began + sum(timings.stages.values()) * (start == 0)
            for offset in range(min(self.batch, num_images - start)):
                yield start + offset, images[offset], image_timings

    def _generate_paired(
        self, prompt, negative_prompt, noise, steps, guidance, timings, progress, references=None, cancelled=None
    ):
        """Batch-2 artifacts with CFG: rows are [prompt, negative] over the same latents."""
        prompt_embeds = self.encode_prompt([prompt, negative_prompt], timings)
        for index in range(noise.shape[0]):
            image_timings = timings if index == 0 else Timings()
            began = time.perf_counter()
            pair = self.backend.from_host(np.concatenate([noise[index : index + 1]] * 2))
            latents = self.denoise(
                pair,
                prompt_embeds,
                steps=steps,
                guidance=guidance,
                timings=image_timings,
                progress=progress,
                paired_cfg=True,
                reference_latents=references,
                cancelled=cancelled,
            )
            image = self.decode(latents, image_timings)[0]
            encode = (
                timings.stages["tokenize"] + timings.stages["text_encoder"] + timings.stages.get("vae_encoder", 0.0)
                if index == 0
                else 0.0
            )
            image_timings.stages["total"] = time.perf_counter() - began + encode
            yield index, image, image_timings
