"""Training a class-conditional DDPM (the original model, or Retrain) through the one loop.

Upstream counts iterations (800k for CIFAR-10), the loop counts epochs: `train_diffusion`
converts the iteration budget into whole epochs (rounding up).

References:
  Ho et al. 2020 (DDPM) Alg. 1; upstream `DDPM/runners/diffusion.py::train` with
  `configs/cifar10_train.yml` (per-image sum loss, antithetic t, class-drop 0.1, Adam 2e-4 + clip
  1.0, EMA 0.9999; Retrain is the same recipe on D_r).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from salun_jax import loop
from salun_jax import optim as optim_lib
from salun_jax.data.batches import index_batches
from salun_jax.diffusion.schedule import NoiseSchedule
from salun_jax.losses import denoising_loss
from salun_jax.step import TrainState, make_step
from salun_jax.types import PyTree


@dataclasses.dataclass(frozen=True)
class DiffusionTrainConfig:
    """Hyper-parameters of training a DDPM from scratch (the original model, or Retrain).

    Defaults are the paper's CIFAR-10 recipe (upstream `configs/cifar10_train.yml`).

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

    def __post_init__(self):
        if self.num_iterations < 1 or self.batch_size < 1:
            raise ValueError(
                f"num_iterations and batch_size must be >= 1, got "
                f"{self.num_iterations}, {self.batch_size}"
            )
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")


def uncommitted(tree: PyTree) -> PyTree:
    """The same values as plain default-device arrays (no mesh in their types), so jitted code
    fed them and fresh arrays does not retrace."""
    return jax.tree.map(jnp.asarray, jax.device_get(tree))


def init_unet_params(model: nn.Module, rng: jax.Array) -> PyTree:
    """Initialises a `UNet` on a dummy batch of one; returns its params.

    A `jax.random.key(seed, impl="rbg")` key compiles much faster than threefry on XLA:CPU.
    """
    shape = (1, model.image_size, model.image_size, model.out_channels)

    def init(key):
        return model.init(
            key,
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1,), jnp.int32),
            train=False,
        )["params"]

    return jax.jit(init)(rng)


def create_diffusion_state(
    model: nn.Module, rng: jax.Array, config: DiffusionTrainConfig, params: PyTree | None = None
) -> TrainState:
    """A fresh TrainState: UNet params (initialised from `rng` unless given), clip + Adam
    (`optim.make_adam`), and the EMA if configured."""
    tx = optim_lib.make_adam(config.learning_rate, clip_norm=config.grad_clip)
    if params is None:
        params = init_unet_params(model, rng)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, ema_decay=config.ema_decay)


