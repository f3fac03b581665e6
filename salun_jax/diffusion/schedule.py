"""Noise schedule and the forward (noising) process q(x_t | x_0).

References:
  Ho et al. 2020 (DDPM) Eq. 4; upstream `DDPM/configs/cifar10_train.yml` (`beta_schedule
  linear`, 1e-4 .. 0.02, T = 1000); Stable Diffusion's "scaled_linear", betas =
  linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (ldm's "linear"; diffusers
  `schedulers/scheduling_ddim.py`).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class NoiseSchedule:
    """Discrete variance schedule.

    Attributes:
      betas: [T] float32 beta_t for t = 0 .. T-1.
      alphas_cumprod: [T] float32 abar_t = prod_{s <= t} (1 - beta_s).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def linear_schedule(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> NoiseSchedule:
    """The DDPM linear schedule, betas = linspace(beta_start, beta_end, T).

    Computed in float64 and stored as float32. (Upstream casts betas to float32 first and takes
    the cumulative product in float32; the difference in abar is ~1e-6 relative.)

    Args:
      num_timesteps: T.
      beta_start: beta_0.
      beta_end: beta_{T-1}.

    Returns:
      A `NoiseSchedule`.

    Raises:
      ValueError: T < 1 or betas outside (0, 1).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(f"betas must lie in (0, 1), got {beta_start} and {beta_end}.")
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
    )


def scaled_linear_schedule(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> NoiseSchedule:
    """Stable Diffusion's "scaled_linear" schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2.

    (ldm calls it "linear"; diffusers' DDIM/LMS/Euler schedulers of SD v1.x use it with
    0.00085 .. 0.012, T = 1000.) Computed in float64, stored as float32.

    Raises:
      ValueError: T < 1 or betas outside (0, 1).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(f"betas must lie in (0, 1), got {beta_start} and {beta_end}.")
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32),
    )


SCHEDULES = {"linear": linear_schedule, "scaled_linear": scaled_linear_schedule}


def make_schedule(kind: str = "linear", **kwargs) -> NoiseSchedule:
    """`SCHEDULES[kind](**kwargs)`; raises ValueError for an unknown kind."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[kind](**kwargs)


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    Args:
      schedule: the noise schedule.
      x0: [B, ...] clean data.
      t: [B] int timesteps in [0, T).
      noise: like x0, standard normal.

    Returns:
      x_t, shaped like x0.
    """
    abar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise
