"""Diffusion SalUn: the saliency mask of a class-conditional DDPM and the unlearning loop.

Methods (reference-salun.md §6.3-6.4):
  * SalUn: objective "rl" with the saliency mask. Per step,
      forget = MSE_mean( eps(x_t, t, c), stop_grad eps(x_t, t, c') )   on a D_f batch,
      loss   = forget + alpha * L_simple(D_r batch)                     (L_simple: per-image SUM)
    with c' the pseudo class ((c + 1) mod K upstream), both passes in train mode with their own
    10% class-drop, then clip (1.0), mask, Adam.
  * RL: the same objective without a mask.
  * GA: objective "ga": minimise -L_simple on D_f (no retain term, as upstream `--method ga`).
Unlearning starts from the original's raw (non-EMA) params and keeps no EMA, as upstream.

Scale note (reference §6.4): the forget term is a per-element MEAN, the retain term a per-image
SUM over C*H*W elements, so alpha acts per element as alpha*C*H*W: 1e-3 * 3072 = 3.07 for CIFAR-10,
1e-3 * 64 = 0.064 for 8x8x1 digits. `effective_alpha` computes it.

References:
  Fan et al. 2024 (SalUn) Eq. 3 (mask) and Eq. 7 (diffusion RL); reference-salun.md §6.3, §6.4,
  §9.1 items 5-6.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from salun_jax import optim as optim_lib
from salun_jax import saliency
from salun_jax.data.batches import gather_batches
from salun_jax.diffusion.losses import antithetic_timesteps, diffusion_loss, sample_null_mask
from salun_jax.diffusion.samplers import guided_eps
from salun_jax.diffusion.schedule import NoiseSchedule, q_sample
from salun_jax.diffusion.training import (
    denoising_loss_per_example,
    to_model_range,
    uncommitted,
)
from salun_jax.models.unet import NULL_CLASS_PARAM
from salun_jax.train import TrainState, weighted_mean

PyTree = Any
ApplyFn = Callable[..., jax.Array]
PSEUDO_CLASS_MODES = ("next", "random")
OBJECTIVES = ("rl", "ga")


@dataclasses.dataclass(frozen=True)
class DiffusionUnlearnConfig:
    """Hyper-parameters of diffusion unlearning (defaults: `cifar10_saliency_unlearn.yml`).

    Attributes:
      objective: "rl" (pseudo-class MSE + alpha * retain loss; SalUn with a mask, RL without) or
        "ga" (gradient ascent on the forget denoising loss).
      num_iterations: optimizer steps (upstream 1000).
      batch_size: forget and retain batch size each (upstream 128).
      learning_rate: Adam learning rate (upstream 1e-4).
      alpha: weight of the retain loss (upstream README 1e-3; see the module's scale note).
      grad_clip: global-norm clipping before the mask and Adam (None: off).
      cond_drop_prob: class-drop probability of every train-mode pass (upstream 0.1).
      pseudo_class: "next" ((c + 1) mod K, upstream HEAD) or "random" (uniform over classes != c,
        the paper's wording).
      mask_mode: "hard" (non-salient weights bit-identical) or "paper"; identical for Adam
        without weight decay.
      seed: batch order and noise seed.
    """

    objective: str = "rl"
    num_iterations: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-4
    alpha: float = 1e-3
    grad_clip: float | None = 1.0
    cond_drop_prob: float = 0.1
    pseudo_class: str = "next"
    mask_mode: str = "hard"
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; known: {OBJECTIVES}")
        if self.pseudo_class not in PSEUDO_CLASS_MODES:
            raise ValueError(f"unknown pseudo_class {self.pseudo_class!r}; known: "
                             f"{PSEUDO_CLASS_MODES}")
        if self.num_iterations < 1 or self.batch_size < 1:
            raise ValueError("num_iterations and batch_size must be >= 1")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")


class UnlearnOutput(NamedTuple):
    """params: the unlearned weights; history: logged metrics; run/compile seconds."""

    params: PyTree
    history: list[dict]
    run_seconds: float
    compile_seconds: float


def effective_alpha(alpha: float, image_shape: tuple[int, ...]) -> float:
    """alpha's weight per element relative to the per-element-mean forget loss: alpha * C*H*W."""
    return float(alpha * np.prod(image_shape))


def check_class(forget_class: int, num_classes: int) -> int:
    """Validates a class id; returns it as int.

    Raises:
      ValueError: not an integer in [0, num_classes).
    """
    if isinstance(forget_class, bool) or not isinstance(forget_class, int | np.integer):
        raise ValueError(f"forget_class must be an integer class id, got {forget_class!r}.")
    if not 0 <= forget_class < num_classes:
        raise ValueError(f"forget_class {forget_class} is not a class of this {num_classes}-class "
                         f"model (valid: 0..{num_classes - 1}).")
    return int(forget_class)


def check_null_class(params: PyTree, what: str) -> None:
    """Raises ValueError when params have no learned null class (needed for CFG / class-drop)."""
    if not (isinstance(params, Mapping) and NULL_CLASS_PARAM in params):
        raise ValueError(f"{what} needs a model trained with a learned null class (a "
                         f"'{NULL_CLASS_PARAM}' parameter); this model has none (UNet built with "
                         "null_class=False).")


def pseudo_labels(labels: jax.Array, num_classes: int, mode: str = "next",
                  rng: jax.Array | None = None) -> jax.Array:
    """Pseudo classes c' != c for the forget batch.

    Args:
      labels: [B] int true classes.
      num_classes: K (>= 2).
      mode: "next": (c + 1) mod K (upstream HEAD, §6.4); "random": uniform over the K - 1
        classes other than c (c + U{1..K-1} mod K; the paper's "random c' != c").
      rng: key, needed for "random".

    Returns:
      [B] int32 pseudo classes.

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
        offset = jax.random.randint(rng, labels.shape, 1, num_classes, dtype=jnp.int32)
        return (labels + offset) % num_classes
    raise ValueError(f"unknown pseudo_class {mode!r}; known: {PSEUDO_CLASS_MODES}")


# ------------------------------------------------------------------------------------------------
# 1. The saliency mask (reference-salun.md §6.3).


def guided_forget_loss_fn(apply_fn: ApplyFn, schedule: NoiseSchedule,
                          guidance_scale: float = 2.0) -> saliency.BatchLossFn:
    """The upstream mask loss: L_simple of the CFG output (w = 2) in eval mode, on a D_f batch.

    Returns `loss_fn(params, batch, rng)`; batch: `image` uint8, `label`, `weight` (0: padding).
    The loss is the per-image sum of squared errors, averaged over the valid examples (upstream's
    per-batch `.sum((1,2,3)).mean(0)`). It is not negated: only |grad| matters.
    """

    def loss_fn(params, batch, rng):
        noise_rng, t_rng = jax.random.split(rng)
        x0 = to_model_range(batch["image"])
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        t = antithetic_timesteps(t_rng, x0.shape[0], schedule.num_timesteps)
        x_t = q_sample(schedule, x0, t, noise)
        eps = guided_eps(apply_fn, params, x_t, t, batch["label"], guidance_scale)
        return weighted_mean(diffusion_loss(noise, eps, "per_example"), batch["weight"])

    return loss_fn


def diffusion_saliency_scores(
    apply_fn: ApplyFn,
    params: PyTree,
    schedule: NoiseSchedule,
    images: np.ndarray,
    labels: np.ndarray,
    rng: jax.Array,
    *,
    batch_size: int = 128,
    guidance_scale: float = 2.0,
    clip_norm: float | None = 1.0,
    shuffle_seed: int = 0,
) -> PyTree:
    """|sum over D_f batches of clip(grad L_simple(CFG output))| per weight.

    Args:
      apply_fn: `UNet.apply`.
      params: the original model's (raw) params.
      schedule: the noise schedule.
      images: uint8 [N_f, H, W, C], the forget set (all of it, as upstream).
      labels: [N_f] its classes.
      rng: key for noise and timesteps (batch i uses fold_in(rng, i)).
      batch_size: upstream 128; the last batch is partial (padded with weight 0).
      guidance_scale: w of the CFG output (upstream 2.0).
      clip_norm: per-batch global-norm clipping before accumulation (upstream 1.0).
      shuffle_seed: batch order.

    Returns:
      The scores pytree (params' structure).

    Raises:
      ValueError: guidance on a model without a null class, or an empty forget set.
    """
    if guidance_scale != 0:
        check_null_class(params, f"a saliency mask with guidance_scale={guidance_scale}")
    if len(images) == 0:
        raise ValueError("the forget set is empty")
    batches = gather_batches({"image": np.asarray(images), "label": np.asarray(labels, np.int32)},
                             np.arange(len(images)), batch_size,
                             np.random.default_rng(shuffle_seed))
    loss_fn = guided_forget_loss_fn(apply_fn, schedule, guidance_scale)
    return saliency.gradient_saliency(loss_fn, params, batches, rng, clip_norm=clip_norm)


# ------------------------------------------------------------------------------------------------
# 2. The unlearning step and loop (reference-salun.md §6.4).


def make_diffusion_unlearn_step(
    apply_fn: ApplyFn,
    schedule: NoiseSchedule,
    *,
    num_classes: int,
    objective: str = "rl",
    alpha: float = 1e-3,
    cond_drop_prob: float = 0.1,
    pseudo_class: str = "next",
    mask: PyTree | None = None,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Builds the pure unlearning step `(state, batch, rng) -> (state, metrics)`.

    batch: `forget_image` uint8 [B, H, W, C], `forget_label` [B], and for "rl" also
    `retain_image`, `retain_label` (full batches; no padding). The forget and retain draws (noise,
    t, class-drop, dropout) are independent, as upstream. The optimizer in `state.tx` should be
    `optim.make_adam(lr, clip_norm=1.0, mask=mask)` (clip, then mask, then Adam).

    Returns:
      The step. metrics: loss, forget_loss, retain_loss (0 for "ga"), grad_norm (before
      clipping), and mask_sparsity (share of frozen weights; 0 without a mask).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {OBJECTIVES}")
    if pseudo_class not in PSEUDO_CLASS_MODES:
        raise ValueError(f"unknown pseudo_class {pseudo_class!r}; known: {PSEUDO_CLASS_MODES}")
    sparsity = 0.0
    if mask is not None:
        stats = saliency.mask_stats(mask)
        sparsity = 1.0 - stats["fraction"]

    def null_mask_or_none(rng, batch):
        return sample_null_mask(rng, batch, cond_drop_prob) if cond_drop_prob > 0 else None

    def step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        forget_rng, retain_rng, pseudo_rng = jax.random.split(rng, 3)
        x0_forget = to_model_range(batch["forget_image"])
        forget_labels = batch["forget_label"]

        if objective == "ga":

            def loss_fn(params):
                per_example, _ = denoising_loss_per_example(
                    apply_fn, schedule, params, x0_forget, forget_labels, forget_rng,
                    cond_drop_prob)
                forget_loss = -jnp.mean(per_example)
                return forget_loss, (forget_loss, jnp.zeros(()))

        else:
            b = x0_forget.shape[0]
            noise_rng, t_rng, null_rng, null2_rng, drop_rng, drop2_rng = jax.random.split(
                forget_rng, 6)
            noise = jax.random.normal(noise_rng, x0_forget.shape, x0_forget.dtype)
            t = antithetic_timesteps(t_rng, b, schedule.num_timesteps)
            x_t = q_sample(schedule, x0_forget, t, noise)
            pseudo = pseudo_labels(forget_labels, num_classes, pseudo_class, pseudo_rng)
            # The target: the same x_t, t with the pseudo class, its own class-drop and dropout,
            # no gradient (upstream `.detach()`).
            target = jax.lax.stop_gradient(apply_fn(
                {"params": state.params}, x_t, t, pseudo, train=True,
                null_mask=null_mask_or_none(null2_rng, b), rngs={"dropout": drop2_rng}))
            # The retain draw: fresh noise, t and class-drop (upstream's separate
            # `noise_estimation_loss_conditional` call).
            x0_retain = to_model_range(batch["retain_image"])
            retain_labels = batch["retain_label"]
            r = x0_retain.shape[0]
            r_noise_rng, r_t_rng, r_null_rng = jax.random.split(retain_rng, 3)
            r_noise = jax.random.normal(r_noise_rng, x0_retain.shape, x0_retain.dtype)
            r_t = antithetic_timesteps(r_t_rng, r, schedule.num_timesteps)
            r_x_t = q_sample(schedule, x0_retain, r_t, r_noise)
            # Forget and retain inputs go through the UNet as ONE batch: every layer acts per
            # example (GroupNorm, attention, element-wise dropout), so this equals two passes and
            # halves the compiled program.
            x_all = jnp.concatenate([x_t, r_x_t])
            t_all = jnp.concatenate([t, r_t])
            y_all = jnp.concatenate([forget_labels, retain_labels])
            null_all = None
            if cond_drop_prob > 0:
                null_all = jnp.concatenate([sample_null_mask(null_rng, b, cond_drop_prob),
                                            sample_null_mask(r_null_rng, r, cond_drop_prob)])

            def loss_fn(params):
                eps_all = apply_fn({"params": params}, x_all, t_all, y_all, train=True,
                                   null_mask=null_all, rngs={"dropout": drop_rng})
                output, eps_retain = eps_all[:b], eps_all[b:]
                forget_loss = diffusion_loss(target, output, "mean")  # nn.MSELoss(): mean
                # L_simple: per-image SUM, batch mean (see the module's scale note).
                retain_loss = diffusion_loss(r_noise, eps_retain, "upstream")
                return forget_loss + alpha * retain_loss, (forget_loss, retain_loss)

        (loss, (forget_loss, retain_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        metrics = {"loss": loss, "forget_loss": forget_loss, "retain_loss": retain_loss,
                   "grad_norm": optax.tree.norm(grads),
                   "mask_sparsity": jnp.asarray(sparsity, jnp.float32)}
        return state.apply_gradients(grads), metrics

    return step


def _cyclic_batches(num_examples: int, batch_size: int, num_batches: int,
                    rng: np.random.Generator) -> np.ndarray:
    """[num_batches, batch_size] indices: consecutive reshuffled passes over the set, concatenated
    (an infinite shuffled loader; every batch full)."""
    needed = num_batches * batch_size
    passes = [rng.permutation(num_examples) for _ in range(-(-needed // num_examples))]
    return np.concatenate(passes)[:needed].reshape(num_batches, batch_size).astype(np.int32)


def unlearn_diffusion(
    apply_fn: ApplyFn,
    params: PyTree,
    schedule: NoiseSchedule,
    *,
    forget_images: np.ndarray,
    forget_labels: np.ndarray,
    retain_images: np.ndarray | None,
    retain_labels: np.ndarray | None,
    num_classes: int,
    config: DiffusionUnlearnConfig,
    mask: PyTree | None = None,
    progress: bool = True,
    desc: str = "unlearn",
    log_every: int = 50,
) -> UnlearnOutput:
    """Runs diffusion unlearning for `config.num_iterations` jitted steps.

    SalUn: `config.objective="rl"` with `mask`; RL: "rl" without; GA: "ga" (retain data unused).

    Args:
      apply_fn: `UNet.apply`.
      params: the original model's raw (non-EMA) params, as upstream.
      schedule: the noise schedule.
      forget_images, forget_labels: D_f (uint8 [N_f, H, W, C], ints).
      retain_images, retain_labels: D_r (needed for "rl").
      num_classes: K of the model.
      config: hyper-parameters.
      mask: a saliency mask with the params' structure (None: all weights train).
      progress: tqdm bar over iterations.
      desc: bar label.
      log_every: history records every this many steps (means of the metrics since the last).

    Returns:
      `UnlearnOutput(params, history, run_seconds, compile_seconds)`; run_seconds excludes the
      first step's compilation.

    Raises:
      ValueError: forget labels out of range, missing retain data for "rl", class-drop or an
        "rl" objective on a model without a null class.
      salun_jax.saliency.MaskMismatchError: the mask does not fit the params.
    """
    if mask is not None:
        saliency.check_same_structure(mask, params)
        mask = jax.tree.map(lambda m: jnp.asarray(m, bool), mask)
    params = uncommitted(params)
    forget_labels = np.asarray(forget_labels, np.int32)
    if forget_labels.size == 0:
        raise ValueError("the forget set is empty")
    if forget_labels.min() < 0 or forget_labels.max() >= num_classes:
        raise ValueError(f"forget labels must lie in [0, {num_classes}), got "
                         f"{sorted(set(forget_labels.tolist()))[:10]}")
    if config.cond_drop_prob > 0:
        check_null_class(params, f"class-drop (cond_drop_prob={config.cond_drop_prob})")
    data = {"forget_image": jnp.asarray(forget_images), "forget_label": jnp.asarray(forget_labels)}
    if config.objective == "rl":
        if retain_images is None or retain_labels is None or len(retain_images) == 0:
            raise ValueError("the 'rl' objective (SalUn, RL) needs retain data")
        data["retain_image"] = jnp.asarray(retain_images)
        data["retain_label"] = jnp.asarray(np.asarray(retain_labels, np.int32))

    tx = optim_lib.make_adam(config.learning_rate, clip_norm=config.grad_clip, mask=mask,
                             mask_mode=config.mask_mode)
    state = TrainState.create(apply_fn=apply_fn, params=params, tx=tx)  # no EMA, as upstream
    step_fn = make_diffusion_unlearn_step(
        apply_fn, schedule, num_classes=num_classes, objective=config.objective,
        alpha=config.alpha, cond_drop_prob=config.cond_drop_prob,
        pseudo_class=config.pseudo_class, mask=mask)

    @jax.jit
    def gather_and_step(state, data, forget_idx, retain_idx, rng):
        batch = {"forget_image": data["forget_image"][forget_idx],
                 "forget_label": data["forget_label"][forget_idx]}
        if "retain_image" in data:
            batch["retain_image"] = data["retain_image"][retain_idx]
            batch["retain_label"] = data["retain_label"][retain_idx]
        return step_fn(state, batch, rng)

    n, b = config.num_iterations, config.batch_size
    index_rng = np.random.default_rng([config.seed, 1])
    forget_idx = _cyclic_batches(len(forget_labels), b, n, index_rng)
    retain_idx = (_cyclic_batches(len(data["retain_label"]), b, n, index_rng)
                  if "retain_label" in data else np.zeros((n, 1), np.int32))
    key = jax.random.key(config.seed)

    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, leave=False, mininterval=2.0)
    history, pending = [], []
    compile_seconds, start = 0.0, time.perf_counter()
    for i in iterator:
        state, metrics = gather_and_step(state, data, forget_idx[i], retain_idx[i], key)
        if i == 0:
            jax.block_until_ready(state.params)
            compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
        pending.append(metrics)
        if (i + 1) % log_every == 0 or i + 1 == n:
            means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending))
            record = {"step": i + 1, **{k: float(v) for k, v in means.items()}}
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"{desc}: non-finite loss at step {i + 1}; lower the "
                                         "learning rate")
            history.append(record)
            pending = []
    jax.block_until_ready(state.params)
    run_seconds = time.perf_counter() - start
    # Steps after the first; scale to all n so the figure is the cost of the whole run.
    run_seconds = run_seconds * n / max(n - 1, 1) if n > 1 else compile_seconds
    return UnlearnOutput(state.params, history, run_seconds, max(compile_seconds - run_seconds / n,
                                                                0.0))


def diffusion_forget_retain(labels: np.ndarray, forget_class: int,
                            num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-wise D_f / D_r index arrays (upstream `get_forget_dataset`: all images of the class).

    Raises:
      ValueError: forget_class out of range, or no images of it.
    """
    forget_class = check_class(forget_class, num_classes)
    labels = np.asarray(labels)
    forget = np.flatnonzero(labels == forget_class)
    if forget.size == 0:
        raise ValueError(f"no training images of class {forget_class}")
    return forget, np.flatnonzero(labels != forget_class)
