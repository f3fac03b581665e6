"""Classifier-free-guided DDIM ("generalized") and DDPM ancestral samplers.

Both samplers run the whole reverse chain inside one `jax.jit` with a `lax.scan` over steps. The
compiled program depends only on (apply_fn, num_steps, image_shape, batch size, whether guidance
is on, T); params, the key, the labels, eta and the guidance scale are traced, so changing them
does not retrace.

References:
  Song et al. 2021 (DDIM) Eq. 12; Ho et al. 2020 (DDPM) Alg. 2; Ho & Salimans 2022 (CFG);
  upstream `DDPM/models/diffusion.py` (CFG), `functions/denoising.py`
  (`generalized_steps_conditional`),
  `functions/denoising.py::ddpm_steps` (fixedlarge variance, clipped x0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.diffusion.schedule import NoiseSchedule
from salun_jax.models.unet import CLASS_EMBEDDING_MODULE, NULL_CLASS_PARAM
from salun_jax.types import PyTree

ApplyFn = Callable[..., jax.Array]


def _concrete(x) -> np.ndarray | None:
    """The host value of `x`, or None when `x` is being traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_null_class(params: PyTree, what: str) -> None:
    """Raises ValueError when params have no learned null class (needed for CFG / class-drop)."""
    if not (isinstance(params, Mapping) and NULL_CLASS_PARAM in params):
        raise ValueError(
            f"{what} needs a model trained with a learned null class (a "
            f"'{NULL_CLASS_PARAM}' parameter); this model has none (a UNet built "
            "with null_class=False). Use guidance_scale=0 or null_class=True."
        )


def _is_static_zero(w) -> bool:
    return isinstance(w, int | float) and w == 0


def guided_eps(
    apply_fn: ApplyFn,
    params: PyTree,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array,
    guidance_scale: float | jax.Array,
) -> jax.Array:
    """Classifier-free-guided noise prediction, eval mode: (1 + w) eps(x, y) - w eps(x, null).

    The conditional and the null halves run as **one** forward pass of batch 2B (x, t, y
    concatenated with themselves and `null_mask = [False]*B + [True]*B`). Every layer of the UNet
    acts per example (GroupNorm, attention), so this equals two separate passes; it halves the
    number of kernel launches. When `guidance_scale` is the Python number 0 only the conditional
    pass (batch B) runs, as upstream's `cond_scale == 0` shortcut.

    Args:
      apply_fn: `UNet.apply`-like: `apply_fn({'params': params}, x, t, y, train=False,
        null_mask=...)`.
      params: model parameters.
      x: [B, H, W, C] noisy images.
      t: [B] timesteps.
      y: [B] class ids.
      guidance_scale: w (Python number or traced scalar). w = 0 is the plain conditional model.

    Returns:
      [B, H, W, C] guided epsilon.
    """
    variables = {"params": params}
    if _is_static_zero(guidance_scale):
        return apply_fn(variables, x, t, y, train=False)
    batch = x.shape[0]
    null_mask = jnp.concatenate([jnp.zeros(batch, bool), jnp.ones(batch, bool)])
    eps = apply_fn(
        variables,
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([y, y]),
        train=False,
        null_mask=null_mask,
    )
    eps_cond, eps_null = eps[:batch], eps[batch:]
    w = jnp.asarray(guidance_scale, eps.dtype)
    return (1.0 + w) * eps_cond - w * eps_null


