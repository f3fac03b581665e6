"""The train state and the ONE step builder every training and unlearning run goes through.

`make_step(loss_fn)` turns a per-example loss (see `salun_jax.losses`) into a pure step
`step(state, batch, rng) -> (state, metrics)` that owns what every method shares: folding the
step counter (and device index) into the key, the weighted global mean over the real examples,
the cross-device reduction, the gradient norm and the optimizer update (the saliency mask, if
any, lives in the optimizer: `salun_jax.optim`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from salun_jax.types import LossFn, PyTree

AXIS = "batch"  # the pmap axis of the data-parallel loop


class TrainState(struct.PyTreeNode):
    """Everything a step changes, plus `extra`: a pytree carried unchanged by steps (e.g. the frozen
    original model for boundary shrink, or the epoch-start params for SalUn-soft)."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    extra: PyTree = None
    ema_params: PyTree = None
    apply_fn: Callable = struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)
    ema_decay: float | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable,
        params: PyTree,
        tx: optax.GradientTransformation,
        batch_stats: PyTree = None,
        extra: PyTree = None,
        ema_decay: float | None = None,
    ) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats={} if batch_stats is None else batch_stats,
            opt_state=tx.init(params),
            extra=extra,
            ema_params=jax.tree.map(jnp.copy, params) if ema_decay else None,
            apply_fn=apply_fn,
            tx=tx,
            ema_decay=ema_decay,
        )

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def apply_gradients(self, grads: PyTree, batch_stats: PyTree | None = None) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if self.ema_decay:
            ema = optax.incremental_update(params, ema, 1.0 - self.ema_decay)
        return self.replace(
            step=self.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            batch_stats=self.batch_stats if batch_stats is None else batch_stats,
        )

    def with_optimizer(self, tx: optax.GradientTransformation) -> TrainState:
        """A fresh optimizer (new state, step 0) on the same weights."""
        return self.replace(tx=tx, opt_state=tx.init(self.params), step=jnp.zeros((), jnp.int32))


_MODULES: dict[nn.Module, nn.Module] = {}


def canonical_module(model: nn.Module) -> nn.Module:
    """The first module of this process equal to `model` (same class and fields).

    `model.apply` is a bound method, and bound methods of two equal but distinct modules compare
    unequal; jitted code keyed on the apply function (a `TrainState`'s tree structure, a predict
    function) would then compile once per module object. Models built through this share it.
    """
    return _MODULES.setdefault(model, model)


@functools.cache
def _jitted_init(model: nn.Module, image_shape: tuple[int, ...]) -> Callable:
    return jax.jit(lambda r: model.init(r, jnp.zeros((1, *image_shape)), train=False))


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
    """Initialises a classifier; returns {"params", "batch_stats"}."""
    variables = _jitted_init(canonical_module(model), tuple(image_shape))(rng)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(
    model: nn.Module,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    tx: optax.GradientTransformation,
    **kwargs,
) -> TrainState:
    """A fresh classifier state (params and BatchNorm statistics from `model.init`)."""
    variables = init_variables(model, rng, image_shape)
    return TrainState.create(
        apply_fn=canonical_module(model).apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
        **kwargs,
    )


def make_step(
    loss_fn: LossFn,
    *,
    axis_name: str | None = AXIS,
    update_batch_stats: bool = True,
    post_update_fn: Callable[[TrainState], TrainState] | None = None,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Builds the pure step `(state, batch, rng) -> (state, metrics)` of a per-example loss.

    Memoised: the same arguments (the same loss and post-update function objects) give the same
    step object, so `salun_jax.loop.run` reuses its compiled executable. Build losses with
    the cached factories of `salun_jax.losses` and keep values that vary between runs in the
    state (`TrainState.extra`, the optimizer state), not in closures.

    The loss is the mean over the real examples of the GLOBAL batch: each device sums its
    weighted per-example losses and divides by the global weight, then gradients are psum-ed (a
    pmean of per-device means would over-weight a device whose shard is mostly padding).

    Args:
      loss_fn: `(params, batch, rng, state) -> (per-example loss [B], aux)`; `rng` is the step's
        key (folded with the step counter and the device index). aux may hold "metrics"
        ({name: [B]}, averaged like the loss), "penalty" (a scalar added once) and
        "batch_stats" (new BatchNorm statistics, averaged over devices).
      axis_name: the pmap axis (`AXIS` in `salun_jax.loop.run`); None for a plain jit.
      update_batch_stats: False keeps the BatchNorm running statistics frozen.
      post_update_fn: state -> state after the optimizer update (SalUn-soft's proximal step).

    Returns:
      The step. metrics: loss, the aux metrics, num_examples (sum of weights) and grad_norm
      (global, before any clipping in the optimizer).
    """

    return _make_step(loss_fn, axis_name, update_batch_stats, post_update_fn)


@functools.cache
def _make_step(loss_fn, axis_name, update_batch_stats, post_update_fn):
    def step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        weights = batch["weight"]
        num_devices, total_weight = 1, jnp.sum(weights)
        if axis_name is not None:
            num_devices = jax.lax.psum(1, axis_name)
            total_weight = jax.lax.psum(total_weight, axis_name)
        total_weight = jnp.maximum(total_weight, 1.0)

        def objective(params):
            per_example, aux = loss_fn(params, batch, rng, state)
            loss = jnp.sum(per_example * weights) / total_weight
            if "penalty" in aux:
                loss = loss + aux["penalty"] / num_devices
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        metrics = {"loss": loss}
        for name, values in aux.get("metrics", {}).items():
            metrics[name] = jnp.sum(values * weights) / total_weight
        metrics["num_examples"] = jnp.sum(weights)
        batch_stats = aux.get("batch_stats") if update_batch_stats else None
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
            if batch_stats is not None:
                batch_stats = jax.lax.pmean(batch_stats, axis_name)
            metrics = jax.lax.psum(metrics, axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = state.apply_gradients(grads, batch_stats)
        if post_update_fn is not None:
            new_state = post_update_fn(new_state)
        return new_state, metrics

    return step
