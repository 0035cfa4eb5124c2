"""The sampler against diffusers' FlowMatchEulerDiscreteScheduler + compute_empirical_mu over a grid."""

import numpy as np
import pytest
import torch

from runtime.scheduler import SchedulerConfig, empirical_mu, euler_step, flux2_schedule

FLUX2_DEV_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}

SEQ_LENS = [64, 256, 1024, 4096, 4300, 4301, 6400, 16384]
STEPS = [1, 2, 4, 10, 28, 50]


def _diffusers(config: dict, steps: int, seq_len: int):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = compute_empirical_mu(image_seq_len=seq_len, num_steps=steps)
    scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)
    return scheduler, mu


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_schedule_matches_diffusers_over_grid(time_shift_type):
    config = {**FLUX2_DEV_SCHEDULER, "time_shift_type": time_shift_type}
    ours_config = SchedulerConfig.from_json(config)
    worst = 0.0
    for seq_len in SEQ_LENS:
        for steps in STEPS:
            reference, mu = _diffusers(config, steps, seq_len)
            assert empirical_mu(seq_len, steps) == mu
            ours = flux2_schedule(ours_config, steps, seq_len)
            np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(ours.timesteps, reference.timesteps.numpy(), rtol=0, atol=1e-6 * 1000)
            # what the pipeline hands the transformer: (t.expand(B).to(float32)) / 1000
            fed = (reference.timesteps.to(torch.float32) / 1000).numpy()
            np.testing.assert_allclose(ours.transformer_timesteps, fed, rtol=0, atol=1e-6)
            worst = max(worst, float(np.abs(ours.sigmas - reference.sigmas.numpy()).max()))
    assert worst <= 1e-6


def test_empirical_mu_branch_above_4300_tokens():
    assert empirical_mu(4301, 1) == empirical_mu(4301, 50)  # no step dependence above 4300
    assert empirical_mu(4300, 1) != empirical_mu(4300, 50)


def test_euler_steps_match_scheduler_step():
    reference, _ = _diffusers(FLUX2_DEV_SCHEDULER, 6, 1024)
    ours = flux2_schedule(SchedulerConfig.from_json(FLUX2_DEV_SCHEDULER), 6, 1024)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=generator)
    y = x.numpy().copy()
    for index, t in enumerate(reference.timesteps):
        v = torch.randn(1, 16, 8, generator=generator)
        x = reference.step(v, t, x, return_dict=False)[0]
        y = euler_step(y, v.numpy(), ours.dt(index))
    np.testing.assert_allclose(y, x.numpy(), rtol=0, atol=1e-6)


def test_unsupported_scheduler_config_is_refused():
    from common.errors import ArtifactsError

    with pytest.raises(ArtifactsError, match="use_karras_sigmas"):
        SchedulerConfig.from_json({**FLUX2_DEV_SCHEDULER, "use_karras_sigmas": True})
