"""NegGrad+ (Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning", the baseline of SCRUB):
descend the retain loss while ascending the forget loss, beta * CE(D_r) - (1 - beta) * CE(D_f).

Upstream (the SCRUB code) takes a retain batch and a forget batch per step, each through its own
forward pass. Here a step takes one shuffled batch of D_f and D_r together (the concat phase of
RL) and weights each example so that the batch's loss is exactly beta * mean_r(CE) - (1 - beta) *
mean_f(CE) on one device (across devices: the devices' losses averaged by their example counts);
train-mode BatchNorm then normalises retain and forget images together.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from salun_jax.losses import classification_loss
from salun_jax.unlearn.common import MethodSpec, UnlearnConfig, UnlearnTask, sgd_method


@functools.cache
def _neggrad_plus_loss(crop_padding: int, flip: bool):
    """CE per example, scaled to beta * n / n_r on retain and -(1 - beta) * n / n_f on forget
    examples (n, n_r, n_f: the batch's real examples of each kind); beta from `state.extra`."""
    ce_loss = classification_loss(crop_padding=crop_padding, flip=flip)

    def loss_fn(params, batch, rng, state):
        per_example, aux = ce_loss(params, batch, rng, state)
        beta = state.extra["neggrad_beta"]
        weight, forget = batch["weight"], batch["forget"]
        total = jnp.sum(weight)
        num_forget = jnp.sum(jnp.where(forget, weight, 0.0))
        num_retain = total - num_forget
        scale = jnp.where(
            forget,
            -(1.0 - beta) * total / jnp.maximum(num_forget, 1.0),
            beta * total / jnp.maximum(num_retain, 1.0),
        )
        return per_example * scale, aux

    return loss_fn


def neggrad_plus_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """NegGrad+: beta * CE on D_r - (1 - beta) * CE on D_f (`config.neggrad_beta`), on mixed
    shuffled batches of both."""
    return MethodSpec(
        "NegGrad+",
        _neggrad_plus_loss(config.crop_padding, config.flip),
        (np.concatenate([task.forget, task.retain]),),
        extra_fn=lambda state: {"neggrad_beta": np.float32(config.neggrad_beta)},
    )


neggrad_plus = sgd_method(neggrad_plus_spec)
