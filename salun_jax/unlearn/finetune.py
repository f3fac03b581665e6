"""Fine-tuning family: FT (retain CE), GA (forget -CE), l1-sparse (retain CE + decaying l1).

References: reference-salun.md §2.4 (update rules and data), §2.3 (optimizer and loop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from salun_jax.train import make_train_step, softmax_cross_entropy
from salun_jax.unlearn.common import (
    UnlearnConfig,
    UnlearnOutput,
    UnlearnTask,
    run_sgd,
    sgd_state,
    step_kwargs,
    steps_per_epoch,
)


def _run(state, task, config, rng, mask, indices, desc, **step_options):
    steps = steps_per_epoch([len(indices)], config.batch_size)
    state = sgd_state(state, config, steps, mask)
    step = make_train_step(**step_kwargs(config), **step_options)
    state, compile_s, run_s, history = run_sgd(state, task, step, lambda e, r: [indices], config,
                                               rng, desc=desc)
    return UnlearnOutput(state, compile_s, run_s, history)


def fine_tune(state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array,
              mask=None) -> UnlearnOutput:
    """FT: cross-entropy on the retain set (catastrophic forgetting of D_f)."""
    return _run(state, task, config, rng, mask, task.retain, "FT")


def gradient_ascent(state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array,
                    mask=None) -> UnlearnOutput:
    """GA: minimise -CE on the forget set."""
    return _run(state, task, config, rng, mask, task.forget, "GA",
                example_loss_fn=lambda logits, labels: -softmax_cross_entropy(logits, labels))


def l1_sparse(state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array,
              mask=None) -> UnlearnOutput:
    """l1-sparse: CE on D_r + alpha_t * ||theta||_1 over all params, alpha_t linearly decayed per
    epoch: alpha * (1 - epoch / (E - no_l1_epochs)), and 0 for the last `no_l1_epochs` epochs."""
    steps = steps_per_epoch([len(task.retain)], config.batch_size)
    l1_epochs = config.epochs - config.no_l1_epochs

    def regularizer(params, step):
        epoch = step // steps
        coefficient = jnp.where(epoch < l1_epochs,
                                config.alpha * (1.0 - epoch / max(l1_epochs, 1)), 0.0)
        l1 = sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))
        return coefficient * l1

    return _run(state, task, config, rng, mask, task.retain, "l1-sparse",
                regularizer_fn=regularizer)
