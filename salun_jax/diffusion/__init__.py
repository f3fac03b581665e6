"""Diffusion: the noise schedule and the CFG-guided DDIM/DDPM samplers.

Training (`salun_jax.train_diffusion`), the denoising losses (`salun_jax.losses`), unlearning
(`salun_jax.unlearn.diffusion`) and generation metrics (`salun_jax.evaluation.generation`) build
on these.
"""

from salun_jax.diffusion.samplers import (
    check_null_class,
    ddim_sample,
    ddpm_sample,
    guided_eps,
    timestep_sequence,
    to_uint8,
)
from salun_jax.diffusion.schedule import NoiseSchedule, linear_schedule, q_sample

__all__ = [
    "NoiseSchedule",
    "check_null_class",
    "ddim_sample",
    "ddpm_sample",
    "guided_eps",
    "linear_schedule",
    "q_sample",
    "timestep_sequence",
    "to_uint8",
]
