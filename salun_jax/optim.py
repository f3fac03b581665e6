"""Optimizers: SGD as in PyTorch (coupled weight decay), multi-step LR by epoch, and the
element-wise saliency-mask optax transform.

References: upstream `Classification/unlearn/impl.py` (optimizer), `generate_mask.py` and PR #33
(mask application), issue #32.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from salun_jax.saliency import check_mask
from salun_jax.types import PyTree

MASK_MODES = ("hard", "paper")


class SaliencyMaskState(NamedTuple):
    inner_state: optax.OptState
    mask: PyTree = None  # the mask, a value of the state: steps with other masks share a compile


class SharedTransform(optax.GradientTransformation):
    """A transformation whose values all live in its state (what its `init` puts there), so
    two with the same `update` function are the same computation: equality and hash follow
    `update` alone. A `TrainState` holding one then has the same tree structure whatever the
    learning rate or mask, and a compiled step serves them all (`multistep_sgd`)."""

    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, optax.GradientTransformation) and self.update == other.update

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.update)


def _is_whole_leaf(leaf) -> bool:
    return isinstance(leaf, bool | jnp.bool_) or (hasattr(leaf, "shape") and leaf.shape == ())


def saliency_masked(
    inner: optax.GradientTransformation, mask: PyTree, mode: str = "hard"
) -> optax.GradientTransformation:
    """Restricts `inner` to the coordinates where an element-wise 0/1 `mask` is 1.

    Same shape of API as `optax.masked(inner, mask)`, but the mask acts per element and masked-out
    coordinates get a zero update (optax.masked would pass their raw gradient through).

    Modes:
      - "hard" (default): the mask multiplies the incoming gradient AND the final updates of
        `inner`, so non-salient weights stay bit-identical even with weight decay and momentum
        inside `inner` (the upstream fix, PR #33).
      - "paper": the mask multiplies only the incoming gradient, before `inner`; weight decay and
        momentum inside `inner` still move the non-salient weights, as in the code behind the
        paper's tables (upstream issue #32).

    A mask leaf may also be a Python bool (whole leaf: True trains, False freezes); such leaves are
    handled with `optax.freeze`, so frozen leaves cost no element-wise multiply.

    Args:
      inner: the optimizer to restrict, e.g. `optax.chain(optax.add_decayed_weights(5e-4),
        optax.sgd(lr, momentum=0.9))`.
      mask: a pytree with the params' structure; leaves are 0/1 (or bool) arrays of each
        param's shape, or Python bools.
      mode: "hard" or "paper".

    Returns:
      An optax GradientTransformation.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(3)}
      >>> tx = saliency_masked(optax.sgd(1.0), {"w": jnp.array([1, 0, 1])})
      >>> state = tx.init(params)
      >>> updates, _ = tx.update({"w": jnp.full(3, 2.0)}, state, params)
      >>> updates["w"].tolist()
      [-2.0, 0.0, -2.0]
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; known: {', '.join(MASK_MODES)}")
    frozen = jax.tree.map(lambda m: _is_whole_leaf(m) and not bool(m), mask)
    if any(jax.tree.leaves(frozen)):
        # Whole frozen leaves: optax.freeze zeroes them after `inner`.
        inner = optax.chain(inner, optax.freeze(frozen))

    def init_fn(params):
        # The first use checks the mask against the params: structure, shapes and a 0/1 dtype
        # (a leaf of shape (C,) would broadcast over a kernel, a score tree would move all).
        check_mask(mask, params)
        return SaliencyMaskState(inner.init(params), mask)

    # The update reads the mask from the state: one function per (inner update, mode).
    return SharedTransform(init_fn, _masked_update(inner.update, mode))


def _apply_mask(mask: PyTree, tree: PyTree) -> PyTree:
    def leaf(m, u):
        return u if _is_whole_leaf(m) else jnp.where(m.astype(bool), u, 0).astype(u.dtype)

    return jax.tree.map(leaf, mask, tree)


@functools.cache
def _masked_update(inner_update, mode: str):
    def update_fn(updates, state, params=None):
        updates, inner_state = inner_update(
            _apply_mask(state.mask, updates), state.inner_state, params
        )
        if mode == "hard":
            updates = _apply_mask(state.mask, updates)
        return updates, SaliencyMaskState(inner_state, state.mask)

    return update_fn


def multistep_schedule(
    learning_rate: float, milestones: Sequence[int], gamma: float, steps_per_epoch: int
) -> optax.Schedule:
    """PyTorch MultiStepLR stepped once per epoch: lr * gamma^(number of milestones <= epoch)."""
    # Repeated milestones decay repeatedly (PyTorch counts them); milestone 0 decays from the start.
    counts = collections.Counter(int(m) for m in milestones)
    boundaries = {m * int(steps_per_epoch): gamma**count for m, count in counts.items()}
    return optax.piecewise_constant_schedule(learning_rate, boundaries)