def epochs_for_iterations(num_iterations: int, num_examples: int, batch_size: int) -> int:
    """Whole epochs that give at least `num_iterations` steps of `batch_size` (padded batches)."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}.")
    if num_examples < 1:
        raise ValueError("no training examples")
    return math.ceil(num_iterations / math.ceil(num_examples / batch_size))


def check_images(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> None:
    """Raises ValueError unless images are uint8 [N, S, S, C] of the UNet's size and labels lie
    in its classes."""
    expected = (model.image_size, model.image_size, model.out_channels)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise ValueError(
            f"images must be uint8 [N, {expected[0]}, {expected[1]}, {expected[2]}] "
            f"for this UNet, got {images.dtype} {images.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(
            f"labels must lie in [0, {model.num_classes}), got values in "
            f"[{labels.min()}, {labels.max()}]."
        )


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
) -> loop.RunOutput:
    """Trains a class-conditional DDPM from scratch on `images[train_indices]`.

    Resumes from `workdir/checkpoints` when present. `checkpoint_every`: epochs between
    checkpoints (the paper's 800k iterations are ~2000 CIFAR-10 epochs; saving each one would
    cost more than it protects). The returned state's `ema_params` hold the EMA when configured.

    Raises:
      ValueError: labels outside the model's classes, or images that do not fit the model.
      salun_jax.loop.TrainingDivergedError: the loss became non-finite.
    """
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    train_indices = np.asarray(train_indices)
    check_images(model, images, labels[train_indices])
    num_epochs = epochs_for_iterations(config.num_iterations, train_indices.size, config.batch_size)
    state = create_diffusion_state(model, jax.random.key(config.seed, impl="rbg"), config)
    step = make_step(
        denoising_loss(
            model.apply, schedule, cond_drop_prob=config.cond_drop_prob, flip=config.flip
        )
    )
    out = loop.run(
        state,
        step,
        {"image": images, "label": labels},
        index_batches(train_indices, config.batch_size),
        num_epochs=num_epochs,
        key=jax.random.key(config.seed),
        seed=config.seed,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        progress=progress,
        desc=desc,
    )
    return out._replace(state=uncommitted(out.state))


@dataclasses.dataclass(frozen=True)
class TextTrainConfig:
    """Training a text-conditioned UNet (the tiny SD model) from scratch.

    Attributes:
      num_iterations: optimizer steps; rounded up to whole epochs of `batch_size`.
      batch_size: global batch size.
      learning_rate: Adam learning rate.
      grad_clip: global-norm clipping before Adam (None: off).
      uncond_drop_prob: share of examples trained with the empty prompt (SD: 0.1), so that
        classifier-free guidance works.
      seed: init, shuffling and noise seed.
    """

    num_iterations: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    grad_clip: float | None = 1.0
    uncond_drop_prob: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.num_iterations < 1 or self.batch_size < 1:
            raise ValueError("num_iterations and batch_size must be >= 1")


def train_text_unet(
    unet: nn.Module,
    schedule: NoiseSchedule,
    contexts: jax.Array,
    images: np.ndarray,
    prompts: np.ndarray,
    train_indices: np.ndarray,
    config: TextTrainConfig,
    *,
    workdir: str | None = None,
    progress: bool = True,
    desc: str = "text-unet",
    checkpoint_every: int = 1,
) -> loop.RunOutput:
    """Trains a `UNet2DConditionModel` from scratch on `images[train_indices]` with their prompts
    (`losses.text_denoising_loss`: ldm's per-element-mean loss, "" with `uncond_drop_prob`),
    through the one loop (resumes from `workdir/checkpoints`).

    Args:
      unet: the module; its input is [B, H, W, C] of `images`.
      schedule: the noise schedule.
      contexts: [P, M, D] prompt table (row 0 = "").
      images: [N, H, W, C] uint8 pixels or float latents.
      prompts: [N] each image's row of `contexts`.
      train_indices: which images to train on.
      config: the recipe.
    """
    from salun_jax.losses import text_denoising_loss

    images, prompts = np.asarray(images), np.asarray(prompts, np.int32)
    train_indices = np.asarray(train_indices)
    contexts = jnp.asarray(contexts)
    num_epochs = epochs_for_iterations(config.num_iterations, train_indices.size, config.batch_size)
    params = jax.jit(
        lambda key: unet.init(
            key, jnp.zeros((1, *images.shape[1:])), jnp.zeros((1,)), contexts[:1]
        )["params"]
    )(jax.random.key(config.seed, impl="rbg"))
    state = TrainState.create(
        apply_fn=unet.apply,
        params=params,
        tx=optim_lib.make_adam(config.learning_rate, clip_norm=config.grad_clip),
    )
    loss_fn = text_denoising_loss(
        unet.apply, schedule, contexts, uncond_drop_prob=config.uncond_drop_prob
    )
    out = loop.run(
        state,
        make_step(loss_fn),
        {"image": images, "prompt": prompts},
        index_batches(train_indices, config.batch_size),
        num_epochs=num_epochs,
        key=jax.random.key(config.seed),
        seed=config.seed,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        progress=progress,
        desc=desc,
    )
    return out._replace(state=uncommitted(out.state))
