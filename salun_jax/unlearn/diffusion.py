"""Class forgetting in a class-conditional DDPM: SalUn, RL, GA, ESD and Retrain, as peers of the
classification methods (same signature, same `UnlearnOutput`), and the DDPM saliency mask.

  * SalUn: `losses.diffusion_forget_loss` (pseudo-class MSE + alpha * L_simple on D_r) with the
    saliency mask; RL: the same without a mask; GA: -L_simple on D_f + alpha * L_simple on D_r
    (as upstream's `--method ga`); ESD: erased stable diffusion's negative guidance with the
    null class as the empty prompt (`losses.ddpm_esd_loss`), a baseline from text-to-image.
  * Each step draws a fresh forget batch and a fresh retain batch (shuffled cyclic loaders), then
    clip (1.0), mask, Adam. Unlearning starts from the original's raw (non-EMA) params and keeps
    no EMA, as upstream.

References:
  SalUn (Fan et al., ICLR 2024) Eq. 3 (mask) and Eq. 7; ESD (Gandikota et al., ICCV 2023)
  Eq. 7; upstream `DDPM/runners/diffusion.py`
  (`generate_mask`, `saliency_unlearn`, `--method ga`) with `configs/cifar10_saliency_unlearn.yml`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from salun_jax import optim, saliency
from salun_jax.data.batches import cyclic_batches, gather_batches
from salun_jax.diffusion.samplers import check_null_class
from salun_jax.diffusion.schedule import NoiseSchedule
from salun_jax.losses import (
    ddpm_esd_loss,
    diffusion_ascent_loss,
    diffusion_forget_loss,
    guided_forget_loss,
)
from salun_jax.step import TrainState, make_step
from salun_jax.train_diffusion import DiffusionTrainConfig, train_diffusion, uncommitted
from salun_jax.types import PyTree
from salun_jax.unlearn.common import UnlearnOutput, UnlearnTask, run_unlearning

PSEUDO_CLASS_MODES = ("next", "random")


@dataclasses.dataclass(frozen=True)
class DiffusionTask(UnlearnTask):
    """An `UnlearnTask` whose model is a class-conditional UNet, with its noise schedule.
    (images: the train images, possibly flipped once and frozen as upstream's D_f / D_r.)"""

    schedule: NoiseSchedule = None


@dataclasses.dataclass(frozen=True)
class DiffusionUnlearnConfig:
    """Hyper-parameters of DDPM unlearning (defaults: upstream `cifar10_saliency_unlearn.yml`).

    Attributes:
      num_iterations: optimizer steps (upstream 1000).
      batch_size: forget and retain batch size each (upstream 128).
      learning_rate: Adam learning rate (upstream 1e-4).
      alpha: weight of the retain loss (upstream README 1e-3; see `effective_alpha`).
      grad_clip: global-norm clipping before the mask and Adam (None: off).
      cond_drop_prob: class-drop probability of every train-mode pass (upstream 0.1).
      pseudo_class: "next" ((c + 1) mod K, upstream HEAD) or "random" (uniform over classes != c,
        the paper's wording).
      mask_mode: "hard" (non-salient weights bit-identical) or "paper"; identical for Adam
        without weight decay.
      log_every: steps per history record (and per epoch of the loop).
      seed: batch order seed.
      negative_guidance: ESD's eta (ESD default 1).
      esd_start_guidance: ESD: the CFG weight w of the DDIM chain that makes x_t (w 2 is SD's
        s 3, ESD's default).
      esd_num_steps: ESD: DDIM grid size of that chain (ESD default 50).
    """

    num_iterations: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-4
    alpha: float = 1e-3
    grad_clip: float | None = 1.0
    cond_drop_prob: float = 0.1
    pseudo_class: str = "next"
    mask_mode: str = "hard"
    log_every: int = 50
    seed: int = 0
    negative_guidance: float = 1.0
    esd_start_guidance: float = 2.0
    esd_num_steps: int = 50

    def __post_init__(self):
        if self.esd_num_steps < 1:
            raise ValueError(f"esd_num_steps must be >= 1, got {self.esd_num_steps}")
        if self.mask_mode not in optim.MASK_MODES:
            raise ValueError(f"unknown mask_mode {self.mask_mode!r}; known: hard, paper")
        if self.pseudo_class not in PSEUDO_CLASS_MODES:
            raise ValueError(
                f"unknown pseudo_class {self.pseudo_class!r}; known: {PSEUDO_CLASS_MODES}"
            )
        if self.num_iterations < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ValueError("num_iterations, batch_size and log_every must be >= 1")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")


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
        raise ValueError(
            f"forget_class {forget_class} is not a class of this {num_classes}-class "
            f"model (valid: 0..{num_classes - 1})."
        )
    return int(forget_class)


def diffusion_saliency_scores(
    state: TrainState,
    task: DiffusionTask,
    *,
    batch_size: int = 128,
    guidance_scale: float = 2.0,
    clip_norm: float | None = 1.0,
    seed: int = 0,
) -> PyTree:
    """|sum over D_f batches of clip(grad L_simple(CFG output))| per weight, at the original's
    raw params (upstream `generate_mask`: w 2, per-batch clipping 1.0, all of D_f).

    Batches are shuffled by `np.random.default_rng(seed)` (the last one padded); batch i's noise
    and timesteps use fold_in(key(seed), i).

    Raises:
      ValueError: guidance on a model without a null class, or an empty forget set.
    """
    if guidance_scale != 0:
        check_null_class(state.params, f"a saliency mask with guidance_scale={guidance_scale}")
    if len(task.forget) == 0:
        raise ValueError("the forget set is empty")
    batches = gather_batches(
        {"image": task.images, "label": task.labels},
        task.forget,
        batch_size,
        np.random.default_rng(seed),
    )
    loss_fn = guided_forget_loss(state.apply_fn, task.schedule, guidance_scale)
    return saliency.gradient_saliency(
        loss_fn, uncommitted(state.params), batches, jax.random.key(seed), clip_norm=clip_norm
    )


def _run(
    state: TrainState,
    task: DiffusionTask,
    config: DiffusionUnlearnConfig,
    rng: jax.Array,
    loss_fn,
    mask: PyTree | None,
    desc: str,
    extra: PyTree = None,
    **run_options,
) -> UnlearnOutput:
    if config.cond_drop_prob > 0:
        check_null_class(state.params, f"class-drop (cond_drop_prob={config.cond_drop_prob})")
    if len(task.forget) == 0:
        raise ValueError("the forget set is empty")
    if len(task.retain) == 0:
        raise ValueError(f"{desc} needs retain data")
    tx = optim.make_adam(
        config.learning_rate, clip_norm=config.grad_clip, mask=mask, mask_mode=config.mask_mode
    )
    start = TrainState.create(
        apply_fn=state.apply_fn, params=uncommitted(state.params), tx=tx, extra=extra
    )
    num_devices = jax.device_count()  # all processes'; each takes its rows (`loop.local_rows`)
    if config.batch_size % num_devices:
        raise ValueError(
            f"batch size {config.batch_size} is not divisible by {num_devices} devices"
        )
    n, b, every = config.num_iterations, config.batch_size, config.log_every
    index_rng = np.random.default_rng([config.seed, 1])
    # Every method pairs a forget batch with a retain batch (upstream's two cyclic loaders).
    streams = {
        "": cyclic_batches(task.forget, b, n, index_rng),
        "retain": cyclic_batches(task.retain, b, n, index_rng),
    }
    streams = {k: v.reshape(n, num_devices, b // num_devices) for k, v in streams.items()}
    weights = np.ones((n, num_devices, b // num_devices), np.float32)

    def batches_fn(epoch, np_rng):
        del np_rng  # the cyclic loaders are drawn once, above
        chunk = slice(epoch * every, (epoch + 1) * every)
        return {k: v[chunk] for k, v in streams.items()}, weights[chunk]

    return run_unlearning(
        start,
        make_step(loss_fn),
        {"image": task.images, "label": task.labels},
        batches_fn,
        num_epochs=math.ceil(n / every),
        key=rng,
        seed=config.seed,
        mask=mask,
        desc=desc,
        **run_options,
    )


def ddpm_random_label(
    state,
    task: DiffusionTask,
    config: DiffusionUnlearnConfig,
    rng: jax.Array,
    mask=None,
    *,
    name: str = "RL",
    **run_options,
) -> UnlearnOutput:
    """RL for a DDPM: pseudo-class forgetting + alpha * retain loss on all weights (or `mask`'s).
    SalUn (`ddpm_salun`) is the same on the salient weights; it requires the mask."""
    if name == "SalUn" and mask is None:
        raise ValueError("SalUn needs a saliency mask (diffusion_saliency_scores)")
    loss_fn = diffusion_forget_loss(
        task.model.apply,
        task.schedule,
        num_classes=task.num_classes,
        alpha=config.alpha,
        cond_drop_prob=config.cond_drop_prob,
        pseudo_class=config.pseudo_class,
    )
    return _run(state, task, config, rng, loss_fn, mask, name, **run_options)


ddpm_salun = functools.partial(ddpm_random_label, name="SalUn")


def ddpm_gradient_ascent(
    state,
    task: DiffusionTask,
    config: DiffusionUnlearnConfig,
    rng: jax.Array,
    mask=None,
    **run_options,
) -> UnlearnOutput:
    """GA for a DDPM, as upstream's `--method ga`: minimise -L_simple on a D_f batch + alpha *
    L_simple on a D_r batch (`losses.diffusion_ascent_loss`); needs retain data."""
    loss_fn = diffusion_ascent_loss(
        task.model.apply, task.schedule, alpha=config.alpha, cond_drop_prob=config.cond_drop_prob
    )
    return _run(state, task, config, rng, loss_fn, mask, "GA", **run_options)


def ddpm_esd(
    state,
    task: DiffusionTask,
    config: DiffusionUnlearnConfig,
    rng: jax.Array,
    mask=None,
    **run_options,
) -> UnlearnOutput:
    """ESD for a class-conditional DDPM: train eps(x_t, c) of the forget class towards the
    frozen original's eps(x_t, null) - eta (eps(x_t, c) - eps(x_t, null)) at x_t from the
    model's own partial DDIM chain (`losses.ddpm_esd_loss`); no retain term, all weights (or
    `mask`'s). Batches are forget examples (only their labels are read)."""
    check_null_class(state.params, "ESD (the null class is its empty prompt)")
    loss_fn = ddpm_esd_loss(
        task.model.apply,
        task.schedule,
        image_shape=tuple(int(d) for d in task.images.shape[1:]),
        negative_guidance=config.negative_guidance,
        start_guidance=config.esd_start_guidance,
        num_steps=config.esd_num_steps,
    )
    frozen = uncommitted(state.params)
    return _run(
        state, task, config, rng, loss_fn, mask, "ESD", extra={"frozen": frozen}, **run_options
    )


def ddpm_retrain(
    state,
    task: DiffusionTask,
    config: DiffusionTrainConfig,
    rng: jax.Array,
    mask=None,
    **run_options,
) -> UnlearnOutput:
    """Retrain: the original recipe from scratch on D_r (init and order from `config.seed`)."""
    del state, rng
    if mask is not None:
        raise ValueError("Retrain does not take a mask")
    out = train_diffusion(
        task.images,
        task.labels,
        task.retain,
        task.model,
        task.schedule,
        config,
        desc="Retrain",
        **run_options,
    )
    return UnlearnOutput(
        out.state, out.compile_seconds, out.run_seconds, out.history, code=out.code
    )
