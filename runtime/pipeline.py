"""The FLUX.2 generation loop over any backend: tokenize, encode once, denoise, decode."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from common.errors import NonFiniteError, UsageError
from common.family import Family
from runtime import step_cache
from runtime.artifacts import Artifacts
from runtime.backends import Array, Backend
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
        # numpy's isfinite is far faster than torch's on the CPU (measured: docs/faults.md)
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
    cache: dict | None = None  # the step cache's record (runtime.step_cache.summary) when it was on

    def as_dict(self) -> dict:
        return {**{f"{k}_s": round(v, 6) for k, v in self.stages.items()}, "backend_s": round(self.backend, 6)}


@dataclass(frozen=True)
class Sampling:
    """What one `Flux2Runtime.generate` call draws: the prompt (and the negative one, for true CFG),
    the noise seed, the sampler's steps and guidance, and how many images from that seed."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    num_images: int = 1
    negative_prompt: str = ""
    # The first-block step cache's threshold (runtime/step_cache.py, docs/cache.md); 0: every block every step.
    cache_threshold: float = 0.0


@dataclass(frozen=True)
class Conditioning:
    """What every denoising step is conditioned on, as backend arrays, encoded once per prompt."""

    prompt_embeds: Array  # [B, L, D]; with `paired_cfg`, rows [prompt, negative]
    negative_embeds: Array | None = None  # klein base CFG: a second transformer evaluation per step
    paired_cfg: bool = False  # batch-2 artifacts: the CFG pair in one evaluation
    reference_latents: Array | None = None  # [B, K*M, C], editing: the reference images' tokens


def transformer_feeds(latents, conditioning: Conditioning, timestep, guidance, *, guidance_embeds: bool) -> dict:
    """The transformer's named inputs for one evaluation (the denoising loop's, and runtime.check's on
    both sides): `timestep` and `guidance` are [B] arrays; `guidance` is fed only where the graph takes it."""
    feeds = {"hidden_states": latents, "encoder_hidden_states": conditioning.prompt_embeds, "timestep": timestep}
    if conditioning.reference_latents is not None:
        feeds["reference_latents"] = conditioning.reference_latents
    if guidance_embeds:
        feeds["guidance"] = guidance
    return feeds


