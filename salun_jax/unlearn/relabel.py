"""Random labelling: RL, SalUn (RL + saliency mask) and SalUn-soft (RL + proximal step).

References: SalUn Eq. 5-6 and Sec. 4; upstream `Classification/unlearn/RL.py` (HEAD: all forget
batches, then all retain batches, each epoch; paper time: mixed batches) and `RL_proximal.py`
(SalUn-soft's soft-thresholding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.losses import classification_loss, relabel_forget_fn
from salun_jax.step import TrainState
from salun_jax.unlearn.common import (
    UnlearnConfig,
    UnlearnOutput,
    UnlearnTask,
    run_unlearning_sgd,
    steps_per_epoch,
)


def _phases(task: UnlearnTask, variant: str) -> list[np.ndarray]:
    if variant == "sequential":  # HEAD for CIFAR-10/SVHN: all forget batches, then all retain
        return [task.forget, task.retain]
    return [np.concatenate([task.forget, task.retain])]  # paper time: mixed batches


def _relabel_loss(task: UnlearnTask, config: UnlearnConfig):
    return classification_loss(
        crop_padding=config.crop_padding,
        flip=config.flip,
        label_fn=relabel_forget_fn(task.num_classes, config.rl_exclude_true_label),
    )


def random_label(
    state,
    task: UnlearnTask,
    config: UnlearnConfig,
    rng: jax.Array,
    mask=None,
    *,
    name: str = "RL",
    **run_options,
) -> UnlearnOutput:
    """RL: CE with random labels on D_f and true labels on D_r. SalUn (`salun`) is RL restricted
    to the salient weights by its mask, which it requires."""
    if name == "SalUn" and mask is None:
        raise ValueError("SalUn needs a saliency mask (salun_jax.salun_mask)")
    return run_unlearning_sgd(
        state,
        task,
        config,
        rng,
        _relabel_loss(task, config),
        _phases(task, config.rl_variant),
        mask=mask,
        desc=name,
        **run_options,
    )


salun = functools.partial(random_label, name="SalUn")


def soft_threshold(params, anchor, threshold):
    """Proximal step of an l1 penalty on params - anchor: shrink each coordinate's difference by
    `threshold`, resetting it to the anchor where |difference| <= threshold."""

    def leaf(p, a):
        diff = p - a
        return jnp.where(
            diff > threshold, p - threshold, jnp.where(diff < -threshold, p + threshold, a)
        )

    return jax.tree.map(leaf, params, anchor)


def soft_threshold_update(new_state: TrainState) -> TrainState:
    """SalUn-soft's post-update step; its values (anchor, ratio, steps) come from `extra`."""
    values = new_state.extra
    anchor, steps, total_steps = values["anchor"], values["steps"], values["total_steps"]
    num_params = sum(x.size for x in jax.tree.leaves(new_state.params))
    epoch = (new_state.step - 1) // steps
    ratio = (
        values["soft_mask_ratio"] * (total_steps - (epoch * steps + 1)) / total_steps * num_params
    ).astype(jnp.int32)
    flat_diff = jnp.concatenate(
        [
            jnp.abs(p - a).ravel()
            for p, a in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(anchor), strict=True)
        ]
    )
    kth = jnp.sort(flat_diff)[jnp.clip(ratio - 1, 0, num_params - 1)]
    threshold = jnp.where(ratio > 0, kth, 0.0)
    return new_state.replace(params=soft_threshold(new_state.params, anchor, threshold))


def snapshot_anchor(state_r: TrainState, epoch: int) -> TrainState:
    # Snapshot taken at each epoch's start; a copy, since the step donates the state.
    del epoch
    anchor = jax.tree.map(jnp.copy, state_r.params)
    return state_r.replace(extra={**state_r.extra, "anchor": anchor})


def salun_soft_values(params, config: UnlearnConfig, steps: int) -> dict:
    """SalUn-soft's values in the state (not in closures: seeds and ratios share one compiled
    step): the anchor (the params at the epoch's start), the ratio and the step counts."""
    return {
        "anchor": params,
        "soft_mask_ratio": np.float32(config.soft_mask_ratio),
        "steps": np.int32(steps),
        "total_steps": np.int32(config.epochs * steps),
    }


def salun_soft(
    state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array, mask=None, **run_options
) -> UnlearnOutput:
    """SalUn-soft: RL (concat variant, as upstream) + after every step a soft-thresholding of the
    change since the start of the epoch. The threshold is the `ratio`-th smallest |change|, with
    ratio = int(soft_mask_ratio * (total - (epoch * steps_per_epoch + 1)) / total * P), constant
    within an epoch (the CIFAR-10 branch upstream). It takes no hard mask."""
    if mask is not None:
        raise ValueError("SalUn-soft does not take a mask (its soft threshold replaces it)")
    phases = _phases(task, "concat")
    values = salun_soft_values(state.params, config, steps_per_epoch(phases, config.batch_size))
    output = run_unlearning_sgd(
        state.replace(extra=values),
        task,
        config,
        rng,
        _relabel_loss(task, config),
        phases,
        desc="SalUn-soft",
        **run_options,
        post_update_fn=soft_threshold_update,
        epoch_start_fn=snapshot_anchor,
    )
    return output._replace(state=output.state.replace(extra=None))
