"""TrainState, pure train/eval steps, the pmap data-parallel wrapper and the epoch loop.

A step is `train_step(state, batch, rng) -> (state, metrics)`. A batch is a dict of
`image` uint8 [B, H, W, C], `label` int32 [B], `weight` float32 [B] (0 marks padding of the last
partial batch, so every step has one shape and compiles once) and any other per-example arrays
of the data dict (e.g. `forget` bool [B]). `parallel_step` turns a step into a pmapped function
that gathers its batch from device-resident data by index, so the epoch loop never ships images
from the host and never syncs until the epoch ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from salun_jax import optim as optim_lib
from salun_jax.data.augment import random_crop_flip, to_float
from salun_jax.data.batches import epoch_batches

PyTree = Any
AXIS = "batch"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


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
    def create(cls, *, apply_fn: Callable, params: PyTree, tx: optax.GradientTransformation,
               batch_stats: PyTree = None, extra: PyTree = None,
               ema_decay: float | None = None) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   batch_stats={} if batch_stats is None else batch_stats,
                   opt_state=tx.init(params), extra=extra,
                   ema_params=jax.tree.map(jnp.copy, params) if ema_decay else None,
                   apply_fn=apply_fn, tx=tx,
                   ema_decay=ema_decay)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def apply_gradients(self, grads: PyTree, batch_stats: PyTree | None = None) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if self.ema_decay:
            ema = optax.incremental_update(params, ema, 1.0 - self.ema_decay)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                            batch_stats=self.batch_stats if batch_stats is None else batch_stats)

    def with_optimizer(self, tx: optax.GradientTransformation) -> TrainState:
        """A fresh optimizer (new state, step 0) on the same weights."""
        return self.replace(tx=tx, opt_state=tx.init(self.params), step=jnp.zeros((), jnp.int32))


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
    """Initialises a classifier; returns {"params", "batch_stats"}."""
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, *image_shape)), train=False))(rng)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...],
                       tx: optax.GradientTransformation, **kwargs) -> TrainState:
    variables = init_variables(model, rng, image_shape)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"], tx=tx, **kwargs)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(
    *,
    example_loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = softmax_cross_entropy,
    regularizer_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
    batch_transform_fn: Callable | None = None,
    post_update_fn: Callable[[TrainState], TrainState] | None = None,
    augment: bool = True,
    crop_padding: int = 4,
    flip: bool = True,
    update_batch_stats: bool = True,
    axis_name: str | None = None,
) -> Callable:
    """Builds a pure classification step `(state, batch, rng) -> (state, metrics)`.

    Args:
      example_loss_fn: (logits [B, K], labels [B]) -> per-example loss [B]; e.g. CE, or -CE (GA).
      regularizer_fn: (params, step) -> scalar added to the loss (e.g. a scheduled l1 term).
      batch_transform_fn: (rng, images float [B,H,W,C], labels [B], batch, state) ->
        (images, labels), applied after augmentation inside the step (random relabelling for RL,
        adversarial labels for boundary shrink, ...).
      post_update_fn: state -> state after the optimizer update (e.g. SalUn-soft's proximal step).
      augment: random crop (zero padding `crop_padding`) + horizontal flip (`flip`) per example.
      update_batch_stats: False freezes BatchNorm running statistics.
      axis_name: the pmap axis to average gradients, metrics and batch statistics over.
    """

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        augment_rng, transform_rng = jax.random.split(rng)
        if augment:
            images = random_crop_flip(augment_rng, batch["image"], crop_padding, flip)
        else:
            images = to_float(batch["image"])
        labels = batch["label"]
        if batch_transform_fn is not None:
            images, labels = batch_transform_fn(transform_rng, images, labels, batch, state)
        weights = batch.get("weight", jnp.ones(labels.shape, jnp.float32))
        # Mean over the real examples of the global batch: each device sums its weighted losses
        # and divides by the global weight, then gradients are psum-ed. (A pmean of per-device
        # means would over-weight a device whose shard is mostly padding.)
        num_devices, total_weight = 1, jnp.sum(weights)
        if axis_name is not None:
            num_devices = jax.lax.psum(1, axis_name)
            total_weight = jax.lax.psum(total_weight, axis_name)
        total_weight = jnp.maximum(total_weight, 1.0)

        def loss_fn(params):
            logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                             images, train=True, mutable=["batch_stats"])
            loss = jnp.sum(example_loss_fn(logits, labels) * weights) / total_weight
            if regularizer_fn is not None:
                loss = loss + regularizer_fn(params, state.step) / num_devices
            return loss, (logits, updates.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights) / total_weight
        metrics = {"loss": loss, "accuracy": correct, "num_examples": jnp.sum(weights)}
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
            batch_stats = jax.lax.pmean(batch_stats, axis_name)
            metrics = jax.lax.psum(metrics, axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new_state = state.apply_gradients(grads, batch_stats if update_batch_stats else None)
        if post_update_fn is not None:
            new_state = post_update_fn(new_state)
        return new_state, metrics

    return train_step


def parallel_step(step_fn: Callable) -> Callable:
    """pmaps a step built with `axis_name=AXIS` over all local devices.

    The returned function takes (replicated state, replicated data dict, indices [D, B/D],
    weights [D, B/D], rng) and gathers each device's batch from its copy of the data. One device
    is the same code with D = 1.
    """

    def gather_and_step(state, data, indices, weights, rng):
        batch = {name: values[indices] for name, values in data.items()}
        batch["weight"] = weights
        return step_fn(state, batch, rng)

    return jax.pmap(gather_and_step, axis_name=AXIS, in_axes=(0, 0, 0, 0, None),
                    donate_argnums=(0,))


def replicate(tree: PyTree) -> PyTree:
    """Copies every leaf to all local devices, stacked on a leading device axis (for pmap)."""
    # Via host copies: leaves that share a buffer (e.g. `extra` = params) must not alias, since
    # the pmapped step donates the state. The axis name matches pmap outputs' sharding, so the
    # second step does not retrace.
    return flax.jax_utils.replicate(jax.device_get(tree), axis_name=AXIS)


def unreplicate(tree: PyTree) -> PyTree:
    """Device 0's copy, placed plainly on that device (no pmap mesh in its type, so jitted code
    fed it and fresh arrays does not retrace)."""
    device = jax.local_devices()[0]
    return jax.tree.map(lambda x: jax.device_put(x[0], device), tree)


def _reduce_epoch_metrics(step_metrics: list[dict]) -> dict[str, float]:
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics))
    stacked = jax.tree.map(lambda x: np.asarray(x)[:, 0], stacked)  # psum-ed: device 0 has all
    counts = stacked.pop("num_examples")
    out = {name: float(np.sum(values * counts) / max(np.sum(counts), 1.0))
           for name, values in stacked.items()}
    out["num_examples"] = float(np.sum(counts))
    out["finite"] = bool(np.all(np.isfinite(stacked["loss"])))
    return out


def run_epoch(p_step: Callable, state: TrainState, data: dict, batches: tuple[np.ndarray, ...],
              rng: jax.Array, progress: bool = True, desc: str = "") -> tuple[TrainState, dict]:
    """Runs one epoch of a pmapped step on replicated `state`/`data`; syncs once, at the end."""
    indices, weights = batches
    step_metrics = []
    iterator = range(indices.shape[0])
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, leave=False, mininterval=2.0)
    for s in iterator:
        state, metrics = p_step(state, data, indices[s], weights[s], rng)
        step_metrics.append(metrics)
    return state, _reduce_epoch_metrics(step_metrics)


def append_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in records)


def fit(
    state: TrainState,
    *,
    train_step: Callable,
    data: dict[str, np.ndarray],
    train_indices: np.ndarray,
    batch_size: int,
    num_epochs: int,
    seed: int,
    workdir: str | None = None,
    eval_fn: Callable[[TrainState], dict] | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint_every: int = 1,
) -> tuple[TrainState, list[dict]]:
    """Trains for `num_epochs` epochs with data parallelism over all local devices.

    With a `workdir`, saves a checkpoint every `checkpoint_every` epochs (and after the last)
    under `workdir/checkpoints` and then appends the saved epochs' lines to
    `workdir/metrics.jsonl` (so the log never holds an epoch that a resume re-runs); re-running
    on the same workdir resumes from the newest readable checkpoint and (same seed) ends with the
    same parameters as an uninterrupted run, because each epoch's shuffle and keys derive from
    (seed, epoch) alone.

    Args:
      state: the initial (unreplicated) state.
      train_step: a step from `make_train_step(axis_name=AXIS, ...)`.
      data: per-example arrays (at least "image" uint8 and "label" int32), indexed by
        `train_indices`; copied to every device once.
      Other args: as named.

    Returns:
      (final state, list of per-epoch metric dicts).

    Raises:
      TrainingDivergedError: the loss became non-finite; the last good checkpoint is kept.
      ValueError: `checkpoint_every` < 1.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 epoch, got {checkpoint_every}")
    checkpointer = None
    start_epoch, history = 0, []
    if workdir is not None:
        from salun_jax.checkpoint import Checkpointer

        os.makedirs(workdir, exist_ok=True)
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            state, meta, last_epoch = restored
            start_epoch, history = last_epoch + 1, list(meta.get("history", []))
            logging.info("resuming %s from epoch %d in %s", desc, start_epoch, workdir)
    if start_epoch >= num_epochs:
        if checkpointer is not None:
            checkpointer.close()
        return state, history
    num_devices = jax.local_device_count()
    p_step = parallel_step(train_step)
    state_r = replicate(state)
    data_r = replicate({k: np.asarray(v) for k, v in data.items()})
    key = jax.random.key(seed)
    saved, unsaved = start_epoch, []  # epochs in the newest checkpoint; records since then
    try:
        for epoch in range(start_epoch, num_epochs):
            start = time.perf_counter()
            batches = epoch_batches(train_indices, batch_size,
                                    np.random.default_rng([seed, epoch]), num_devices)
            state_r, metrics = run_epoch(p_step, state_r, data_r, batches,
                                         jax.random.fold_in(key, epoch), progress,
                                         f"{desc} {epoch + 1}/{num_epochs}")
            seconds = time.perf_counter() - start
            if not metrics.pop("finite"):
                raise TrainingDivergedError(
                    f"{desc}: non-finite loss in epoch {epoch + 1}; stopped. "
                    + (f"The last good checkpoint (epoch {saved}) is kept in {workdir}."
                       if checkpointer and saved else
                       "Lower the learning rate or check the data."))
            record = {"phase": desc, "epoch": epoch + 1, "seconds": seconds,
                      "images_per_s": metrics["num_examples"] / seconds, **metrics}
            if eval_fn is not None:
                record.update(eval_fn(unreplicate(state_r)))
            history.append(record)
            unsaved.append(record)
            logging.info("%s", json.dumps(record, sort_keys=True))
            if checkpointer is not None and ((epoch + 1) % checkpoint_every == 0
                                             or epoch + 1 == num_epochs):
                checkpointer.save(epoch, unreplicate(state_r), {"history": history})
                append_jsonl(os.path.join(workdir, "metrics.jsonl"), unsaved)
                saved, unsaved = epoch + 1, []
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return unreplicate(state_r), history


