"""Boundary unlearning (Chen et al. 2023): boundary shrink (BS) and boundary expanding (BE).

References: Chen et al., CVPR 2023; upstream `Classification/unlearn/boundary_ex.py` and
`boundary_sh.py` (BS: FGSM against the frozen original; BE: a shadow class, whose logit upstream
never removes; our default does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from salun_jax.losses import classification_loss
from salun_jax.models.resnet import torch_uniform_init
from salun_jax.step import TrainState, canonical_module
from salun_jax.unlearn.common import (
    MethodSpec,
    UnlearnConfig,
    UnlearnOutput,
    UnlearnTask,
    run_unlearning_sgd,
    sgd_method,
)


def fgsm_neighbour_labels(apply_fn, original_variables, images, labels, bound: float):
    """x_adv = clip(x + bound * sign(grad_x CE(original(x), y)), 0, 1), rounded to multiples of
    1/255; returns argmax original(x_adv): the nearest "wrong" class across the boundary."""

    def loss(x):
        logits = apply_fn(original_variables, x, train=False)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    grad = jax.grad(loss)(images)
    adversarial = jnp.clip(images + bound * jnp.sign(grad), 0.0, 1.0)
    adversarial = jnp.round(adversarial * 255.0) / 255.0
    return jnp.argmax(apply_fn(original_variables, adversarial, train=False), axis=-1)


def _neighbour_labels(rng, images, labels, batch, state):
    """BS's `label_fn`: the frozen original and the FGSM bound come from `state.extra`."""
    del rng, batch
    original = state.extra["original"]
    return jax.lax.stop_gradient(
        fgsm_neighbour_labels(state.apply_fn, original, images, labels, state.extra["bound"])
    )


def boundary_shrink_loss(config: UnlearnConfig):
    """BS's loss: CE towards the label the frozen original gives an FGSM neighbour of each
    (augmented) forget image; the original and the bound come from `state.extra`
    (`boundary_shrink_values`)."""
    return classification_loss(
        crop_padding=config.crop_padding, flip=config.flip, label_fn=_neighbour_labels
    )


def boundary_shrink_values(variables, config: UnlearnConfig) -> dict:
    """BS's `extra`: the frozen original's variables and the FGSM bound."""
    return {"original": variables, "bound": np.float32(config.boundary_bound)}


def boundary_shrink_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """BS: on D_f only, train the model to predict the label the frozen original gives an FGSM
    neighbour of each (augmented) forget image."""
    return MethodSpec(
        "BS",
        boundary_shrink_loss(config),
        (task.forget,),
        extra_fn=lambda state: boundary_shrink_values(state.variables, config),
    )


boundary_shrink = sgd_method(boundary_shrink_spec)


def extend_head(params, num_classes: int, rng: jax.Array):
    """Adds one output to the classifier head `fc` (kernel [D, K] and bias [K]); the new column
    gets PyTorch's default Linear init, the old ones are copied."""
    if "fc" not in params:
        raise ValueError("boundary expanding needs a classifier head named 'fc'")
    fc = params["fc"]
    leaves = jax.tree.leaves(fc)
    kernel_fan_in = next(x.shape[0] for x in leaves if x.ndim == 2)
    init = torch_uniform_init(kernel_fan_in)
    new = []
    for i, leaf in enumerate(leaves):
        if leaf.shape[-1] != num_classes:
            raise ValueError(f"classifier head leaf of shape {leaf.shape} is not {num_classes}-way")
        column = init(jax.random.fold_in(rng, i), (*leaf.shape[:-1], 1), leaf.dtype)
        new.append(jnp.concatenate([leaf, column], axis=-1))
    return {**params, "fc": jax.tree.unflatten(jax.tree.structure(fc), new)}


@functools.cache
def shadow_labels(shadow: int):
    """BE's `label_fn`: every example to the shadow class."""
    return lambda rng, images, labels, batch, state: jnp.full_like(labels, shadow)


def wide_head_model(task: UnlearnTask):
    """BE's model: the task's with one more output (the shadow class)."""
    return canonical_module(task.model.clone(num_classes=task.num_classes + 1))


def boundary_expanding_spec(task: UnlearnTask, config: UnlearnConfig) -> MethodSpec:
    """BE on the widened head (`wide_head_model`, `extend_head`): CE of every (augmented)
    forget image towards the shadow class."""
    loss_fn = classification_loss(
        crop_padding=config.crop_padding, flip=config.flip, label_fn=shadow_labels(task.num_classes)
    )
    return MethodSpec(
        "BE", loss_fn, (task.forget,), mask="forbidden", mask_reason="its head changes shape"
    )


def drop_last_output(params):
    return {**params, "fc": jax.tree.map(lambda x: x[..., :-1], params["fc"])}


def boundary_expanding(
    state, task: UnlearnTask, config: UnlearnConfig, rng: jax.Array, mask=None, **run_options
) -> UnlearnOutput:
    """BE: widen the head by a shadow class, train D_f towards it, then (default) drop the shadow
    output again. `remove_shadow_logit=False` keeps the K+1-way head as upstream does; the output
    then carries the widened `model`."""
    spec = boundary_expanding_spec(task, config)
    spec.check_mask(mask)
    wide_model = wide_head_model(task)
    init_rng, rng = jax.random.split(rng)
    wide = TrainState.create(
        apply_fn=wide_model.apply,
        params=extend_head(state.params, task.num_classes, init_rng),
        batch_stats=state.batch_stats,
        tx=optax.identity(),
    )
    output = run_unlearning_sgd(wide, task, config, rng, spec, **run_options)
    if not config.remove_shadow_logit:
        return output._replace(model=wide_model)
    wide = output.state
    narrow = state.replace(params=drop_last_output(wide.params), batch_stats=wide.batch_stats)
    return output._replace(state=narrow)


boundary_expanding.spec = boundary_expanding_spec  # the population widens the heads itself
