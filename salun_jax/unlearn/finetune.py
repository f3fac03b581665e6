"""Fine-tuning family: FT (retain CE), GA (forget -CE), l1-sparse (retain CE + decaying l1).

References: upstream `Classification/unlearn/FT.py` (FT, and `FT_l1` for l1-sparse) and `GA.py`;
Jia et al. 2023 (model sparsity, l1-sparse unlearning).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salun_jax.losses import classification_loss, negative_cross_entropy
from salun_jax.unlearn.common import (
    UnlearnConfig,
    UnlearnOutput,
    UnlearnTask,
    run_unlearning_sgd,
    steps_per_epoch,
)


def fine_tune(
    state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array, mask=None, **run_options
) -> UnlearnOutput:
    """FT: cross-entropy on the retain set (catastrophic forgetting of D_f)."""
    loss_fn = classification_loss(crop_padding=config.crop_padding, flip=config.flip)
    return run_unlearning_sgd(
        state, task, config, rng, loss_fn, [task.retain], mask=mask, desc="FT", **run_options
    )


def gradient_ascent(
    state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array, mask=None, **run_options
) -> UnlearnOutput:
    """GA: minimise -CE on the forget set."""
    loss_fn = classification_loss(
        example_loss_fn=negative_cross_entropy, crop_padding=config.crop_padding, flip=config.flip
    )
    return run_unlearning_sgd(
        state, task, config, rng, loss_fn, [task.forget], mask=mask, desc="GA", **run_options
    )


def l1_schedule(config: UnlearnConfig, steps: int):
    """step -> the l1 coefficient alpha * (1 - epoch / (E - no_l1_epochs)), and 0 for the last
    `no_l1_epochs` epochs (upstream `FT_l1`: decayed per epoch)."""
    l1_epochs = config.epochs - config.no_l1_epochs

    def coefficient(step):
        epoch = step // steps
        return jnp.where(
            epoch < l1_epochs, config.l1_coefficient * (1.0 - epoch / max(l1_epochs, 1)), 0.0
        )

    return coefficient


def l1_sparse(
    state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array, mask=None, **run_options
) -> UnlearnOutput:
    """l1-sparse: CE on D_r + alpha_t * ||theta||_1 over all params (`l1_schedule`)."""
    coefficient = l1_schedule(config, steps_per_epoch([task.retain], config.batch_size))

    def penalty(params, step):
        return coefficient(step) * sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))

    loss_fn = classification_loss(
        crop_padding=config.crop_padding, flip=config.flip, penalty_fn=penalty
    )
    return run_unlearning_sgd(
        state, task, config, rng, loss_fn, [task.retain], mask=mask, desc="l1-sparse", **run_options
    )
