"""The conditional denoising loss of the SalUn DDPM code.

References:
  Ho et al. 2020 (DDPM) Eq. 14 (L_simple); reference-salun.md §6.2
  (`noise_estimation_loss_conditional`, antithetic t, class-drop 0.1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from salun_jax.diffusion.schedule import NoiseSchedule, q_sample

PyTree = Any
REDUCTIONS = ("upstream", "mean", "per_example")


def antithetic_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
    """Antithetic timesteps as upstream: t ~ U{0..T-1}^(n//2+1); concat[t, T-1-t][:n].

    Args:
      rng: PRNG key.
      batch_size: n.
      num_timesteps: T.

    Returns:
      [n] int32 timesteps; entry i and i + n//2 + 1 (when present) sum to T - 1.
    """
    t = jax.random.randint(rng, (batch_size // 2 + 1,), 0, num_timesteps, dtype=jnp.int32)
    return jnp.concatenate([t, num_timesteps - t - 1])[:batch_size]


def sample_null_mask(rng: jax.Array, batch_size: int, cond_drop_prob: float) -> jax.Array:
    """[B] bool, True with probability `cond_drop_prob` (-> use the null class).

    Exactly all-False for probability 0 and all-True for probability 1, like upstream
    `prob_mask_like`.
    """
    return jax.random.bernoulli(rng, cond_drop_prob, (batch_size,))


def diffusion_loss(
    eps_true: jax.Array, eps_pred: jax.Array, reduction: str = "upstream"
) -> jax.Array:
    """Squared error between true and predicted noise.

    Args:
      eps_true: [B, H, W, C].
      eps_pred: [B, H, W, C].
      reduction: "upstream": **sum** over all non-batch axes, then mean over the batch (the SalUn
        / DDIM code's `(e - out).square().sum((1, 2, 3)).mean(0)`; about H*W*C times the
        per-element mean). "mean": mean over all elements (`nn.MSELoss()`, used upstream for the
        SalUn forget term). "per_example": the per-example sums, [B] (upstream `keepdim=True`).

    Returns:
      A scalar, or [B] for "per_example".

    Raises:
      ValueError: unknown reduction or shape mismatch.
    """
    if eps_true.shape != eps_pred.shape:
        raise ValueError(f"shape mismatch: {eps_true.shape} vs {eps_pred.shape}")
    sq = jnp.square(eps_true - eps_pred)
    if reduction == "mean":
        return jnp.mean(sq)
    per_example = jnp.sum(sq.reshape(sq.shape[0], -1), axis=1)
    if reduction == "upstream":
        return jnp.mean(per_example)
    if reduction == "per_example":
        return per_example
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}.")


def make_denoising_loss_fn(
    apply_fn: Callable[..., jax.Array],
    schedule: NoiseSchedule,
    cond_drop_prob: float = 0.1,
    reduction: str = "upstream",
) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]:
    """Builds the class-conditional denoising loss (train mode: dropout and class-drop on).

    Args:
      apply_fn: `UNet.apply`-like, called as
        `apply_fn({'params': p}, x_t, t, y, train=True, null_mask=m, rngs={'dropout': k})`.
      schedule: the noise schedule.
      cond_drop_prob: probability of replacing a sample's class with the null class.
      reduction: "upstream" (per-image sum, batch mean) or "mean"; see `diffusion_loss`.

    Returns:
      `loss_fn(params, x0, y, rng) -> (loss, metrics)`, with x0 [B, H, W, C] in [-1, 1] and
      y [B] int. Noise, antithetic t, the null mask and the dropout key all come from `rng`
      (`split(rng, 4)` in that order). metrics: {"loss", "null_fraction"}.

    Raises:
      ValueError: bad reduction or cond_drop_prob.
    """
    if reduction not in ("upstream", "mean"):
        raise ValueError(f"reduction must be 'upstream' or 'mean' for a loss, got {reduction!r}.")
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}.")

    def loss_fn(params, x0, y, rng):
        noise_rng, t_rng, null_rng, dropout_rng = jax.random.split(rng, 4)
        batch = x0.shape[0]
        # 1. Forward process at antithetic timesteps.
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        t = antithetic_timesteps(t_rng, batch, schedule.num_timesteps)
        x_t = q_sample(schedule, x0, t, noise)
        # 2. Class-drop: a fresh 10% of the batch sees the null class.
        null_mask = sample_null_mask(null_rng, batch, cond_drop_prob)
        # 3. Predict the noise with dropout on.
        eps_pred = apply_fn(
            {"params": params},
            x_t,
            t,
            y,
            train=True,
            null_mask=null_mask,
            rngs={"dropout": dropout_rng},
        )
        loss = diffusion_loss(noise, eps_pred, reduction)
        return loss, {"loss": loss, "null_fraction": jnp.mean(null_mask.astype(jnp.float32))}

    return loss_fn
