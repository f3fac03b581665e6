"""Fine-tuning family: FT (retain CE), GA (forget -CE), l1-sparse (retain CE + decaying l1).

References: upstream `Classification/unlearn/FT.py` (FT, and `FT_l1` for l1-sparse) and `GA.py`;
Jia et al. 2023 (model sparsity, l1-sparse unlearning).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.losses import classification_loss, negative_cross_entropy
from salun_jax.unlearn.common import (
    MethodSpec,
    UnlearnConfig,
    UnlearnTask,
    sgd_method,
    steps_per_epoch,
)


def fine_tune_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """FT: cross-entropy on the retain set (catastrophic forgetting of D_f)."""
    loss_fn = classification_loss(crop_padding=config.crop_padding, flip=config.flip)
    return MethodSpec("FT", loss_fn, (task.retain,))


def gradient_ascent_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """GA: minimise -CE on the forget set."""
    loss_fn = classification_loss(
        example_loss_fn=negative_cross_entropy, crop_padding=config.crop_padding, flip=config.flip
    )
    return MethodSpec("GA", loss_fn, (task.forget,))


def _l1_coefficient(step, coefficient, l1_epochs, steps):
    epoch = step // steps
    return jnp.where(
        epoch < l1_epochs, coefficient * (1.0 - epoch / jnp.maximum(l1_epochs, 1)), 0.0
    )


def l1_schedule(config: UnlearnConfig, steps: int):
    """step -> the l1 coefficient alpha * (1 - epoch / (E - no_l1_epochs)), and 0 for the last
    `no_l1_epochs` epochs (upstream `FT_l1`: decayed per epoch)."""
    l1_epochs = config.epochs - config.no_l1_epochs
    return lambda step: _l1_coefficient(step, config.l1_coefficient, l1_epochs, steps)


def _l1_values(config: UnlearnConfig, steps: int) -> dict:
    """`l1_schedule`'s values, carried in `TrainState.extra` (one compiled step for all)."""
    return {
        "l1_coefficient": np.float32(config.l1_coefficient),
        "l1_epochs": np.int32(config.epochs - config.no_l1_epochs),
        "steps_per_epoch": np.int32(steps),
    }


@functools.cache
def _l1_sparse_loss(crop_padding: int, flip: bool):
    """CE + the l1 term, its coefficient from `state.extra` (`_l1_values`)."""
    ce_loss = classification_loss(crop_padding=crop_padding, flip=flip)

    def loss_fn(params, batch, rng, state):
        per_example, aux = ce_loss(params, batch, rng, state)
        values = state.extra
        coefficient = _l1_coefficient(
            state.step, values["l1_coefficient"], values["l1_epochs"], values["steps_per_epoch"]
        )
        penalty = coefficient * sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))
        return per_example, {**aux, "penalty": penalty}

    return loss_fn


def l1_sparse_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """l1-sparse: CE on D_r + alpha_t * ||theta||_1 over all params (`l1_schedule`)."""
    phases = (task.retain,)
    values = _l1_values(config, steps_per_epoch(phases, config.batch_size))
    return MethodSpec(
        "l1-sparse",
        _l1_sparse_loss(config.crop_padding, config.flip),
        phases,
        extra_fn=lambda state: values,
    )


fine_tune = sgd_method(fine_tune_spec)
gradient_ascent = sgd_method(gradient_ascent_spec)
l1_sparse = sgd_method(l1_sparse_spec)
