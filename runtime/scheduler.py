"""FLUX.2's sampler as small pure functions (numpy, float32 where diffusers uses float32).

Reproduces `Flux2Pipeline.__call__` + `FlowMatchEulerDiscreteScheduler` without importing
either: sigmas = linspace(1, 1/N, N), shifted by FLUX.2's empirical mu with the exponential (or
linear) time shift, a terminal sigma of 0 appended; the transformer gets t/1000 where
t = sigma * 1000 in float32; the Euler update is x <- x + (sigma_next - sigma) * v in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.errors import ArtifactsError


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift (BFL's `compute_empirical_mu`)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def time_shift_exponential(mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def time_shift_linear(mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
    return mu / (mu + (1 / t - 1) ** sigma)


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a FlowMatchEulerDiscreteScheduler config that FLUX.2's schedule reads."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    @classmethod
    def from_json(cls, data: dict, source: str = "scheduler_config.json") -> SchedulerConfig:
        unsupported = [
            key
            for key in (
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "invert_sigmas",
                "stochastic_sampling",
                "use_flow_sigmas",
            )
            if data.get(key)
        ]
        if unsupported:
            raise ArtifactsError(
                f"{source} sets {', '.join(unsupported)}, which FLUX.2's sampler here does not implement"
            )
        if data.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise ArtifactsError(
                f"{source} has time_shift_type {data['time_shift_type']!r}; expected exponential or linear"
            )
        return cls(
            num_train_timesteps=int(data.get("num_train_timesteps", 1000)),
            shift=float(data.get("shift", 1.0)),
            use_dynamic_shifting=bool(data.get("use_dynamic_shifting", False)),
            time_shift_type=data.get("time_shift_type", "exponential"),
            shift_terminal=data.get("shift_terminal"),
        )


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # float32 [N + 1], the last one 0
    timesteps: np.ndarray  # float32 [N], sigma * num_train_timesteps as diffusers computes it
    transformer_timesteps: np.ndarray  # float32 [N], what the transformer receives: timesteps / 1000

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def dt(self, index: int) -> np.float32:
        """sigma_next - sigma for step `index`, in float32 as the scheduler computes it."""
        return np.float32(self.sigmas[index + 1] - self.sigmas[index])


def flux2_schedule(config: SchedulerConfig, num_steps: int, image_seq_len: int) -> Schedule:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if config.use_dynamic_shifting:
        mu = empirical_mu(image_seq_len, num_steps)
        shift = time_shift_exponential if config.time_shift_type == "exponential" else time_shift_linear
        sigmas = shift(mu, 1.0, sigmas)
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    if config.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    sigmas = np.asarray(sigmas, dtype=np.float32)
    timesteps = (sigmas * np.float32(config.num_train_timesteps)).astype(np.float32)
    return Schedule(
        sigmas=np.concatenate([sigmas, np.zeros(1, np.float32)]),
        timesteps=timesteps,
        transformer_timesteps=(timesteps / np.float32(1000)).astype(np.float32),
    )


def euler_step(latents, velocity, dt):
    """x <- x + dt * v; works on numpy arrays and torch tensors alike."""
    return latents + dt * velocity
