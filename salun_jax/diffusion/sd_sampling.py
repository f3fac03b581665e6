"""Text-to-image sampling for the Stable Diffusion UNet: classifier-free-guided DDIM, Euler and
LMS, as diffusers' `DDIMScheduler`, `EulerDiscreteScheduler` and `LMSDiscreteScheduler` configure
them for SD v1.x (scaled_linear betas 0.00085 .. 0.012, T = 1000, epsilon prediction).

Every chain runs inside one compiled program: a `lax.scan` over the steps, `pmap`ped over the
local devices (one device on a CPU is the same code), batched over prompts. The grid of each
scheduler (timesteps, abar or sigmas, LMS coefficients) is computed on the host once.

Randomness is per example: sample i of a call starts from normal(fold_in(rng, i)) (and its DDIM
noise at step s from fold_in(fold_in(rng, i), s + 1)), so a sample does not depend on the batch
size, the chunking or the number of devices.

References:
  Song et al. 2021 (DDIM) Eq. 12; Karras et al. 2022 (Euler on the sigma ODE); Ho & Salimans
  2022 (CFG); diffusers `schedulers/scheduling_{ddim,euler_discrete,lms_discrete}.py` (DDIM
  with SD's settings: "leading" spacing, `steps_offset 1`, `set_alpha_to_one False`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.diffusion.samplers import ddim_update
from salun_jax.diffusion.schedule import NoiseSchedule
from salun_jax.types import PyTree

SCHEDULERS = ("ddim", "euler", "lms")
ApplyFn = Callable[..., jax.Array]


def text_guided_eps(
    apply_fn: ApplyFn,
    params: PyTree,
    x: jax.Array,
    t: jax.Array,
    context: jax.Array,
    uncond_context: jax.Array,
    guidance_scale: float | jax.Array,
) -> jax.Array:
    """SD's classifier-free guidance: eps_u + s (eps_c - eps_u), eps_u from the "" prompt.

    The unconditional and conditional halves run as one forward pass of batch 2B ([uncond, cond],
    as diffusers' pipeline). A Python scale of 1 runs the conditional pass alone.

    Args:
      apply_fn: `UNet2DConditionModel.apply`.
      params: UNet parameters.
      x: [B, H, W, C] model inputs.
      t: [B] timesteps (float or int).
      context: [B, M, D] text states of the prompts.
      uncond_context: [M, D] or [B, M, D] text states of "".
      guidance_scale: s (7.5 in SalUn's evaluation).

    Returns:
      [B, H, W, C] guided epsilon.
    """
    if isinstance(guidance_scale, int | float) and guidance_scale == 1:
        return apply_fn({"params": params}, x, t, context)
    batch = x.shape[0]
    uncond = jnp.broadcast_to(uncond_context, context.shape)
    eps = apply_fn(
        {"params": params},
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([uncond, context]),
    )
    eps_u, eps_c = eps[:batch], eps[batch:]
    return eps_u + jnp.asarray(guidance_scale, eps.dtype) * (eps_c - eps_u)


class SamplerGrid(NamedTuple):
    """A scheduler's per-step constants, [N] each (N steps), in sampling order.

    Attributes:
      timesteps: the UNet's timestep input (fractional for Euler/LMS).
      input_scale: the model input is x * input_scale (1 / sqrt(sigma^2 + 1); 1 for DDIM).
      a_t, a_next: DDIM's abar at t and at the next timestep (1 for the sigma samplers).
      sigma: sigma_t (0 for DDIM).
      coeffs: [N, order] LMS coefficients of the derivatives d_i, d_{i-1}, ... (Euler: order
        1, sigma_next - sigma).
      init_sigma: x_T = init_sigma * N(0, I).
    """

    timesteps: np.ndarray
    input_scale: np.ndarray
    a_t: np.ndarray
    a_next: np.ndarray
    sigma: np.ndarray
    coeffs: np.ndarray
    init_sigma: float


def ddim_timesteps(num_timesteps: int, num_steps: int, steps_offset: int = 1) -> np.ndarray:
    """diffusers' "leading" spacing with SD's `steps_offset=1`: arange(N) * (T // N) + 1,
    descending (N = 50: 981, 961, ..., 1); ldm's `make_ddim_timesteps` gives the same grid."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    ts = np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps) + steps_offset
    return ts[::-1].copy()


def _lms_coefficients(sigmas: np.ndarray, order: int) -> np.ndarray:
    """[N, order] integrals over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomials through
    sigma_i, sigma_{i-1}, ... (order min(i + 1, order)); exact polynomial integration in float64
    (diffusers uses `scipy.integrate.quad`, which agrees to its tolerance)."""
    num_steps = len(sigmas) - 1
    out = np.zeros((num_steps, order), np.float64)
    for i in range(num_steps):
        current = min(i + 1, order)
        for k in range(current):
            poly = np.polynomial.Polynomial([1.0])
            for j in range(current):
                if j != k:
                    poly *= np.polynomial.Polynomial([-sigmas[i - j], 1.0]) / (
                        sigmas[i - k] - sigmas[i - j]
                    )
            integral = poly.integ()
            out[i, k] = integral(sigmas[i + 1]) - integral(sigmas[i])
    return out


def make_grid(
    schedule: NoiseSchedule, scheduler: str = "ddim", num_steps: int = 50, lms_order: int = 4
) -> SamplerGrid:
    """The per-step constants of `scheduler` with `num_steps` steps.

    - "ddim": `ddim_timesteps` (leading + 1); abar_next of the last step is abar_0
      (`set_alpha_to_one=False`).
    - "euler" / "lms": t = linspace(0, T - 1, N) descending; sigma = sqrt((1 - abar) / abar)
      interpolated at t, then a final 0; x_T = sigma_max N(0, I) (diffusers' init_noise_sigma
      for "linspace" spacing); the UNet sees x / sqrt(sigma^2 + 1).

    Raises:
      ValueError: unknown scheduler or bad num_steps.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    num_timesteps = schedule.num_timesteps
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    ones = np.ones(num_steps, np.float32)
    if scheduler == "ddim":
        ts = ddim_timesteps(num_timesteps, num_steps)
        prev = ts - num_timesteps // num_steps
        a_next = np.where(prev >= 0, abar[np.maximum(prev, 0)], abar[0])
        return SamplerGrid(
            ts.astype(np.float32),
            ones,
            abar[ts].astype(np.float32),
            a_next.astype(np.float32),
            np.zeros(num_steps, np.float32),
            np.zeros((num_steps, 1), np.float32),
            1.0,
        )
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    ts = np.linspace(0, num_timesteps - 1, num_steps)[::-1].copy()
    all_sigmas = np.sqrt((1.0 - abar) / abar)
    sigmas = np.concatenate([np.interp(ts, np.arange(num_timesteps), all_sigmas), [0.0]])
    order = 1 if scheduler == "euler" else lms_order
    return SamplerGrid(
        ts.astype(np.float32),
        (1.0 / np.sqrt(sigmas[:-1] ** 2 + 1.0)).astype(np.float32),
        ones,
        ones,
        sigmas[:-1].astype(np.float32),
        _lms_coefficients(sigmas, order).astype(np.float32),
        float(sigmas.max()),
    )


def sampler_step(
    kind: str, x: jax.Array, history: jax.Array, eps: jax.Array, grid_i: tuple, noise, eta
) -> tuple[jax.Array, jax.Array]:
    """One scheduler step; returns (x_next, history) (history: [order, B, ...] of d, newest first).

    DDIM: `samplers.ddim_update` (eta 0 = deterministic). Euler/LMS: x0 = x - sigma eps,
    d = (x - x0) / sigma = eps, x_next = x + sum_k coeffs[k] d_{i-k}.
    """
    _, _, a_t, a_next, _, coeffs = grid_i
    if kind == "ddim":
        return ddim_update(x, eps, None, a_t, a_next, noise, eta), history
    history = jnp.concatenate([eps[None], history[:-1]])
    update = jnp.tensordot(coeffs, history, axes=(0, 0))
    return x + update, history


@functools.partial(
    jax.pmap, in_axes=(None, 0, 0, None, None, None, None), static_broadcasted_argnums=(7, 8, 9)
)
def _sample_device(params, contexts, keys, uncond, grid, guidance, eta, apply_fn, kind, shape):
    # contexts [b, M, D], keys [b]: one device's share of the chunk.
    batch = contexts.shape[0]
    x = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys) * grid["init_sigma"]
    order = grid["coeffs"].shape[1]
    history = jnp.zeros((order, batch, *shape), jnp.float32)

    def step(carry, inputs):
        x, history = carry
        index, t, scale, a_t, a_next, sigma, coeffs = inputs
        eps = text_guided_eps(
            apply_fn, params, x * scale, jnp.full((batch,), t), contexts, uncond, guidance
        )
        noise = None
        if kind == "ddim":
            noise = jax.vmap(
                lambda k: jax.random.normal(jax.random.fold_in(k, index + 1), shape, jnp.float32)
            )(keys)
        grid_i = (t, scale, a_t, a_next, sigma, coeffs)
        return sampler_step(kind, x, history, eps, grid_i, noise, eta), None

    steps = (
        jnp.arange(grid["timesteps"].shape[0]),
        grid["timesteps"],
        grid["input_scale"],
        grid["a_t"],
        grid["a_next"],
        grid["sigma"],
        grid["coeffs"],
    )
    (x, _), _ = jax.lax.scan(step, (x, history), steps)
    return x


def sample(
    apply_fn: ApplyFn,
    params: PyTree,
    schedule: NoiseSchedule,
    contexts: jax.Array,
    uncond_context: jax.Array,
    rng: jax.Array,
    *,
    sample_shape: tuple[int, int, int],
    scheduler: str = "ddim",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    batch_size: int = 64,
    decode_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> np.ndarray:
    """Classifier-free-guided text-to-image samples, one per row of `contexts`.

    Args:
      apply_fn: `UNet2DConditionModel.apply` (pass the same object each call: it keys the cache
        of compiled programs).
      params: UNet parameters.
      schedule: the training noise schedule (`scaled_linear_schedule()` for SD).
      contexts: [N, M, D] text states, one per sample (repeat a prompt's row for several).
      uncond_context: [M, D] text states of "".
      rng: key; sample i's noise derives from fold_in(rng, i) alone.
      sample_shape: (H, W, C) of the UNet's space (latents for SD, pixels for a pixel model).
      scheduler: "ddim", "euler" or "lms".
      num_steps: sampler steps (SalUn's evaluation: LMS, 100).
      guidance_scale: s in eps_u + s (eps_c - eps_u) (SD: 7.5).
      eta: DDIM's stochasticity (0: deterministic); ignored by Euler/LMS.
      batch_size: samples per device and call; every call runs whole chunks (the last one
        padded), so one compiled program serves any number of samples.
      decode_fn: applied to each chunk's final x (e.g. a jitted VAE decode); None keeps x.

    Returns:
      float32 [N, ...] final samples (decoded if `decode_fn`), not clipped.

    Raises:
      ValueError: unknown scheduler, bad num_steps, or an empty/badly shaped `contexts`.
    """
    contexts = jnp.asarray(contexts, jnp.float32)
    if contexts.ndim != 3 or contexts.shape[0] == 0:
        raise ValueError(f"contexts must be [N >= 1, M, D], got {contexts.shape}")
    grid = make_grid(schedule, scheduler, num_steps)._asdict()
    grid = {k: jnp.asarray(v) for k, v in grid.items()}
    num_devices = jax.local_device_count()
    total = contexts.shape[0]
    # Every chunk has the full size (the last one padded), so calls with different numbers of
    # samples share one compiled program.
    chunk = batch_size * num_devices
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(total))
    uncond = jnp.asarray(uncond_context, jnp.float32)
    out = []
    for start in range(0, total, chunk):
        index = np.arange(start, start + chunk) % total  # the last chunk wraps (padding)

        def shard(a, index=index):
            return a[index].reshape(num_devices, chunk // num_devices, *a.shape[1:])

        x = _sample_device(
            params,
            shard(contexts),
            shard(keys),
            uncond,
            grid,
            jnp.float32(guidance_scale),
            jnp.float32(eta),
            apply_fn,
            scheduler,
            tuple(int(d) for d in sample_shape),
        )
        x = x.reshape(chunk, *x.shape[2:])[: min(chunk, total - start)]
        out.append(np.asarray(x if decode_fn is None else decode_fn(x)))
    return np.concatenate(out)
