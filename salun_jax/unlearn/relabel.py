"""Random labelling: RL, SalUn (RL + saliency mask) and SalUn-soft (RL + proximal step).

References: SalUn Eq. 5-6 and Sec. 4; upstream `Classification/unlearn/RL.py` (HEAD: all forget
batches, then all retain batches, each epoch; paper time: mixed batches) and `RL_proximal.py`
(SalUn-soft's soft-thresholding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.losses import classification_loss, relabel_forget_fn
from salun_jax.step import TrainState
from salun_jax.unlearn.common import (
    MethodSpec,
    UnlearnConfig,
    UnlearnTask,
    sgd_method,
    steps_per_epoch,
)


def _phases(task: UnlearnTask, variant: str) -> tuple[np.ndarray, ...]:
    if variant == "sequential":  # HEAD for CIFAR-10/SVHN: all forget batches, then all retain
        return (task.forget, task.retain)
    return (np.concatenate([task.forget, task.retain]),)  # paper time: mixed batches


def _relabel_loss(task: UnlearnTask, config: UnlearnConfig):
    return classification_loss(
        crop_padding=config.crop_padding,
        flip=config.flip,
        label_fn=relabel_forget_fn(task.num_classes, config.rl_exclude_true_label),
    )


def random_label_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """RL: CE with random labels on D_f and true labels on D_r (`config.rl_variant` orders
    them)."""
    return MethodSpec("RL", _relabel_loss(task, config), _phases(task, config.rl_variant))


def salun_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """SalUn: RL restricted to the salient weights by its mask, which it requires."""
    return MethodSpec(
        "SalUn",
        _relabel_loss(task, config),
        _phases(task, config.rl_variant),
        mask="required",
        mask_reason="salun_jax.salun_mask",
    )


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


def salun_soft_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """SalUn-soft: RL (concat variant, as upstream) + after every step a soft-thresholding of the
    change since the start of the epoch. The threshold is the `ratio`-th smallest |change|, with
    ratio = int(soft_mask_ratio * (total - (epoch * steps_per_epoch + 1)) / total * P), constant
    within an epoch (the CIFAR-10 branch upstream). It takes no hard mask."""
    phases = _phases(task, "concat")
    steps = steps_per_epoch(phases, config.batch_size)
    return MethodSpec(
        "SalUn-soft",
        _relabel_loss(task, config),
        phases,
        mask="forbidden",
        mask_reason="its soft threshold replaces it",
        extra_fn=lambda state: salun_soft_values(state.params, config, steps),
        post_update_fn=soft_threshold_update,
        epoch_start_fn=snapshot_anchor,
    )


random_label = sgd_method(random_label_spec)
salun = sgd_method(salun_spec)
salun_soft = sgd_method(salun_soft_spec)
