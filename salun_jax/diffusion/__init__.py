"""Diffusion core: noise schedule, denoising loss, CFG-guided DDIM/DDPM samplers."""

from salun_jax.diffusion.losses import (
    antithetic_timesteps,
    diffusion_loss,
    make_denoising_loss_fn,
    sample_null_mask,
)
from salun_jax.diffusion.samplers import (
    ddim_sample,
    ddpm_sample,
    guided_eps,
    timestep_sequence,
    to_uint8,
)
from salun_jax.diffusion.schedule import NoiseSchedule, linear_schedule, q_sample

__all__ = [
    "NoiseSchedule",
    "antithetic_timesteps",
    "ddim_sample",
    "ddpm_sample",
    "diffusion_loss",
    "guided_eps",
    "linear_schedule",
    "make_denoising_loss_fn",
    "q_sample",
    "sample_null_mask",
    "timestep_sequence",
    "to_uint8",
]
