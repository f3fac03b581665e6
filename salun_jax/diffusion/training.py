"""Training a class-conditional DDPM: a pure, pmappable train step and the iteration-budget loop.

The step is `train_step(state, batch, rng) -> (state, metrics)` on batches of uint8 images, so
`salun_jax.train.fit` runs it unchanged (device-resident data, orbax checkpoints every epoch,
resume, `metrics.jsonl`, NaN stop). Upstream counts iterations (800k for CIFAR-10), `fit` counts
epochs: `train_diffusion` converts the iteration budget into whole epochs (rounding up).

References:
  Ho et al. 2020 (DDPM) Alg. 1; reference-salun.md §6.2 (per-image sum loss, antithetic t,
  class-drop 0.1, Adam 2e-4 + clip 1.0, EMA 0.9999, Retrain = the same recipe on D_r).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from salun_jax import optim as optim_lib
from salun_jax.diffusion.losses import antithetic_timesteps, diffusion_loss, sample_null_mask
from salun_jax.diffusion.schedule import NoiseSchedule, q_sample
from salun_jax.train import AXIS, TrainState, fit

PyTree = Any
ApplyFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class DiffusionTrainConfig:
    """Hyper-parameters of training a DDPM from scratch (the original model, or Retrain).

    Defaults are the paper's CIFAR-10 recipe (`cifar10_train.yml`, reference-salun.md §6.2).

    Attributes:
      num_iterations: optimizer steps; rounded up to whole epochs of `batch_size`.
      batch_size: global batch size.
      learning_rate: Adam learning rate (b1 0.9, b2 0.999, eps 1e-8, no weight decay).
      grad_clip: global-norm gradient clipping before Adam (None: off).
      ema_decay: decay of the parameter EMA kept in the train state (None: no EMA).
      cond_drop_prob: probability that a training example sees the null class (CFG).
      flip: random horizontal flip of each training image (upstream: on for CIFAR-10).
      seed: init, shuffling and noise seed.
    """

    num_iterations: int = 800_000
    batch_size: int = 128
    learning_rate: float = 2e-4
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.9999
    cond_drop_prob: float = 0.1
    flip: bool = True
    seed: int = 0


def to_model_range(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] images -> float32 in [-1, 1] (upstream `data_transform` with `rescaled`)."""
    return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Flips each image of [B, H, W, C] left-right with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def denoising_loss_per_example(
    apply_fn: ApplyFn,
    schedule: NoiseSchedule,
    params: PyTree,
    x0: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    cond_drop_prob: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """The upstream training loss per example, in train mode (dropout and class-drop on).

    Same draws as `make_denoising_loss_fn` (`split(rng, 4)` = noise, antithetic t, null mask,
    dropout), but returns the per-example losses so padded examples can be weighted out.

    Args:
      apply_fn: `UNet.apply`-like.
      schedule: the noise schedule.
      params: model parameters.
      x0: [B, H, W, C] clean images in [-1, 1].
      labels: [B] int class ids.
      rng: key.
      cond_drop_prob: class-drop probability; exactly 0 passes no null mask at all, so a UNet
        built with `null_class=False` trains too.

    Returns:
      (per-example loss [B] = sum over H, W, C of (eps - eps_pred)^2, null fraction scalar).
    """
    per_example, null_mask = _denoising_loss(apply_fn, schedule, params, x0, labels, rng,
                                             cond_drop_prob)
    return per_example, jnp.mean(null_mask)


def _denoising_loss(apply_fn, schedule, params, x0, labels, rng, cond_drop_prob):
    """(per-example loss [B], null mask as float [B]); see `denoising_loss_per_example`."""
    noise_rng, t_rng, null_rng, dropout_rng = jax.random.split(rng, 4)
    batch = x0.shape[0]
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    t = antithetic_timesteps(t_rng, batch, schedule.num_timesteps)
    x_t = q_sample(schedule, x0, t, noise)
    null_mask = None
    if cond_drop_prob > 0:
        null_mask = sample_null_mask(null_rng, batch, cond_drop_prob)
    eps_pred = apply_fn({"params": params}, x_t, t, labels, train=True, null_mask=null_mask,
                        rngs={"dropout": dropout_rng})
    null_float = (jnp.zeros((batch,), jnp.float32) if null_mask is None
                  else null_mask.astype(jnp.float32))
    return diffusion_loss(noise, eps_pred, "per_example"), null_float


def make_diffusion_train_step(
    apply_fn: ApplyFn,
    schedule: NoiseSchedule,
    *,
    cond_drop_prob: float = 0.1,
    flip: bool = False,
    axis_name: str | None = None,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Builds the pure DDPM train step `(state, batch, rng) -> (state, metrics)`.

    The loss is upstream's `noise_estimation_loss_conditional`: the squared error **summed** over
    pixels, averaged over the batch (padded examples, weight 0, do not count). The optimizer
    (clip + Adam) and the EMA live in the state (`TrainState.create(tx=..., ema_decay=...)`).

    Args:
      apply_fn: `UNet.apply`.
      schedule: the noise schedule.
      cond_drop_prob: probability of the null class per example (0.1 upstream).
      flip: random horizontal flip per example (upstream CIFAR-10: on).
      axis_name: the pmap axis (`train.AXIS` for `fit`): the loss is the mean over the real
        examples of the global batch, gradients and metrics are psum-ed over devices.

    Returns:
      The step. batch: `image` uint8 [B, H, W, C], `label` int32 [B], optional `weight` [B].
      metrics: loss, num_examples (sum of weights), grad_norm (after the cross-device sum,
      before clipping), null_fraction (share of real examples that saw the null class).

    Raises:
      ValueError: cond_drop_prob outside [0, 1].
    """
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}.")

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        flip_rng, loss_rng = jax.random.split(rng)
        x0 = to_model_range(batch["image"])  # [B, H, W, C] in [-1, 1]
        if flip:
            x0 = random_flip(flip_rng, x0)
        labels = batch["label"]
        weights = batch.get("weight", jnp.ones(labels.shape, jnp.float32))
        # The mean over the real examples of the GLOBAL batch, as `train.make_train_step`: each
        # device sums its weighted losses and divides by the global weight; gradients and
        # metrics are then psum-ed.
        total_weight = jnp.sum(weights)
        if axis_name is not None:
            total_weight = jax.lax.psum(total_weight, axis_name)
        total_weight = jnp.maximum(total_weight, 1.0)

        def loss_fn(params):
            per_example, null_mask = _denoising_loss(
                apply_fn, schedule, params, x0, labels, loss_rng, cond_drop_prob)
            loss = jnp.sum(per_example * weights) / total_weight
            return loss, jnp.sum(null_mask * weights) / total_weight

        (loss, null_fraction), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics = {"loss": loss, "num_examples": jnp.sum(weights), "null_fraction": null_fraction}
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
            metrics = jax.lax.psum(metrics, axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.apply_gradients(grads), metrics

    return train_step


def uncommitted(tree: PyTree) -> PyTree:
    """The same values as plain default-device arrays (no mesh in their types).

    `train.fit` returns states whose arrays carry the pmap mesh ('batch') in their sharding; a
    jitted loop fed with them plus fresh arrays (a new optimizer's step counter) would see the
    mesh appear in its outputs' types and retrace once. Copying through the host avoids that.
    """
    return jax.tree.map(jnp.asarray, jax.device_get(tree))


def init_unet_params(model: nn.Module, rng: jax.Array) -> PyTree:
    """Initialises a `UNet` on a dummy batch of one; returns its params.

    A `jax.random.key(seed, impl="rbg")` key compiles much faster than threefry on XLA:CPU.
    """
    shape = (1, model.image_size, model.image_size, model.out_channels)

    def init(key):
        return model.init(key, jnp.zeros(shape, jnp.float32), jnp.zeros((1,), jnp.int32),
                          jnp.zeros((1,), jnp.int32), train=False)["params"]

    return jax.jit(init)(rng)


def create_diffusion_state(model: nn.Module, rng: jax.Array, config: DiffusionTrainConfig,
                           params: PyTree | None = None) -> TrainState:
    """A fresh TrainState: UNet params (initialised from `rng` unless given), clip + Adam
    (`optim.make_adam`), and the EMA if configured."""
    tx = optim_lib.make_adam(config.learning_rate, clip_norm=config.grad_clip)
    if params is None:
        params = init_unet_params(model, rng)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             ema_decay=config.ema_decay)


def epochs_for_iterations(num_iterations: int, num_examples: int, batch_size: int) -> int:
    """Whole epochs that give at least `num_iterations` steps of `batch_size` (padded batches)."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}.")
    if num_examples < 1:
        raise ValueError("no training examples")
    return math.ceil(num_iterations / math.ceil(num_examples / batch_size))


def train_diffusion(
    images: np.ndarray,
    labels: np.ndarray,
    train_indices: np.ndarray,
    model: nn.Module,
    schedule: NoiseSchedule,
    config: DiffusionTrainConfig,
    *,
    workdir: str | None = None,
    progress: bool = True,
    desc: str = "ddpm",
    checkpoint_every: int = 1,
) -> tuple[TrainState, list[dict]]:
    """Trains a class-conditional DDPM from scratch on `images[train_indices]` with `train.fit`.

    Resumes from `workdir/checkpoints` when present. Retrain is this function on the retain
    indices (upstream: the same recipe, reference-salun.md §6.2).

    Args:
      images: uint8 [N, H, W, C].
      labels: int [N] class ids.
      train_indices: indices into images to train on.
      model: the `UNet`.
      schedule: the noise schedule.
      config: the recipe.
      workdir: checkpoints and metrics.jsonl go here (None: nothing written).
      progress: show a progress bar per epoch.
      desc: phase name in logs and metrics.
      checkpoint_every: epochs between checkpoints (the paper's 800k iterations are ~2000
        CIFAR-10 epochs; saving each one would cost more than it protects).

    Returns:
      (final state, per-epoch metrics). `state.ema_params` holds the EMA when configured.

    Raises:
      ValueError: labels outside the model's classes, or images that do not fit the model.
      salun_jax.train.TrainingDivergedError: the loss became non-finite.
    """
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    train_indices = np.asarray(train_indices)
    expected = (model.image_size, model.image_size, model.out_channels)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise ValueError(f"images must be uint8 [N, {expected[0]}, {expected[1]}, {expected[2]}] "
                         f"for this UNet, got {images.dtype} {images.shape}.")
    used = labels[train_indices]
    if used.size and (used.min() < 0 or used.max() >= model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}), got values in "
                         f"[{used.min()}, {used.max()}].")
    state = create_diffusion_state(model, jax.random.key(config.seed, impl="rbg"), config)
    step = make_diffusion_train_step(model.apply, schedule, cond_drop_prob=config.cond_drop_prob,
                                     flip=config.flip, axis_name=AXIS)
    num_epochs = epochs_for_iterations(config.num_iterations, train_indices.size,
                                       config.batch_size)
    state, history = fit(state, train_step=step, data={"image": images, "label": labels},
                         train_indices=train_indices, batch_size=config.batch_size,
                         num_epochs=num_epochs, seed=config.seed, workdir=workdir,
                         progress=progress, desc=desc, checkpoint_every=checkpoint_every)
    return uncommitted(state), history