def timestep_sequence(num_timesteps: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream "uniform" skip: seq = range(0, T, T // num_steps); seq_next = [-1] + seq[:-1].

    Returns both in sampling order (descending). Like upstream, when T is not a multiple of
    num_steps the chain can have more than num_steps steps (T=1000, 3 steps -> 0, 333, 666, 999).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}.")
    seq = np.arange(0, num_timesteps, num_timesteps // num_steps, dtype=np.int32)
    seq_next = np.concatenate([np.array([-1], np.int32), seq[:-1]])
    return seq[::-1].copy(), seq_next[::-1].copy()


def _padded_alphas_cumprod(schedule: NoiseSchedule) -> jax.Array:
    # Upstream `compute_alpha` pads beta with a leading 0: abar(-1) = 1, abar(t) at index t + 1.
    return jnp.concatenate([jnp.ones((1,), schedule.alphas_cumprod.dtype), schedule.alphas_cumprod])


def ddim_update(x, eps, t, a_t, a_next, noise, eta):
    """One DDIM step from abar_t to abar_next (DDIM Eq. 12; x0 not clipped, as upstream and SD's
    `clip_sample=False`); eta 0 is deterministic. `t` is unused (the update's signature is shared
    with the DDPM step)."""
    del t
    x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)  # no clipping, as upstream
    c1 = eta * jnp.sqrt((1.0 - a_t / a_next) * (1.0 - a_next) / (1.0 - a_t))
    # max(., 0) guards a round-off negative under the sqrt (upstream would give NaN).
    c2 = jnp.sqrt(jnp.maximum(1.0 - a_next - c1**2, 0.0))
    return jnp.sqrt(a_next) * x0 + c1 * noise + c2 * eps


def _ddpm_update(x, eps, t, a_t, a_prev, noise, eta):
    del eta
    beta_t = 1.0 - a_t / a_prev  # = beta_t when every step is taken
    x0 = jnp.sqrt(1.0 / a_t) * x - jnp.sqrt(1.0 / a_t - 1.0) * eps
    x0 = jnp.clip(x0, -1.0, 1.0)  # upstream `ddpm_steps` clips x0 here
    mean = (jnp.sqrt(a_prev) * beta_t * x0 + jnp.sqrt(1.0 - beta_t) * (1.0 - a_prev) * x) / (
        1.0 - a_t
    )
    # fixedlarge: sigma_t^2 = beta_t; no noise on the last step (t = 0).
    return mean + jnp.where(t > 0, jnp.sqrt(beta_t), 0.0) * noise


_UPDATES = {"ddim": ddim_update, "ddpm": _ddpm_update}


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "kind", "num_steps", "image_shape", "use_guidance")
)
def _sample_loop(
    apply_fn,
    params,
    schedule,
    rng,
    labels,
    eta,
    guidance_scale,
    *,
    kind,
    num_steps,
    image_shape,
    use_guidance,
):
    """x_T ~ N(0, I) from `init_rng`, then one `kind` update per timestep under `lax.scan`."""
    ts, ts_next = timestep_sequence(schedule.num_timesteps, num_steps)
    abar = _padded_alphas_cumprod(schedule)
    batch = labels.shape[0]
    init_rng, loop_rng = jax.random.split(rng)
    x_init = jax.random.normal(init_rng, (batch, *image_shape), jnp.float32)
    w = guidance_scale if use_guidance else 0.0
    update = _UPDATES[kind]

    def step(x, inputs):
        t, t_next, key = inputs
        eps = guided_eps(apply_fn, params, x, jnp.full((batch,), t), labels, w)
        noise = jax.random.normal(key, x.shape, x.dtype)
        return update(x, eps, t, abar[t + 1], abar[t_next + 1], noise, eta), None

    keys = jax.random.split(loop_rng, len(ts))
    x, _ = jax.lax.scan(step, x_init, (jnp.asarray(ts), jnp.asarray(ts_next), keys))
    return jnp.clip(x, -1.0, 1.0)


def ddim_partial_chain(
    eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    timesteps: jax.Array,
    a_t: jax.Array,
    a_next: jax.Array,
    num_steps_run: jax.Array,
) -> jax.Array:
    """Deterministic DDIM (eta 0) through the first `num_steps_run[b]` steps of a grid, per example.

    A fixed-length `lax.scan` over the whole grid in which example b stops changing after its
    `num_steps_run[b]` steps, so one compiled program serves every stopping point (ESD draws it
    at random each step). After k steps x sits at the noise level of `timesteps[k]`.

    Args:
      eps_fn: (x [B, ...], t [B]) -> eps [B, ...] (guided or not).
      x: [B, ...] the start (x_T ~ N(0, I) for DDIM).
      timesteps: [N] model timesteps in sampling order.
      a_t, a_next: [N] abar at each step's timestep and at the next one.
      num_steps_run: [B] ints in [0, N].

    Returns:
      [B, ...] the partially denoised x.

    References:
      ESD (Gandikota et al., ICCV 2023) Alg. 1 (x_t from the model's own partial DDIM chain).
    """
    batch = x.shape[0]
    shape = (batch,) + (1,) * (x.ndim - 1)

    def step(x, inputs):
        i, t, at, an = inputs
        eps = eps_fn(x, jnp.full((batch,), t))
        x_new = ddim_update(x, eps, t, at, an, jnp.zeros_like(x), 0.0)
        return jnp.where((i < num_steps_run).reshape(shape), x_new, x), None

    steps = jnp.arange(timesteps.shape[0])
    x, _ = jax.lax.scan(step, x, (steps, timesteps, a_t, a_next))
    return x


