"""IU: influence unlearning with the upstream WoodFisher approximation (`Wfisher.py`).

References: upstream `Classification/unlearn/Wfisher.py` (Singh & Alistarh 2020, WoodFisher).
Ported for behaviour, not textbook WoodFisher: v = forget
grad - retain grad (with upstream's weights), then a rank-one recursion over N + 2 single retain
samples (unshuffled), then theta += alpha * k.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from salun_jax.data.batches import gather_batches
from salun_jax.losses import eval_mode_ce
from salun_jax.saliency import accumulate_gradients
from salun_jax.types import PyTree
from salun_jax.unlearn.common import UnlearnConfig, UnlearnOutput, UnlearnTask


@functools.cache
def _summed_ce_loss(apply_fn, crop_padding: int, flip: bool):
    """Sum (not mean) of per-example CE in eval mode: sum_b n_b * mean-grad_b upstream; the
    BatchNorm statistics are an argument (one compiled program for every model)."""

    def loss_fn(params, batch, rng, batch_stats):
        ce_fn = eval_mode_ce(apply_fn, batch_stats, crop_padding, flip)
        return jnp.sum(ce_fn(params, batch, rng) * batch["weight"])

    return loss_fn


@functools.partial(jax.jit, static_argnums=(0,))
def _flat_grad(per_sample_loss, params, sample, rng, batch_stats):
    sample = jax.tree.map(lambda x: x[None], sample)
    grads = jax.grad(per_sample_loss)(params, sample, rng, batch_stats)
    return ravel_pytree(grads)[0]


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1, 2))
def _woodfisher_step(per_sample_loss, k, o, params, sample, rng, n, batch_stats):
    """tmp = o.g; k -= (k.g / (N + tmp)) o; o -= (tmp / (N + tmp)) o (upstream, literally)."""
    g = _flat_grad(per_sample_loss, params, sample, rng, batch_stats)
    tmp = jnp.dot(o, g)
    k = k - (jnp.dot(k, g) / (n + tmp)) * o
    o = o - (tmp / (n + tmp)) * o
    return k, o


def _woodfisher(per_sample_loss, params, batch_stats, samples, rng, v, n):
    """k = v; o = g_0; then one rank-one update per later sample. A Python loop of jitted steps
    (XLA:CPU runs gradients inside `lax.scan` far slower than stepped; see saliency.py)."""
    _, unravel = ravel_pytree(params)
    take = lambda i: jax.tree.map(lambda x: x[i], samples)  # noqa: E731
    o = _flat_grad(per_sample_loss, params, take(0), jax.random.fold_in(rng, 0), batch_stats)
    k = v
    for index in range(1, len(samples["label"])):
        k, o = _woodfisher_step(
            per_sample_loss,
            k,
            o,
            params,
            take(index),
            jax.random.fold_in(rng, index),
            n,
            batch_stats,
        )
    return unravel(k)


def influence_direction(
    state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array, mask=None
) -> PyTree:
    """IU's direction k = H^-1 (grad L_f - grad L_r) (masked if `mask`), params-shaped: the
    update is theta + `config.iu_step_size` * k, so one k serves every step size."""
    arrays = {"image": task.images, "label": task.labels}
    # With `iu_augment` the images get the run's train augmentation (crop_padding, flip).
    padding, flip = (config.crop_padding, config.flip) if config.iu_augment else (0, False)
    loss_fn = _summed_ce_loss(state.apply_fn, padding, flip)
    n_f, n_r = len(task.forget), len(task.retain)
    forget_rng, retain_rng, fisher_rng = jax.random.split(rng, 3)

    def gradient_sum(indices, key):
        batches = gather_batches(arrays, indices, config.batch_size)
        return accumulate_gradients(loss_fn, state.params, batches, key, context=state.batch_stats)

    forget_sum = gradient_sum(task.forget, forget_rng)
    retain_sum = gradient_sum(task.retain, retain_rng)
    v = jax.tree.map(
        lambda f, r: f / (n_f + n_r) - r * n_f / ((n_f + n_r) * n_r), forget_sum, retain_sum
    )
    count = min(config.woodfisher_samples + 2, n_r)
    order = np.asarray(task.retain[:count])  # unshuffled, batch size 1
    samples = jax.device_put(
        {
            "image": task.images[order],
            "label": task.labels[order],
            "weight": np.ones(count, np.float32),
        }
    )
    k = _woodfisher(
        loss_fn,
        state.params,
        state.batch_stats,
        samples,
        fisher_rng,
        ravel_pytree(v)[0],
        float(config.woodfisher_samples),
    )
    if mask is not None:
        k = jax.tree.map(lambda x, m: x * m, k, mask)
    return k


def influence_unlearning(
    state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array, mask=None, **run_options
) -> UnlearnOutput:
    """IU (upstream `wfisher`): one-shot theta += alpha * H^-1 (grad L_f - grad L_r), with the
    WoodFisher inverse-Hessian product from `woodfisher_samples` + 2 retain samples. One-shot:
    no loop, so `run_options` are unused."""
    del run_options
    start = time.perf_counter()
    k = influence_direction(state, task, config, rng, mask)
    params = jax.tree.map(lambda p, d: p + config.iu_step_size * d, state.params, k)
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    # One-shot: compilation is not separated from the run here (reported as run time).
    return UnlearnOutput(state.replace(params=params), 0.0, seconds, [])