def make_sgd(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    mask: PyTree | None = None,
    mask_mode: str = "hard",
) -> optax.GradientTransformation:
    """PyTorch-equivalent SGD: d = g + wd * p; buf = m * buf + d; p -= lr * buf.

    The order in the chain is the semantics: weight decay is added to the gradient before momentum
    (coupled, as torch.optim.SGD), and the mask (if any) wraps the whole chain (see
    `saliency_masked` for where it multiplies).
    """
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum or None)
    )
    return tx if mask is None else saliency_masked(tx, mask, mask_mode)


def make_adam(
    learning_rate: float,
    clip_norm: float | None = 1.0,
    mask: PyTree | None = None,
    mask_mode: str = "hard",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Adam with global-norm clipping first, then (optional) the mask: "clip, then mask" upstream
    (upstream `DDPM/runners/diffusion.py::saliency_unlearn`), so the clipping norm includes
    masked-out coordinates. `weight_decay` > 0 makes it AdamW (decoupled, as torch's AdamW:
    p -= lr * wd * p), inside the mask (hard mode: masked weights do not decay either)."""
    if weight_decay:
        adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if mask is not None:
        adam = saliency_masked(adam, mask, mask_mode)
    if clip_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(clip_norm), adam)


def _multistep_sgd_factory(learning_rate, momentum, weight_decay, boundaries, scales, use_momentum):
    """`make_sgd(multistep_schedule(...))` of (traced) values; `boundaries` [M] int32 steps and
    `scales` [M] the factor applied at each (gamma ** repeats), in increasing order."""

    def schedule(count):
        # optax.piecewise_constant_schedule's arithmetic, value for value.
        value = learning_rate
        for i in range(boundaries.shape[0]):
            indicator = jnp.maximum(0.0, jnp.sign(boundaries[i] - count))
            value = value * indicator + (1 - indicator) * scales[i] * value
        return value

    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum if use_momentum else None),
    )


_injected_multistep_sgd = optax.inject_hyperparams(
    _multistep_sgd_factory, static_args=("use_momentum",)
)


@functools.cache
def _shared_multistep_sgd_update(use_momentum: bool):
    # inject_hyperparams' update reads every value from the state (the ones given here only
    # shape `init`), so one update serves all values.
    empty = np.zeros(0, np.float32)
    return _injected_multistep_sgd(
        0.0, 0.0, 0.0, empty.astype(np.int32), empty, use_momentum=use_momentum
    ).update


def multistep_sgd(
    learning_rate: float,
    milestones: Sequence[int],
    gamma: float,
    steps_per_epoch: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    mask: PyTree | None = None,
    mask_mode: str = "hard",
) -> SharedTransform:
    """`make_sgd(multistep_schedule(learning_rate, milestones, gamma, steps_per_epoch), momentum,
    weight_decay, mask, mask_mode)` with every value in the optimizer state
    (`optax.inject_hyperparams`; the mask in `SaliencyMaskState`): same updates, float for float.

    Its `update` is one function per (momentum on or off, mask or none, mask mode) in a process,
    so training runs that differ only in these values (another seed, method or learning rate)
    share one compiled step; the number of distinct milestones is a shape, also shared when equal.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = multistep_sgd(0.1, (2,), 0.1, steps_per_epoch=1)
      >>> b = multistep_sgd(0.5, (3,), 0.2, steps_per_epoch=4, weight_decay=0.0)
      >>> a == b  # the same computation: a step built with one serves the other
      True
      >>> params = {"w": jnp.ones(2)}
      >>> state = a.init(params)
      >>> for _ in range(3):
      ...     updates, state = a.update({"w": jnp.zeros(2)}, state, params)
      >>> round(float(state.hyperparams["learning_rate"]), 6)  # a value of the state
      0.1
    """
    counts = collections.Counter(int(m) for m in milestones)
    boundaries = sorted((m * int(steps_per_epoch), gamma**count) for m, count in counts.items())
    # No milestone: one that is never reached, scale 1 (v * 1 + 0 * v = v exactly), since
    # checkpoints cannot hold empty arrays.
    boundaries = boundaries or [(np.iinfo(np.int32).max, 1.0)]
    use_momentum = bool(momentum)
    inner = _injected_multistep_sgd(
        learning_rate,
        momentum,
        weight_decay,
        np.array([b for b, _ in boundaries], np.int32),
        np.array([s for _, s in boundaries], np.float64),  # rounded to the params' float type
        use_momentum=use_momentum,
    )
    tx = SharedTransform(inner.init, _shared_multistep_sgd_update(use_momentum))
    return tx if mask is None else saliency_masked(tx, mask, mask_mode)