def ddim_grid(schedule: NoiseSchedule, num_steps: int) -> tuple[jax.Array, ...]:
    """(timesteps, abar_t, abar_next) of upstream's "uniform" DDIM grid (`timestep_sequence`,
    abar(-1) = 1), as `ddim_partial_chain` takes them."""
    ts, ts_next = timestep_sequence(schedule.num_timesteps, num_steps)
    abar = _padded_alphas_cumprod(schedule)
    return jnp.asarray(ts), abar[ts + 1], abar[ts_next + 1]


def _num_classes_from_params(params: PyTree) -> int | None:
    if isinstance(params, Mapping) and CLASS_EMBEDDING_MODULE in params:
        return int(params[CLASS_EMBEDDING_MODULE]["embedding"].shape[0])
    return None


def _check_sampler_args(
    params, schedule, labels, guidance_scale, num_steps, image_shape, num_classes, eta=0.0
) -> tuple[jax.Array, int, tuple[int, ...], bool]:
    """Host-side validation; returns (labels, num_steps, image_shape, use_guidance)."""
    num_timesteps = schedule.num_timesteps
    num_steps = num_timesteps if num_steps is None else int(num_steps)
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}.")
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}.")

    labels_host = _concrete(labels)
    if labels_host is not None:
        if labels_host.ndim != 1 or labels_host.size == 0:
            raise ValueError(
                f"labels must be a non-empty 1-D array, got shape {labels_host.shape}."
            )
        if not np.issubdtype(labels_host.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels_host.dtype}.")
        if num_classes is None:
            num_classes = _num_classes_from_params(params)
        upper = np.inf if num_classes is None else num_classes
        bad = labels_host[(labels_host < 0) | (labels_host >= upper)]
        if bad.size:
            raise ValueError(
                f"labels must lie in [0, {num_classes}); got out-of-range values "
                f"{sorted(set(bad.tolist()))[:10]}."
            )
    labels = jnp.asarray(labels, jnp.int32)

    eta_host = _concrete(eta)
    if eta_host is not None and not (eta_host.ndim == 0 and float(eta_host) >= 0.0):
        raise ValueError(f"eta must be a non-negative scalar, got {eta_host}.")

    w_host = _concrete(guidance_scale)
    if w_host is not None and w_host.ndim != 0:
        raise ValueError(f"guidance_scale must be a scalar, got shape {w_host.shape}.")
    use_guidance = w_host is None or float(w_host) != 0.0
    if use_guidance:
        check_null_class(params, f"guidance_scale={guidance_scale}")
    return labels, num_steps, image_shape, use_guidance