def make_predict_fn(apply_fn: Callable, return_features: bool = False) -> Callable:
    """Jitted eval-mode forward on uint8 images: (variables, images) -> logits [, features]."""

    @jax.jit
    def predict_fn(variables, images):
        return apply_fn(variables, to_float(images), train=False,
                        **({"return_features": True} if return_features else {}))

    return predict_fn


def predict(predict_fn: Callable, variables: PyTree, images: np.ndarray,
            batch_size: int = 1000) -> Any:
    """Runs `predict_fn` over `images` in fixed-size batches (last one padded: one compile)."""
    n = len(images)
    if n == 0:
        raise ValueError("predict got no images")
    outputs = []
    for start in range(0, n, batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        valid = len(chunk)
        if valid < batch_size and n > batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, 0)])
        outputs.append(jax.tree.map(lambda x, v=valid: x[:v], predict_fn(variables, chunk)))
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *outputs)


def accuracy(predict_fn: Callable, variables: PyTree, images: np.ndarray,
             labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    logits = predict(predict_fn, variables, images, batch_size)
    return float(100.0 * np.mean(np.argmax(logits, -1) == np.asarray(labels)))




@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of (re)training a classifier from scratch (reference-salun.md §5.3)."""

    model: str = "resnet18"
    width: float = 1.0
    epochs: int = 182
    batch_size: int = 256
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (91, 136)
    gamma: float = 0.1
    crop_padding: int = 4
    flip: bool = True
    seed: int = 0


def train_classifier(images: np.ndarray, labels: np.ndarray, train_indices: np.ndarray,
                     model: nn.Module, config: TrainConfig, workdir: str | None = None,
                     eval_fn: Callable[[TrainState], dict] | None = None, progress: bool = True,
                     desc: str = "train") -> tuple[TrainState, list[dict]]:
    """Trains `model` from a fresh init on `images[train_indices]` with SGD + multi-step LR.

    Resumes from `workdir` if it holds checkpoints of this run.
    """
    steps_per_epoch = math.ceil(len(train_indices) / config.batch_size)
    schedule = optim_lib.multistep_schedule(config.learning_rate, config.milestones, config.gamma,
                                            steps_per_epoch)
    tx = optim_lib.make_sgd(schedule, config.momentum, config.weight_decay)
    state = create_train_state(model, jax.random.key(config.seed), images.shape[1:], tx)
    step = make_train_step(augment=config.crop_padding > 0 or config.flip,
                           crop_padding=config.crop_padding, flip=config.flip, axis_name=AXIS)
    return fit(state, train_step=step, data={"image": images, "label": labels},
               train_indices=train_indices, batch_size=config.batch_size,
               num_epochs=config.epochs, seed=config.seed, workdir=workdir, eval_fn=eval_fn,
               progress=progress, desc=desc)
