"""SSD: selective synaptic dampening (Foster et al., "Fast Machine Unlearning Without Retraining
Through Selective Synaptic Dampening", AAAI 2024). Training-free and Fisher-based, a natural peer
of weight saliency: it too ranks weights by how much the forget set needs them.

Importances are diagonal empirical Fishers, the mean over batches of the squared gradient of the
batch-mean CE: I_f on the forget set, I_D on the whole train set (forget + retain). A weight is
selected where I_f > alpha * I_D and then multiplied by min(lambda * I_D / I_f, 1); the others
and the BatchNorm statistics are kept. As the reference code (`ssd.py`: exponent 1, lower bound
1); gradients here are taken with BatchNorm in inference mode and the config's augmentation, as
SalUn's saliency is.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.data.batches import gather_batches
from salun_jax.losses import eval_mode_ce, weighted_mean
from salun_jax.saliency import accumulate_gradients, check_mask
from salun_jax.types import PyTree
from salun_jax.unlearn.common import UnlearnConfig, UnlearnOutput, UnlearnTask


@functools.cache
def mean_ce_loss(apply_fn, crop_padding: int, flip: bool):
    """The batch-mean CE in eval mode; the BatchNorm statistics are an argument (one compiled
    program for every model of this shape)."""

    def loss_fn(params, batch, rng, batch_stats):
        ce = eval_mode_ce(apply_fn, batch_stats, crop_padding, flip)(params, batch, rng)
        return weighted_mean(ce, batch["weight"])

    return loss_fn


def importance_batches(task: UnlearnTask, indices: np.ndarray, batch_size: int) -> dict:
    """`indices` in order, cut into `batch_size` batches (the last one padded), each with its
    batch number `index` (a population keys each member's augmentation with it)."""
    arrays = {"image": task.images, "label": task.labels}
    batches = gather_batches(arrays, np.asarray(indices), batch_size)
    batches["index"] = np.arange(batches["label"].shape[0], dtype=np.int32)
    return batches


def mean_squared_gradients(loss_fn, params: PyTree, batches: dict, rng, context) -> PyTree:
    """The mean over `batches` of the elementwise squared gradient of `loss_fn`."""
    total = accumulate_gradients(loss_fn, params, batches, rng, context=context, square=True)
    num_batches = batches["label"].shape[0]
    return jax.tree.map(lambda x: x / num_batches, total)


def importance(state, task: UnlearnTask, indices: np.ndarray, config: UnlearnConfig, rng) -> PyTree:
    """The mean over `config.batch_size` batches of `indices` (in order, the last one padded) of
    the squared gradient of the batch-mean CE at `state`: SSD's importance, params-shaped."""
    batches = importance_batches(task, indices, config.batch_size)
    loss_fn = mean_ce_loss(state.apply_fn, config.crop_padding, config.flip)
    return mean_squared_gradients(loss_fn, state.params, batches, rng, state.batch_stats)


def train_indices(task: UnlearnTask) -> np.ndarray:
    """SSD's D: the whole train set, forget and retain, in index order."""
    return np.sort(np.concatenate([task.forget, task.retain]))


def importances(state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array):
    """(I_f, I_D): the importances on the forget set and on the train set, with the two halves
    of `rng`. They do not depend on alpha or lambda: one pair serves a whole tuning grid."""
    forget_rng, train_rng = jax.random.split(rng)
    forget_importance = importance(state, task, task.forget, config, forget_rng)
    train_importance = importance(state, task, train_indices(task), config, train_rng)
    return forget_importance, train_importance


def dampen(params: PyTree, forget_importance: PyTree, train_importance: PyTree, alpha, lam):
    """SSD's update: theta * min(lam * I_D / I_f, 1) where I_f > alpha * I_D, else theta."""

    def leaf(p, i_f, i_d):
        selected = i_f > alpha * i_d
        factor = jnp.minimum(lam * i_d / jnp.where(selected, i_f, 1.0), 1.0)
        return jnp.where(selected, p * factor, p)

    return jax.tree.map(leaf, params, forget_importance, train_importance)


def ssd_update(params, forget_importance, train_importance, alpha, lam, mask=None) -> PyTree:
    """`dampen`, then, with a 0/1 `mask`, the old value wherever the mask is 0."""
    new = dampen(params, forget_importance, train_importance, alpha, lam)
    if mask is None:
        return new
    return jax.tree.map(lambda n, old, m: jnp.where(m > 0, n, old), new, params, mask)


def selective_synaptic_dampening(
    state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array, mask=None, **run_options
) -> UnlearnOutput:
    """SSD: dampen the weights the forget set needs far more than the train set does
    (`config.ssd_alpha`, the selection weighting; `config.ssd_lambda`, the dampening constant).
    With a 0/1 `mask`, only its weights may change. One-shot: `run_options` are unused."""
    del run_options
    if mask is not None:
        check_mask(mask, state.params)
    start = time.perf_counter()
    forget_importance, train_importance = importances(state, task, config, rng)
    params = ssd_update(
        state.params,
        forget_importance,
        train_importance,
        config.ssd_alpha,
        config.ssd_lambda,
        mask,
    )
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    # One-shot: compilation is not separated from the run here (reported as run time).
    return UnlearnOutput(state.replace(params=params), 0.0, seconds, [])