def ddim_sample(
    apply_fn: ApplyFn,
    params: PyTree,
    schedule: NoiseSchedule,
    rng: jax.Array,
    labels: jax.Array,
    *,
    image_shape: tuple[int, int, int],
    num_steps: int | None = None,
    eta: float | jax.Array = 1.0,
    guidance_scale: float | jax.Array = 2.0,
    num_classes: int | None = None,
) -> jax.Array:
    """Upstream "generalized" (DDIM) sampling with classifier-free guidance.

    Per step (t -> t_next, abar(-1) = 1), with eps the guided prediction:
      x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                 (not clipped)
      c1 = eta sqrt((1 - abar_t / abar_next) (1 - abar_next) / (1 - abar_t))
      x_next = sqrt(abar_next) x0 + c1 z + sqrt(1 - abar_next - c1^2) eps
    The defaults (all T steps, eta 1, w 2) are the paper's `cifar10_sample.yml`.

    Randomness: `init_rng, loop_rng = split(rng)`; x_T = normal(init_rng, [B, H, W, C]); the
    noise of the i-th step taken is normal(split(loop_rng, n_steps)[i], x.shape). (`ddpm_sample`
    uses the same layout.)

    Args:
      apply_fn: `UNet.apply`-like (hashable; pass the same object to avoid recompiling).
      params: model parameters.
      schedule: the training noise schedule.
      rng: PRNG key; x_T and every step's noise derive from it.
      labels: [B] int class ids in [0, num_classes).
      image_shape: (H, W, C).
      num_steps: timesteps = range(0, T, T // num_steps) (upstream "uniform" skip); None = T.
      eta: 0 = deterministic DDIM, 1 = DDPM-like stochasticity (traced).
      guidance_scale: w in (1 + w) eps_c - w eps_null (traced; 0 gives a single pass).
      num_classes: for the label check; read from params when None.

    Returns:
      [B, H, W, C] float32 images, clipped to [-1, 1] at the end only.

    Raises:
      ValueError: labels out of range / not 1-D ints, bad num_steps or image_shape, negative
        eta, or guidance with a model that has no null class.
    """
    labels, num_steps, image_shape, use_guidance = _check_sampler_args(
        params, schedule, labels, guidance_scale, num_steps, image_shape, num_classes, eta
    )
    return _sample_loop(
        apply_fn,
        params,
        schedule,
        rng,
        labels,
        jnp.asarray(eta, jnp.float32),
        jnp.asarray(guidance_scale, jnp.float32),
        kind="ddim",
        num_steps=num_steps,
        image_shape=image_shape,
        use_guidance=use_guidance,
    )


def ddpm_sample(
    apply_fn: ApplyFn,
    params: PyTree,
    schedule: NoiseSchedule,
    rng: jax.Array,
    labels: jax.Array,
    *,
    image_shape: tuple[int, int, int],
    num_steps: int | None = None,
    guidance_scale: float | jax.Array = 2.0,
    num_classes: int | None = None,
) -> jax.Array:
    """Ancestral DDPM sampling with CFG, as upstream `ddpm_steps` with `var_type fixedlarge`.

    Per step: x0 = clip(sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, -1, 1); the posterior mean
    of q(x_{t'} | x_t, x0) with beta = 1 - abar_t / abar_{t'}; plus sqrt(beta) z except at t = 0.

    Args:
      apply_fn, params, schedule, rng, labels, image_shape, guidance_scale, num_classes: as in
        `ddim_sample`.
      num_steps: as in `ddim_sample` (None = all T steps, the exact DDPM chain).

    Returns:
      [B, H, W, C] float32 images in [-1, 1].

    Raises:
      ValueError: as `ddim_sample`.
    """
    labels, num_steps, image_shape, use_guidance = _check_sampler_args(
        params, schedule, labels, guidance_scale, num_steps, image_shape, num_classes
    )
    return _sample_loop(
        apply_fn,
        params,
        schedule,
        rng,
        labels,
        jnp.zeros((), jnp.float32),
        jnp.asarray(guidance_scale, jnp.float32),
        kind="ddpm",
        num_steps=num_steps,
        image_shape=image_shape,
        use_guidance=use_guidance,
    )


def to_uint8(x: jax.Array, *, per_image_minmax: bool = False) -> jax.Array:
    """Maps [-1, 1] images to uint8 [0, 255] as torchvision's `save_image` (x * 255 + 0.5).

    Args:
      x: [..., H, W, C] images in [-1, 1] (clipped first).
      per_image_minmax: stretch each image to its own [min, max] first, as upstream
        `save_image(normalize=True)` does for every written sample (upstream `sample_fid`).

    Returns:
      uint8 array shaped like x.
    """
    x01 = (jnp.clip(jnp.asarray(x, jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    if per_image_minmax:
        axes = tuple(range(x01.ndim - 3, x01.ndim))
        low = jnp.min(x01, axis=axes, keepdims=True)
        high = jnp.max(x01, axis=axes, keepdims=True)
        x01 = jnp.clip((x01 - low) / jnp.maximum(high - low, 1e-5), 0.0, 1.0)
    return jnp.clip(x01 * 255.0 + 0.5, 0.0, 255.0).astype(jnp.uint8)