class Flux2Runtime:
    def __init__(self, artifacts: Artifacts, backend: Backend, *, check_finite: bool = True):
        self.artifacts = artifacts
        # Every stage's output is checked for NaN/Inf: a damaged weight or an overflow otherwise ends
        # as a black image and exit 0. runtime.check turns it off to measure how far off the outputs are.
        self.check_finite = check_finite
        self.backend = backend
        self.tokenizer = artifacts.prompt_tokenizer()
        self.pipeline_class = artifacts.geometry.pipeline_class
        self.scheduler = SchedulerConfig.from_json(
            artifacts.scheduler_json(), str(artifacts.folder / "scheduler_config.json")
        )
        self.batch = artifacts.shapes.batch_size
        # The transformer's LoRA-slot inputs (artifacts exported with --lora-rank): zeros until use_loras.
        self.adapter_feeds: dict = {}
        self.loras: tuple = ()
        self.use_loras(())

    def use_loras(self, loras: tuple) -> None:
        """Draw with `loras` ((common.lora.Lora, scale) pairs, runtime.lora.open_loras) from now on; () for none."""
        from runtime.lora import lora_arrays

        arrays = lora_arrays(loras, self.artifacts.shapes)
        self.adapter_feeds = {name: self.backend.from_host(array) for name, array in arrays.items()}
        self.loras = tuple(loras)
        if hasattr(self.backend, "use_loras"):  # diffusers' modules (torch backend) take them as adapters
            self.backend.use_loras(self.loras)

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

    def prompt_fit(self, prompt: str) -> dict:
        """How the prompt fits the exported length, as each image's sidecar records it: its token count
        once formatted, and whether the graphs cut it (diffusers cuts it the same way)."""
        counted = self.tokenizer.tokenize(prompt)
        return {"prompt_tokens": counted.length, "prompt_truncated": counted.truncated}

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

    def batch_scalar(self, value: float):
        """[B] float32 on the backend: a timestep or the guidance scale for every row of the graph's batch."""
        return self.backend.from_host(np.full((self.batch,), value, np.float32))

    def denoise(
        self,
        latents,
        conditioning: Conditioning,
        sampling: Sampling,
        timings: Timings,
        *,
        progress: bool = True,
        cancelled=None,
    ):
        """Run `sampling.steps` steps at `sampling.guidance` on backend arrays; no host round trip inside the loop.

        With `conditioning.negative_embeds` (klein base, CFG): v = v_neg + g * (v_cond - v_neg), from
        two transformer evaluations per step, as diffusers' Flux2KleinPipeline does. Batch-2
        artifacts instead pass `prompt_embeds` holding [prompt, negative] and latents [x, x]:
        one evaluation (`paired_cfg`), rows 0 and 1 combined the same way.
        `cancelled`, a callable, is asked before each step; True raises GenerationCancelled.
        """
        from tqdm import tqdm

        started = time.perf_counter()
        guidance = sampling.guidance
        schedule = flux2_schedule(self.scheduler, sampling.steps, latents.shape[1])
        timestep_feeds = [self.batch_scalar(t) for t in schedule.transformer_timesteps]
        guidance_feed = self.batch_scalar(guidance)
        guidance_embeds = self.artifacts.geometry.guidance_embeds
        passes = 2 if conditioning.negative_embeds is not None else 1
        caches = step_cache.new_caches(sampling.cache_threshold, self.artifacts, passes)
        for index in tqdm(
            range(schedule.steps), desc="denoise", unit="step", disable=not progress, file=sys.stderr, leave=False
        ):
            if cancelled is not None and cancelled():
                raise GenerationCancelled(f"cancelled before denoising step {index + 1} of {schedule.steps}")
            feeds = transformer_feeds(
                latents, conditioning, timestep_feeds[index], guidance_feed, guidance_embeds=guidance_embeds
            )
            feeds.update(self.adapter_feeds)
            where = f" at denoising step {index + 1} of {schedule.steps}"
            velocity = self._transformer(feeds, timings, where, caches[0] if caches else None)
            if conditioning.negative_embeds is not None:
                negative_feeds = {**feeds, "encoder_hidden_states": conditioning.negative_embeds}
                where = f"{where} (negative prompt)"
                negative = self._transformer(negative_feeds, timings, where, caches[1] if caches else None)
                velocity = negative + guidance * (velocity - negative)
            elif conditioning.paired_cfg:
                cond, negative = velocity[:1], velocity[1:2]
                velocity = _concat([negative + guidance * (cond - negative)] * 2)
            latents = euler_step(latents, velocity, schedule.dt(index))
        timings.stages["denoise"] += time.perf_counter() - started
        if caches:
            timings.cache = step_cache.summary(sampling.cache_threshold, caches)
        return latents

    def _transformer(self, feeds: dict, timings: Timings, where: str, cache):
        """One transformer evaluation's velocity: the full graph, or the step cache's graphs."""
        if cache is None:
            return self._run("transformer", feeds, timings, where)["velocity"]
        return cache.velocity(feeds, lambda component, inputs: self._run(component, inputs, timings, where))

    def decode(self, latents, timings: Timings) -> np.ndarray:
        started = time.perf_counter()
        decoded = self._run("vae", {"packed_latents": latents}, timings)["image"]
        host_started = time.perf_counter()
        decoded = self.backend.to_host(decoded)
        timings.backend += time.perf_counter() - host_started
        timings.stages["vae"] += time.perf_counter() - started
        return to_image(decoded)

    def generate(self, sampling: Sampling, *, progress: bool = True, reference_images=None, cancelled=None):
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
        noise = initial_noise(self.artifacts, sampling.seed, sampling.num_images)
        references = None if reference_images is None else self.encode_references(reference_images, timings)
        if self.uses_cfg(sampling.guidance) and self.batch == 2:  # the CFG pair evaluated as one batch-2 call
            embeds = self.encode_prompt([sampling.prompt, sampling.negative_prompt], timings)
            conditioning = Conditioning(embeds, paired_cfg=True, reference_latents=references)
            yield from self._generate_paired(
                sampling, conditioning, noise, timings, progress=progress, cancelled=cancelled
            )
            return
        prompt_embeds = self.encode_prompt(sampling.prompt, timings)
        negative = self.encode_prompt(sampling.negative_prompt, timings) if self.uses_cfg(sampling.guidance) else None
        conditioning = Conditioning(prompt_embeds, negative, reference_latents=references)
        for start in range(0, sampling.num_images, self.batch):
            image_timings = (
                Timings(stages=defaultdict(float, timings.stages), backend=timings.backend) if start == 0 else Timings()
            )
            chunk = noise[start : start + self.batch]
            if chunk.shape[0] < self.batch:  # pad the last chunk to the engine's static batch
                chunk = np.concatenate([chunk, np.zeros((self.batch - chunk.shape[0], *chunk.shape[1:]), np.float32)])
            began = time.perf_counter()
            latents = self.denoise(
                self.backend.from_host(chunk),
                conditioning,
                sampling,
                image_timings,
                progress=progress,
                cancelled=cancelled,
            )
            images = self.decode(latents, image_timings)
            image_timings.stages["total"] = time.perf_counter() - began + sum(timings.stages.values()) * (start == 0)
            for offset in range(min(self.batch, sampling.num_images - start)):
                yield start + offset, images[offset], image_timings

    def _generate_paired(
        self,
        sampling: Sampling,
        conditioning: Conditioning,
        noise: np.ndarray,
        timings: Timings,
        *,
        progress,
        cancelled,
    ):
        """Batch-2 artifacts with CFG: rows are [prompt, negative] over the same latents."""
        for index in range(noise.shape[0]):
            image_timings = timings if index == 0 else Timings()
            began = time.perf_counter()
            pair = self.backend.from_host(np.concatenate([noise[index : index + 1]] * 2))
            latents = self.denoise(pair, conditioning, sampling, image_timings, progress=progress, cancelled=cancelled)
            image = self.decode(latents, image_timings)[0]
            encode = (
                timings.stages["tokenize"] + timings.stages["text_encoder"] + timings.stages.get("vae_encoder", 0.0)
                if index == 0
                else 0.0
            )
            image_timings.stages["total"] = time.perf_counter() - began + encode
            yield index, image, image_timings
