"""Random labelling: RL, SalUn (RL + saliency mask) and SalUn-soft (RL + proximal step).

References: SalUn Eq. 5-6; reference-salun.md §2.5 (the sequential and concat variants), §2.6
(SalUn-soft's soft-thresholding), §9.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.train import TrainState, make_train_step
from salun_jax.unlearn.common import (
    UnlearnConfig,
    UnlearnOutput,
    UnlearnTask,
    run_sgd,
    sgd_state,
    step_kwargs,
    steps_per_epoch,
)


def make_relabel_fn(num_classes: int, exclude_true_label: bool):
    """Replaces the labels of forget examples (batch["forget"]) by random classes, drawn per step.

    Upstream draws uniformly over all K classes (may equal y); with `exclude_true_label` the draw is
    uniform over the K - 1 other classes (the paper's y' != y).
    """

    def relabel(rng, images, labels, batch, state):
        del state
        if exclude_true_label:
            offset = jax.random.randint(rng, labels.shape, 1, num_classes)
            random_labels = (labels + offset) % num_classes
        else:
            random_labels = jax.random.randint(rng, labels.shape, 0, num_classes)
        return images, jnp.where(batch["forget"], random_labels, labels)

    return relabel


def _phases(task: UnlearnTask, variant: str):
    if variant == "sequential":  # HEAD for CIFAR-10/SVHN: all forget batches, then all retain
        return lambda epoch, rng: [task.forget, task.retain]
    both = np.concatenate([task.forget, task.retain])  # paper time: mixed batches
    return lambda epoch, rng: [both]


def _relabel_run(state, task, config, rng, mask, desc, post_update_fn=None, epoch_start_fn=None,
                 variant=None):
    variant = variant or config.rl_variant
    sizes = ([len(task.forget), len(task.retain)] if variant == "sequential"
             else [len(task.forget) + len(task.retain)])
    steps = steps_per_epoch(sizes, config.batch_size)
    state = sgd_state(state, config, steps, mask)
    step = make_train_step(**step_kwargs(config),
                           batch_transform_fn=make_relabel_fn(task.num_classes,
                                                              config.rl_exclude_true_label),
                           post_update_fn=post_update_fn)
    state, compile_s, run_s, history = run_sgd(state, task, step, _phases(task, variant), config,
                                               rng, epoch_start_fn=epoch_start_fn, desc=desc)
    return UnlearnOutput(state, compile_s, run_s, history), steps


def random_label(state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array,
                 mask=None) -> UnlearnOutput:
    """RL: CE with random labels on D_f and true labels on D_r (no mask)."""
    return _relabel_run(state, task, config, rng, mask, "RL")[0]


def salun(state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array,
          mask=None) -> UnlearnOutput:
    """SalUn: RL restricted to the salient weights by the mask (required)."""
    if mask is None:
        raise ValueError("SalUn needs a saliency mask (compute one with salun_jax.saliency)")
    return _relabel_run(state, task, config, rng, mask, "SalUn")[0]


def soft_threshold(params, anchor, threshold):
    """Proximal step of an l1 penalty on params - anchor: shrink each coordinate's difference by
    `threshold`, resetting it to the anchor where |difference| <= threshold."""

    def leaf(p, a):
        diff = p - a
        return jnp.where(diff > threshold, p - threshold,
                         jnp.where(diff < -threshold, p + threshold, a))

    return jax.tree.map(leaf, params, anchor)


def salun_soft(state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array,
               mask=None) -> UnlearnOutput:
    """SalUn-soft: RL (concat variant, as upstream) + after every step a soft-thresholding of the
    change since the start of the epoch. The threshold is the `ratio`-th smallest |change|, with
    ratio = int(soft_mask_ratio * (total - (epoch * steps_per_epoch + 1)) / total * P), constant
    within an epoch (the CIFAR-10 branch upstream). No hard mask."""
    del mask
    sizes = [len(task.forget) + len(task.retain)]
    steps = steps_per_epoch(sizes, config.batch_size)
    total_steps = config.epochs * steps
    num_params = sum(x.size for x in jax.tree.leaves(state.params))

    def post_update(new_state: TrainState) -> TrainState:
        epoch = (new_state.step - 1) // steps
        ratio = (config.soft_mask_ratio * (total_steps - (epoch * steps + 1)) / total_steps
                 * num_params).astype(jnp.int32)
        anchor = new_state.extra
        flat_diff = jnp.concatenate([jnp.abs(p - a).ravel() for p, a in zip(
            jax.tree.leaves(new_state.params), jax.tree.leaves(anchor), strict=True)])
        kth = jnp.sort(flat_diff)[jnp.clip(ratio - 1, 0, num_params - 1)]
        threshold = jnp.where(ratio > 0, kth, 0.0)
        return new_state.replace(params=soft_threshold(new_state.params, anchor, threshold))

    def epoch_start(state_r: TrainState, epoch: int) -> TrainState:
        # Snapshot taken at each epoch's start; a copy, since the step donates the state.
        return state_r.replace(extra=jax.tree.map(jnp.copy, state_r.params))

    state = state.replace(extra=state.params)
    output, _ = _relabel_run(state, task, config, rng, None, "SalUn-soft",
                             post_update_fn=post_update, epoch_start_fn=epoch_start,
                             variant="concat")
    return output._replace(state=output.state.replace(extra=None))
