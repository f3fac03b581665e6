"""Every loss of the library: classification CE and forget losses, the DDPM denoising losses.

A *training loss* has the signature the one step builder (`salun_jax.step.make_step`) takes:
`loss_fn(params, batch, rng, state) -> (per_example_loss [B], aux)`, where `aux` is a dict that
may hold `"metrics"` ({name: per-example values [B]}, averaged over the real examples),
`"penalty"` (a scalar added once to the global mean, e.g. an l1 term) and `"batch_stats"` (the
updated BatchNorm statistics). A *mask loss* (`BatchLossFn`) is the scalar `(params, batch, rng)`
whose gradient magnitudes rank the weights (`salun_jax.saliency`).

A batch holds `image` uint8 [B, H, W, C], `label` int32 [B] and `weight` float32 [B] (0 on the
padding of a last partial batch), plus whatever else a loss reads (e.g. `forget` bool [B], or the
`retain_image` / `retain_label` of a paired forget/retain batch).

References:
  SalUn (Fan et al., ICLR 2024) Eq. 3 (mask loss), Eq. 5-7 (random labels, diffusion forgetting);
  Ho et al. 2020 (DDPM) Eq. 14 (L_simple); upstream `Classification/unlearn/*.py` and
  `DDPM/runners/diffusion.py` of OPTML-Group/Unlearn-Saliency.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from salun_jax.data.augment import random_crop_flip, random_flip, to_float
from salun_jax.diffusion.samplers import ddim_grid, ddim_partial_chain, guided_eps
from salun_jax.diffusion.schedule import NoiseSchedule, q_sample
from salun_jax.diffusion.sd_sampling import text_guided_eps
from salun_jax.types import BatchLossFn, LossFn, PyTree

REDUCTIONS = ("upstream", "mean", "per_example")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy [B] of logits [B, K] and integer labels [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def negative_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-CE per example: gradient ascent on the forget set (GA)."""
    return -softmax_cross_entropy(logits, labels)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(values * weights) / max(sum(weights), 1): the mean over the real (weight 1) examples."""
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def prepare_images(
    rng: jax.Array, images: jax.Array, crop_padding: int = 4, flip: bool = True
) -> jax.Array:
    """uint8 images -> float [0, 1], with the train augmentation (random crop with zero padding
    `crop_padding`, horizontal flip) when either is on."""
    if crop_padding > 0 or flip:
        return random_crop_flip(rng, images, crop_padding, flip)
    return to_float(images)


def random_other_labels(rng: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Uniform labels over the K - 1 classes other than `labels` ((y + U{1..K-1}) mod K)."""
    offset = jax.random.randint(rng, labels.shape, 1, num_classes, dtype=jnp.int32)
    return (labels + offset) % num_classes


# ------------------------------------------------------------------------------------------------
# 1. Classification.


def train_mode_logits(params, images, batch, state) -> tuple[jax.Array, PyTree]:
    """The model's logits in train mode and its new BatchNorm statistics.

    BatchNorm's batch statistics are taken over the real examples only (weight 0 marks the
    padding of a last partial batch), as PyTorch's smaller last batch. A shard with no real
    example at all (a pmapped last batch) falls back to all its rows, copies of real images,
    rather than an empty mean (NaN). Across devices the step pmeans these statistics with equal
    weight per device, so on an uneven padded last batch a device with few real examples counts
    as much as a full one: exact on one device or when every shard is full.
    """
    batch_mask = batch["weight"] > 0  # [B]
    batch_mask = batch_mask | ~jnp.any(batch_mask)
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        batch_mask=batch_mask,
        mutable=["batch_stats"],
    )
    return logits, updates.get("batch_stats", {})


