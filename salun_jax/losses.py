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
from typing import Any

import jax
import jax.numpy as jnp
import optax

from salun_jax.data.augment import random_crop_flip, random_flip, to_float
from salun_jax.diffusion.samplers import guided_eps
from salun_jax.diffusion.schedule import NoiseSchedule, q_sample
from salun_jax.types import PyTree

LossFn = Callable[[PyTree, dict, jax.Array, Any], tuple[jax.Array, dict]]
BatchLossFn = Callable[[PyTree, dict, jax.Array], jax.Array]
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
        # BatchNorm's batch statistics over the real examples only (weight 0 marks the padding
        # of a last partial batch), as PyTorch's smaller last batch. A shard with no real example
        # at all (a pmapped last batch) falls back to all its rows, copies of real images, rather
        # than an empty mean (NaN). Across devices the step pmeans these statistics with equal
        # weight per device, so on an uneven padded last batch a device with few real examples
        # counts as much as a full one: exact on one device or when every shard is full.
        batch_mask = batch["weight"] > 0  # [B]
        batch_mask = batch_mask | ~jnp.any(batch_mask)
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            batch_mask=batch_mask,
            mutable=["batch_stats"],
        )
        aux = {
            "metrics": {"accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)},
            "batch_stats": updates.get("batch_stats", {}),
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
            jnp.concatenate([labels, batch["retain_label"]]),
            null_all,
            dropout_rng,
        )
        forget = jnp.mean(jnp.square(eps_all[:b] - target).reshape(b, -1), axis=1)
        retain = diffusion_loss(r_noise, eps_all[b:], "per_example")
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
    -noise_loss(D_f)` (`DDPM/runners/diffusion.py`; ../shared/docs/reference-salun.md §6.4).
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
        r_noise_rng, r_t_rng, r_null_rng = jax.random.split(retain_rng, 3)
        b = batch["label"].shape[0]
        x_t, t, noise = forward_noising(
            schedule, to_model_range(batch["image"]), noise_rng, t_rng
        )  # [B, H, W, C]
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
        forget = -diffusion_loss(noise, eps_all[:b], "per_example")
        retain = diffusion_loss(r_noise, eps_all[b:], "per_example")
        return forget + alpha * retain, {"metrics": {"forget_loss": forget, "retain_loss": retain}}

    return loss_fn