@functools.cache
def classification_loss(
    *,
    example_loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    crop_padding: int = 4,
    flip: bool = True,
    label_fn: Callable | None = None,
    penalty_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
) -> LossFn:
    """The train-mode classification loss (BatchNorm in train mode, statistics returned).

    Args:
      example_loss_fn: (logits [B, K], labels [B]) -> per-example loss [B]; CE, or -CE for GA.
      crop_padding, flip: the train augmentation (both off: plain [0, 1] images).
      label_fn: (rng, images, labels, batch, state) -> labels used by the loss (random labels
        for RL, FGSM neighbour labels for boundary shrink, the shadow class for BE).
      penalty_fn: (params, step) -> scalar added to the batch mean (the l1-sparse term).

    Returns:
      `loss_fn(params, batch, rng, state)`; `rng` splits into (augmentation, labels). Its aux
      carries the per-example `accuracy` metric (against the labels the loss used) and the new
      BatchNorm statistics, taken over the real (weight > 0) examples only: the model's
      `__call__` takes `batch_mask` [B].

    Cached: the same arguments give the same function object (so `make_step` and the loop reuse
    its compiled step); pass hashable, long-lived `label_fn` / `penalty_fn` (module-level or
    cached factories) whose values come from the state, not from closures.
    """

    def loss_fn(params, batch, rng, state):
        augment_rng, label_rng = jax.random.split(rng)
        images = prepare_images(augment_rng, batch["image"], crop_padding, flip)
        labels = batch["label"]
        if label_fn is not None:
            labels = label_fn(label_rng, images, labels, batch, state)
        logits, batch_stats = train_mode_logits(params, images, batch, state)
        aux = {
            "metrics": {"accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)},
            "batch_stats": batch_stats,
        }
        if penalty_fn is not None:
            aux["penalty"] = penalty_fn(params, state.step)
        return example_loss_fn(logits, labels), aux

    return loss_fn


@functools.cache
def relabel_forget_fn(num_classes: int, exclude_true_label: bool) -> Callable:
    """A `label_fn` giving forget examples (batch["forget"]) random labels, drawn per step.

    Upstream draws uniformly over all K classes (may equal y); with `exclude_true_label` the draw
    is uniform over the K - 1 other classes (the paper's y' != y, Eq. 5).
    """

    def label_fn(rng, images, labels, batch, state):
        del images, state
        if exclude_true_label:
            random_labels = random_other_labels(rng, labels, num_classes)
        else:
            random_labels = jax.random.randint(rng, labels.shape, 0, num_classes)
        return jnp.where(batch["forget"], random_labels, labels)

    return label_fn


def eval_mode_ce(
    apply_fn: Callable, batch_stats: PyTree, crop_padding: int = 4, flip: bool = True
) -> Callable[[PyTree, dict, jax.Array], jax.Array]:
    """Per-example CE [B] with BatchNorm in inference mode, images augmented by `rng` directly.

    Returns `ce_fn(params, batch, rng)`: the building block of the mask loss and of IU's
    gradients (upstream takes both with the train transform on and the model in eval mode).
    """

    def ce_fn(params, batch, rng):
        images = prepare_images(rng, batch["image"], crop_padding, flip)
        logits = apply_fn({"params": params, "batch_stats": batch_stats}, images, train=False)
        return softmax_cross_entropy(logits, batch["label"])

    return ce_fn


def classification_forget_loss(
    apply_fn: Callable, batch_stats: PyTree, crop_padding: int = 4, flip: bool = True
) -> BatchLossFn:
    """The SalUn mask loss: -CE, the batch mean over valid examples, BN in inference mode, forget
    images with the train augmentation (upstream `generate_mask.py`, SalUn Eq. 3).

    A final partial batch weighs each of its samples by 1/n_valid, as upstream's sum of per-batch
    means.
    """
    ce_fn = eval_mode_ce(apply_fn, batch_stats, crop_padding, flip)
    return lambda params, batch, rng: -weighted_mean(ce_fn(params, batch, rng), batch["weight"])


# ------------------------------------------------------------------------------------------------
# 2. Diffusion (upstream `DDPM/functions/losses.py` and `runners/diffusion.py`).


def to_model_range(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] images -> float32 in [-1, 1] (upstream `data_transform` with `rescaled`)."""
    return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def antithetic_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jax.Array:
    """Antithetic timesteps as upstream: t ~ U{0..T-1}^(n//2+1); concat[t, T-1-t][:n] ([n] int32;
    entries i and i + n//2 + 1 sum to T - 1)."""
    t = jax.random.randint(rng, (batch_size // 2 + 1,), 0, num_timesteps, dtype=jnp.int32)
    return jnp.concatenate([t, num_timesteps - t - 1])[:batch_size]


def sample_null_mask(rng: jax.Array, batch_size: int, cond_drop_prob: float) -> jax.Array | None:
    """[B] bool, True with probability `cond_drop_prob` (-> the null class); None when the
    probability is exactly 0 (no null mask at all, so a UNet without a null class trains too)."""
    if cond_drop_prob <= 0:
        return None
    return jax.random.bernoulli(rng, cond_drop_prob, (batch_size,))


def forward_noising(
    schedule: NoiseSchedule, x0: jax.Array, noise_rng: jax.Array, t_rng: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward process at antithetic timesteps: (x_t, t, noise) for clean x0 [B, H, W, C]."""
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    t = antithetic_timesteps(t_rng, x0.shape[0], schedule.num_timesteps)
    return q_sample(schedule, x0, t, noise), t, noise


def diffusion_loss(
    eps_true: jax.Array, eps_pred: jax.Array, reduction: str = "upstream"
) -> jax.Array:
    """Squared error between true and predicted noise [B, H, W, C].

    reduction: "upstream": **sum** over the non-batch axes, mean over the batch (upstream's
    `(e - out).square().sum((1, 2, 3)).mean(0)`); "mean": mean over all elements (upstream's
    `nn.MSELoss()` of the SalUn forget term); "per_example": the per-example sums [B].

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


def _eps(apply_fn, params, x_t, t, labels, null_mask, dropout_rng):
    return apply_fn(
        {"params": params},
        x_t,
        t,
        labels,
        train=True,
        null_mask=null_mask,
        rngs={"dropout": dropout_rng},
    )


def denoising_loss(
    apply_fn: Callable,
    schedule: NoiseSchedule,
    *,
    cond_drop_prob: float = 0.1,
    flip: bool = False,
    prefix: str = "",
) -> LossFn:
    """Upstream's `noise_estimation_loss_conditional` per example, train mode (dropout, class-drop).

    Per example: sum over H, W, C of (eps - eps_theta(x_t, t, y or null))^2, so the step's mean
    over the batch is upstream's per-image-sum, batch-mean loss. `rng` splits into (flip, loss)
    and the loss key into (noise, t, null mask, dropout).

    Args:
      apply_fn: `UNet.apply`.
      schedule: the noise schedule.
      cond_drop_prob: probability of the null class per example (0.1 upstream).
      flip: random horizontal flip per example (upstream CIFAR-10 training).
      prefix: read `{prefix}image` / `{prefix}label` from the batch.

    Returns:
      `loss_fn(params, batch, rng, state)`, with the per-example `null_fraction` metric.
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}.")

    def loss_fn(params, batch, rng, state):
        del state
        flip_rng, loss_rng = jax.random.split(rng)
        x0 = to_model_range(batch[f"{prefix}image"])  # [B, H, W, C] in [-1, 1]
        if flip:
            x0 = random_flip(flip_rng, x0)
        noise_rng, t_rng, null_rng, dropout_rng = jax.random.split(loss_rng, 4)
        x_t, t, noise = forward_noising(schedule, x0, noise_rng, t_rng)
        null_mask = sample_null_mask(null_rng, x0.shape[0], cond_drop_prob)
        eps = _eps(apply_fn, params, x_t, t, batch[f"{prefix}label"], null_mask, dropout_rng)
        null = (
            jnp.zeros(x0.shape[0], jnp.float32)
            if null_mask is None
            else null_mask.astype(jnp.float32)
        )
        return diffusion_loss(noise, eps, "per_example"), {"metrics": {"null_fraction": null}}

    return loss_fn


def guided_forget_loss(
    apply_fn: Callable, schedule: NoiseSchedule, guidance_scale: float = 2.0
) -> BatchLossFn:
    """The DDPM mask loss: L_simple of the CFG output (w = 2) in eval mode on a D_f batch, the
    per-image sum averaged over the valid examples (upstream `generate_mask` of the DDPM runner).
    Not negated: only |grad| matters."""

    def loss_fn(params, batch, rng):
        noise_rng, t_rng = jax.random.split(rng)
        x_t, t, noise = forward_noising(schedule, to_model_range(batch["image"]), noise_rng, t_rng)
        eps = guided_eps(apply_fn, params, x_t, t, batch["label"], guidance_scale)
        return weighted_mean(diffusion_loss(noise, eps, "per_example"), batch["weight"])

    return loss_fn


def pseudo_labels(
    labels: jax.Array, num_classes: int, mode: str = "next", rng: jax.Array | None = None
) -> jax.Array:
    """Pseudo classes c' != c for the forget batch: "next" = (c + 1) mod K (upstream HEAD);
    "random" = uniform over the K - 1 other classes (the paper's wording).

    Raises:
      ValueError: unknown mode, K < 2, or "random" without a key.
    """
    if num_classes < 2:
        raise ValueError(f"pseudo classes need at least 2 classes, got {num_classes}")
    labels = jnp.asarray(labels, jnp.int32)
    if mode == "next":
        return (labels + 1) % num_classes
    if mode == "random":
        if rng is None:
            raise ValueError("pseudo_class='random' needs an rng key")
        return random_other_labels(rng, labels, num_classes)
    raise ValueError(f"unknown pseudo_class {mode!r}; known: next, random")


def _paired_eps(
    apply_fn, params, schedule, batch, x_t, t, null_rng, dropout_rng, retain_rng, cond_drop_prob
):
    """The forget inputs (x_t, t, `batch["label"]`) and the noised retain batch through the UNet
    as ONE batch (every layer acts per example: two passes' results, half the program).
    `retain_rng` splits into (noise, t, null). Returns (eps forget, eps retain, retain noise)."""
    b = x_t.shape[0]
    r_noise_rng, r_t_rng, r_null_rng = jax.random.split(retain_rng, 3)
    r_x_t, r_t, r_noise = forward_noising(
        schedule, to_model_range(batch["retain_image"]), r_noise_rng, r_t_rng
    )
    null_all = None
    if cond_drop_prob > 0:
        null_all = jnp.concatenate(
            [
                sample_null_mask(null_rng, b, cond_drop_prob),
                sample_null_mask(r_null_rng, b, cond_drop_prob),
            ]
        )
    eps_all = _eps(
        apply_fn,
        params,
        jnp.concatenate([x_t, r_x_t]),
        jnp.concatenate([t, r_t]),
        jnp.concatenate([batch["label"], batch["retain_label"]]),
        null_all,
        dropout_rng,
    )  # [2B, H, W, C]
    return eps_all[:b], eps_all[b:], r_noise


def diffusion_forget_loss(
    apply_fn: Callable,
    schedule: NoiseSchedule,
    *,
    num_classes: int,
    alpha: float,
    cond_drop_prob: float = 0.1,
    pseudo_class: str = "next",
) -> LossFn:
    """SalUn / RL for a DDPM (SalUn Eq. 7), on a paired batch (forget example i with retain
    example i; both batches full):

        forget_i = mean over H, W, C of (eps(x_t, t, c) - stop_grad eps(x_t, t, c'))^2
        retain_i = sum over H, W, C of (eps(x_t^r, t^r, c^r) - noise^r)^2      (L_simple)
        loss_i   = forget_i + alpha * retain_i

    so the batch mean is upstream's `MSELoss(output, target) + alpha * retain_loss`. The target
    pass uses the same x_t, t with the pseudo class, its own class-drop and dropout and no
    gradient (upstream `.detach()`). Forget and retain inputs go through the UNet as ONE batch
    (every layer acts per example, so this equals two passes and halves the program).

    Scale: the forget term is a per-element MEAN, the retain term a per-image SUM over C*H*W
    elements, so alpha acts per element as alpha * C*H*W (1e-3 * 3072 = 3.07 on CIFAR-10).
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}.")

    def loss_fn(params, batch, rng, state):
        forget_rng, retain_rng, pseudo_rng = jax.random.split(rng, 3)
        (noise_rng, t_rng, null_rng, target_null_rng, dropout_rng, target_dropout_rng) = (
            jax.random.split(forget_rng, 6)
        )
        labels = batch["label"]
        b = labels.shape[0]
        x_t, t, _ = forward_noising(schedule, to_model_range(batch["image"]), noise_rng, t_rng)
        pseudo = pseudo_labels(labels, num_classes, pseudo_class, pseudo_rng)
        target = jax.lax.stop_gradient(
            _eps(
                apply_fn,
                state.params,
                x_t,
                t,
                pseudo,
                sample_null_mask(target_null_rng, b, cond_drop_prob),
                target_dropout_rng,
            )
        )
        eps_f, eps_r, r_noise = _paired_eps(
            apply_fn, params, schedule, batch, x_t, t, null_rng, dropout_rng, retain_rng,
            cond_drop_prob,
        )  # fmt: skip
        forget = jnp.mean(jnp.square(eps_f - target).reshape(b, -1), axis=1)
        retain = diffusion_loss(r_noise, eps_r, "per_example")
        return forget + alpha * retain, {"metrics": {"forget_loss": forget, "retain_loss": retain}}

    return loss_fn


def diffusion_ascent_loss(
    apply_fn: Callable, schedule: NoiseSchedule, *, alpha: float, cond_drop_prob: float = 0.1
) -> LossFn:
    """GA for a DDPM, as upstream's `--method ga`, on a paired batch (forget example i with retain
    example i; both batches full):

        forget_i = sum over H, W, C of (eps(x_t, t, c) - noise)^2              (L_simple on D_f)
        retain_i = sum over H, W, C of (eps(x_t^r, t^r, c^r) - noise^r)^2      (L_simple on D_r)
        loss_i   = -forget_i + alpha * retain_i

    so the batch mean is upstream's `forget_loss + alpha * retain_loss` with `forget_loss =
    -noise_loss(D_f)` (upstream `DDPM/runners/diffusion.py`, `--method ga`).
    `rng` splits into (forget, retain); forget into (noise, t, null, dropout), retain into
    (noise, t, null). Forget and retain inputs go through the UNet as one batch (the forget
    dropout key), as in `diffusion_forget_loss`.

    Returns:
      `loss_fn(params, batch, rng, state)` reading `image` / `label` (D_f) and `retain_image` /
      `retain_label` (D_r), with the per-example `forget_loss` (-forget_i) and `retain_loss`
      metrics.
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}.")

    def loss_fn(params, batch, rng, state):
        del state
        forget_rng, retain_rng = jax.random.split(rng)
        noise_rng, t_rng, null_rng, dropout_rng = jax.random.split(forget_rng, 4)
        x_t, t, noise = forward_noising(
            schedule, to_model_range(batch["image"]), noise_rng, t_rng
        )  # [B, H, W, C]
        eps_f, eps_r, r_noise = _paired_eps(
            apply_fn, params, schedule, batch, x_t, t, null_rng, dropout_rng, retain_rng,
            cond_drop_prob,
        )  # fmt: skip
        forget = -diffusion_loss(noise, eps_f, "per_example")
        retain = diffusion_loss(r_noise, eps_r, "per_example")
        return forget + alpha * retain, {"metrics": {"forget_loss": forget, "retain_loss": retain}}

    return loss_fn


# ------------------------------------------------------------------------------------------------
# Erased Stable Diffusion (ESD) for the class-conditional DDPM and for SD, and the losses of
# text-to-image (Stable Diffusion) unlearning.


def esd_target(eps_null: jax.Array, eps_cond: jax.Array, negative_guidance: float) -> jax.Array:
    """ESD's negatively guided target: eps(x_t, "") - eta (eps(x_t, c) - eps(x_t, "")).

    Both inputs come from the frozen original model; training eps_theta(x_t, c) towards it
    points the concept's score away from the concept (ESD Eq. 7).
    """
    return eps_null - negative_guidance * (eps_cond - eps_null)


def _esd_draw(rng: jax.Array, batch: int, shape: tuple[int, ...], num_steps: int):
    steps_rng, x_rng = jax.random.split(rng)
    k = jax.random.randint(steps_rng, (batch,), 0, num_steps)  # DDIM steps to run, per example
    return k, jax.random.normal(x_rng, (batch, *shape), jnp.float32)


def ddpm_esd_loss(
    apply_fn: Callable,
    schedule: NoiseSchedule,
    *,
    image_shape: tuple[int, int, int],
    negative_guidance: float = 1.0,
    start_guidance: float = 2.0,
    num_steps: int = 50,
) -> LossFn:
    """ESD for a class-conditional DDPM, with the learned null class as the "" prompt:

        k ~ U{0..N-1}; x_k = k deterministic DDIM steps (guidance `start_guidance`) from
        x_T ~ N(0, I) with the model being trained (no gradient); t = grid[k];
        loss_i = mean over H, W, C of (eps_theta(x_k, t, c) - stop_grad esd_target(
                 eps_0(x_k, t, null), eps_0(x_k, t, c), eta))^2

    eps_0 is the frozen original (`state.extra["frozen"]`), in eval mode; the trained pass is in
    train mode (dropout), as the other DDPM losses. The grid is upstream's "uniform" DDIM grid of
    `num_steps` (`samplers.ddim_grid`); every UNet query sits at the level x_k has reached (the
    consistent form of ESD's diffusers rewrite; the original `train-esd.py` stops its chain
    about two grid steps before the level it queries). `start_guidance` is the DDPM's own CFG
    weight w in (1 + w) eps_c - w eps_null (w 2 = SD's s 3, ESD's default).

    Returns:
      `loss_fn(params, batch, rng, state)` reading `label` (the forget class of each example),
      with the per-example `esd_steps` metric (k).

    References:
      Gandikota et al. 2023 (ESD) Eq. 7 and Alg. 1.
    """
    ts, a_t, a_next = ddim_grid(schedule, num_steps)

    def loss_fn(params, batch, rng, state):
        labels = batch["label"]
        b = labels.shape[0]
        draw_rng, dropout_rng = jax.random.split(rng)
        k, x_init = _esd_draw(draw_rng, b, image_shape, ts.shape[0])
        sampler_params = jax.lax.stop_gradient(params)
        x_k = ddim_partial_chain(
            lambda x, t: guided_eps(apply_fn, sampler_params, x, t, labels, start_guidance),
            x_init,
            ts,
            a_t,
            a_next,
            k,
        )
        t = ts[k]
        frozen = apply_fn(
            {"params": state.extra["frozen"]},
            jnp.concatenate([x_k, x_k]),
            jnp.concatenate([t, t]),
            jnp.concatenate([labels, labels]),
            train=False,
            null_mask=jnp.concatenate([jnp.ones(b, bool), jnp.zeros(b, bool)]),
        )
        target = jax.lax.stop_gradient(esd_target(frozen[:b], frozen[b:], negative_guidance))
        eps = _eps(apply_fn, params, x_k, t, labels, None, dropout_rng)
        loss = jnp.mean(jnp.square(eps - target).reshape(b, -1), axis=1)
        return loss, {"metrics": {"esd_steps": k.astype(jnp.float32)}}

    return loss_fn


def _sd_x0(batch: dict, prefix: str, rng: jax.Array) -> jax.Array:
    """The clean input of a text-to-image batch: uint8 pixels -> [-1, 1]; float latents as they
    are, plus `latent_std` x N(0, I) when the batch holds the VAE posterior's std (SD's
    `get_input` samples the posterior at every call)."""
    x = batch[f"{prefix}image"]
    if x.dtype == jnp.uint8:
        return to_model_range(x)
    x = x.astype(jnp.float32)
    std = batch.get(f"{prefix}latent_std")
    return x if std is None else x + std * jax.random.normal(rng, x.shape, x.dtype)


def _sd_noising(schedule: NoiseSchedule, x0: jax.Array, rng: jax.Array):
    noise_rng, t_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)  # ldm: randint
    return q_sample(schedule, x0, t, noise), t, noise


def _per_example_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)


def text_denoising_loss(
    apply_fn: Callable,
    schedule: NoiseSchedule,
    contexts: jax.Array,
    *,
    uncond_drop_prob: float = 0.0,
    prefix: str = "",
) -> LossFn:
    """The latent-diffusion loss of a text-conditioned UNet, per example: mean over H, W, C of
    (noise - eps_theta(x_t, t, c))^2, t ~ U{0..T-1} (ldm `shared_step`: per-element mean).

    Args:
      apply_fn: `UNet2DConditionModel.apply`.
      schedule: the noise schedule.
      contexts: [P, M, D] text states of the prompt table; row 0 is "" (the unconditional one).
      uncond_drop_prob: probability that an example is trained with "" instead of its prompt
        (SD's training used 0.1, which makes classifier-free guidance possible).
      prefix: read `{prefix}image` and `{prefix}prompt` (row of `contexts`) from the batch.

    Returns:
      `loss_fn(params, batch, rng, state)`.
    """
    if not 0.0 <= uncond_drop_prob <= 1.0:
        raise ValueError(f"uncond_drop_prob must be in [0, 1], got {uncond_drop_prob}")

    def loss_fn(params, batch, rng, state):
        del state
        x0_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        x0 = _sd_x0(batch, prefix, x0_rng)
        x_t, t, noise = _sd_noising(schedule, x0, noise_rng)
        prompt = batch[f"{prefix}prompt"]
        if uncond_drop_prob > 0:
            drop = jax.random.bernoulli(drop_rng, uncond_drop_prob, prompt.shape)
            prompt = jnp.where(drop, 0, prompt)
        eps = apply_fn({"params": params}, x_t, t, contexts[prompt])
        return _per_example_mse(noise, eps), {}

    return loss_fn


def text_guided_mask_loss(
    apply_fn: Callable, schedule: NoiseSchedule, contexts: jax.Array, guidance_scale: float = 7.5
) -> BatchLossFn:
    """SalUn-SD's mask loss on a forget batch: MSE(noise, (1 + w) eps(x_t, c) - w eps(x_t, ""))
    over the valid examples (upstream SD `generate_mask.py`, w = 7.5; not negated: only |grad|
    matters)."""

    def loss_fn(params, batch, rng):
        x0_rng, noise_rng = jax.random.split(rng)
        x_t, t, noise = _sd_noising(schedule, _sd_x0(batch, "", x0_rng), noise_rng)
        context = contexts[batch["prompt"]]
        eps = text_guided_eps(apply_fn, params, x_t, t, context, contexts[0], 1.0 + guidance_scale)
        return weighted_mean(_per_example_mse(noise, eps), batch["weight"])

    return loss_fn


def text_forget_loss(
    apply_fn: Callable, schedule: NoiseSchedule, contexts: jax.Array, *, alpha: float
) -> LossFn:
    """SalUn-SD / RL-SD on a paired batch (forget example i with retain example i):

        forget_i = mean over H, W, C of (eps(x_t, t, c_f) - stop_grad eps(x_t, t, c_pseudo))^2
        retain_i = mean over H, W, C of (eps(x^r_t, t^r, c_r) - noise^r)^2      (ldm loss)
        loss_i   = forget_i + alpha * retain_i

    so the batch mean is upstream's `MSE(forget_out, pseudo_out) + alpha * remain_loss` (both
    per-element means; upstream SD `random_label.py` / `nsfw_removal.py`). The pseudo target
    uses the same x_t and t with the current weights, without gradient (upstream `.detach()`).
    Forget and retain inputs go through the UNet as one batch.

    Returns:
      `loss_fn(params, batch, rng, state)` reading `image`, `prompt`, `pseudo` (rows of
      `contexts`) and `retain_image`, `retain_prompt`; metrics `forget_loss`, `retain_loss`.
    """

    def loss_fn(params, batch, rng, state):
        forget_rng, retain_rng, x0_rng, r_x0_rng = jax.random.split(rng, 4)
        b = batch["prompt"].shape[0]
        x_t, t, _ = _sd_noising(schedule, _sd_x0(batch, "", x0_rng), forget_rng)
        r_x_t, r_t, r_noise = _sd_noising(schedule, _sd_x0(batch, "retain_", r_x0_rng), retain_rng)
        target = jax.lax.stop_gradient(
            apply_fn({"params": state.params}, x_t, t, contexts[batch["pseudo"]])
        )
        eps = apply_fn(
            {"params": params},
            jnp.concatenate([x_t, r_x_t]),
            jnp.concatenate([t, r_t]),
            contexts[jnp.concatenate([batch["prompt"], batch["retain_prompt"]])],
        )
        forget = _per_example_mse(eps[:b], target)
        retain = _per_example_mse(eps[b:], r_noise)
        return forget + alpha * retain, {"metrics": {"forget_loss": forget, "retain_loss": retain}}

    return loss_fn


def text_esd_loss(
    apply_fn: Callable,
    contexts: jax.Array,
    grid: tuple[jax.Array, jax.Array, jax.Array],
    *,
    sample_shape: tuple[int, int, int],
    negative_guidance: float = 1.0,
    start_guidance: float = 3.0,
) -> LossFn:
    """ESD for Stable Diffusion, per example (batch 1 in the paper):

        k ~ U{0..N-1}; x_k = k DDIM steps (eta 0, CFG `start_guidance`, the concept's prompt)
        from x_T ~ N(0, I) with the model being trained (no gradient); t = grid[k];
        loss_i = mean of (eps_theta(x_k, t, c) - stop_grad esd_target(eps_0(x_k, t, ""),
                 eps_0(x_k, t, c), eta))^2

    with eps_0 the frozen original (`state.extra["frozen"]`). Every UNet query sits at the
    level x_k has reached (see `ddpm_esd_loss` on the original script's offset).

    Args:
      apply_fn: `UNet2DConditionModel.apply`.
      contexts: [P, M, D] prompt table, row 0 = "".
      grid: (timesteps, abar_t, abar_next) of the DDIM grid (`sd_sampling.make_grid(schedule,
        "ddim", 50)`: SD's leading + 1 grid, as ldm's DDIM sampler that ESD used).
      sample_shape: (H, W, C) of the UNet's space.
      negative_guidance: eta (ESD default 1).
      start_guidance: s of the sampling CFG (ESD default 3).

    Returns:
      `loss_fn(params, batch, rng, state)` reading `prompt`; metric `esd_steps`.

    References:
      Gandikota et al. 2023 (ESD) Eq. 7, Alg. 1; `erasing:train-scripts/train-esd.py`.
    """
    ts, a_t, a_next = (jnp.asarray(g, jnp.float32) for g in grid)

    def loss_fn(params, batch, rng, state):
        prompt = batch["prompt"]
        b = prompt.shape[0]
        k, x_init = _esd_draw(rng, b, sample_shape, ts.shape[0])
        context, uncond = contexts[prompt], jnp.broadcast_to(contexts[0], contexts[prompt].shape)
        sampler_params = jax.lax.stop_gradient(params)
        x_k = ddim_partial_chain(
            lambda x, t: text_guided_eps(
                apply_fn, sampler_params, x, t, context, uncond, start_guidance
            ),
            x_init,
            ts,
            a_t,
            a_next,
            k,
        )
        t = ts[k]
        frozen = apply_fn(
            {"params": state.extra["frozen"]},
            jnp.concatenate([x_k, x_k]),
            jnp.concatenate([t, t]),
            jnp.concatenate([uncond, context]),
        )
        target = jax.lax.stop_gradient(esd_target(frozen[:b], frozen[b:], negative_guidance))
        eps = apply_fn({"params": params}, x_k, t, context)
        return _per_example_mse(eps, target), {"metrics": {"esd_steps": k.astype(jnp.float32)}}

    return loss_fn


def attention_resteering_loss(probs: list[jax.Array], positions: jax.Array) -> jax.Array:
    """Forget-Me-Not's loss per example: the L2 norm (not squared) of the cross-attention
    probabilities on the concept's token positions, over every cross-attention module, head and
    query pixel.

    Args:
      probs: per cross-attention module, [B, heads, N, M] post-softmax maps.
      positions: [B, M] bool, the concept's token positions of each example's prompt.

    Returns:
      [B] norms (FMN's `torch.cat(...).norm()` at its batch size 1).
    """
    weight = positions.astype(jnp.float32)[:, None, None, :]
    total = sum(jnp.sum(jnp.square(p) * weight, axis=(1, 2, 3)) for p in probs)
    return jnp.sqrt(total)


def text_attention_loss(
    apply_fn: Callable, schedule: NoiseSchedule, contexts: jax.Array, positions: jax.Array
) -> LossFn:
    """FMN attention re-steering on forget images: x_t = q_sample(x0, t, noise), t ~ U{0..T-1};
    loss_i = `attention_resteering_loss` of the UNet's cross-attention maps for the example's
    prompt at `positions[prompt]` ([P, M] bool). The UNet's eps output is not used.

    References:
      Zhang et al. 2023 (Forget-Me-Not) Sec. 3.2; `Forget-Me-Not:src/train_attn.py`.
    """
    from salun_jax.models.sd.layers import CROSS_ATTENTION_PROBS

    def loss_fn(params, batch, rng, state):
        del state
        x0_rng, noise_rng = jax.random.split(rng)
        x_t, t, _ = _sd_noising(schedule, _sd_x0(batch, "", x0_rng), noise_rng)
        prompt = batch["prompt"]
        _, variables = apply_fn(
            {"params": params}, x_t, t, contexts[prompt], mutable=["intermediates"]
        )
        probs = [
            leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables["intermediates"])
            if any(getattr(k, "key", None) == CROSS_ATTENTION_PROBS for k in path)
        ]
        if not probs:
            raise ValueError("the UNet has no cross-attention layers to re-steer")
        return attention_resteering_loss(probs, positions[prompt]), {}

    return loss_fn
