"""Optimizers: PyTorch-style SGD, the multi-step schedule and the saliency-mask transform
(upstream `unlearn/impl.py`, PR #33, issue #32)."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from salun_jax import optim

NUM_STEPS = 50


def test_docstring_examples_run():
    result = doctest.testmod(optim, verbose=False)
    assert result.attempted >= 1 and result.failed == 0


def _params_mask_grads(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2)), jnp.float32)},
        "fc": {
            "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
            "kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
        },
    }
    mask = jax.tree.map(lambda p: rng.random(p.shape) < 0.5, params)
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(NUM_STEPS, *p.shape)), jnp.float32), params
    )
    return params, mask, grads


def _run(tx, params, grads):
    """NUM_STEPS updates with the step-th slice of `grads`; returns the params after each step."""

    def step(carry, g):
        params, state = carry
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params

    _, trajectory = jax.jit(lambda p, g: jax.lax.scan(step, (p, tx.init(p)), g))(params, grads)
    return trajectory


def _select(tree, mask, keep):
    """Coordinates where mask == keep, flattened over the trajectory (leading axis kept)."""
    return jax.tree.map(lambda x, m: np.asarray(x)[..., m == keep], tree, mask)


OPTIMIZERS = {
    "sgd": lambda mask, mode: optim.make_sgd(
        0.05, momentum=0.9, weight_decay=0.05, mask=mask, mask_mode=mode
    ),
    "adam": lambda mask, mode: optim.make_adam(0.05, clip_norm=1.0, mask=mask, mask_mode=mode),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_hard_mode_keeps_masked_coordinates_bit_identical(name):
    params, mask, grads = _params_mask_grads()
    trajectory = _run(OPTIMIZERS[name](mask, "hard"), params, grads)
    frozen_before = _select(params, mask, False)
    for leaf_before, leaf_after in zip(
        jax.tree.leaves(frozen_before),
        jax.tree.leaves(_select(trajectory, mask, False)),
        strict=True,
    ):
        for t in range(NUM_STEPS):
            np.testing.assert_array_equal(leaf_after[t], leaf_before)  # bit-identical
    moved = _select(trajectory, mask, True)
    for leaf_before, leaf_after in zip(
        jax.tree.leaves(_select(params, mask, True)), jax.tree.leaves(moved), strict=True
    ):
        assert np.all(leaf_after[-1] != leaf_before)
    chex.assert_tree_all_finite(trajectory)


def test_paper_mode_equals_sgd_with_decay_on_a_masked_gradient():
    params, mask, grads = _params_mask_grads(1)
    lr, momentum, wd = 0.05, 0.9, 0.05
    trajectory = _run(optim.make_sgd(lr, momentum, wd, mask=mask, mask_mode="paper"), params, grads)
    # Upstream at paper time: grad *= mask, then torch SGD with coupled weight decay.
    reference_tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum))
    masked_grads = jax.tree.map(lambda g, m: g * m, grads, mask)
    reference = _run(reference_tx, params, masked_grads)
    chex.assert_trees_all_close(trajectory, reference, rtol=1e-6, atol=1e-7)
    # The non-salient weights still move (weight decay and momentum), by shrinking towards 0.
    before = _select(params, mask, False)
    after = _select(trajectory, mask, False)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert np.all(a[-1] != b)
        assert np.all(np.abs(a[-1]) < np.abs(b))


def test_paper_mode_with_adam_and_no_decay_is_exact():
    # Adam has no weight decay: a zero gradient leaves zero moments, hence zero updates.
    params, mask, grads = _params_mask_grads(2)
    trajectory = _run(OPTIMIZERS["adam"](mask, "paper"), params, grads)
    for b, a in zip(
        jax.tree.leaves(_select(params, mask, False)),
        jax.tree.leaves(_select(trajectory, mask, False)),
        strict=True,
    ):
        np.testing.assert_array_equal(a[-1], b)


def test_adam_clips_before_masking():
    # The clipping norm includes the masked-out coordinates (upstream `saliency_unlearn`).
    params, mask, grads = _params_mask_grads(3)
    grads = jax.tree.map(
        lambda g: g * jnp.linspace(0.2, 5.0, NUM_STEPS).reshape((-1,) + (1,) * (g.ndim - 1)), grads
    )
    trajectory = _run(optim.make_adam(0.05, clip_norm=1.0, mask=mask), params, grads)
    clipped = jax.jit(jax.vmap(lambda g: optax.clip_by_global_norm(1.0).update(g, None)[0]))(grads)
    reference = _run(optax.adam(0.05), params, jax.tree.map(lambda g, m: g * m, clipped, mask))
    mask_then_clip = _run(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05)),
        params,
        jax.tree.map(lambda g, m: g * m, grads, mask),
    )
    chex.assert_trees_all_close(
        _select(trajectory, mask, True), _select(reference, mask, True), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(trajectory["fc"]["kernel"], mask_then_clip["fc"]["kernel"])


@pytest.mark.parametrize("mode", optim.MASK_MODES)
def test_whole_leaf_bool_mask_freezes_whole_leaves(mode):
    params, element_mask, grads = _params_mask_grads(4)
    mask = {"conv": {"kernel": False}, "fc": {"bias": True, "kernel": element_mask["fc"]["kernel"]}}
    trajectory = _run(optim.make_sgd(0.05, 0.9, 0.05, mask=mask, mask_mode=mode), params, grads)
    for t in range(NUM_STEPS):  # frozen whole, even under weight decay
        np.testing.assert_array_equal(trajectory["conv"]["kernel"][t], params["conv"]["kernel"])
    assert np.all(trajectory["fc"]["bias"][-1] != params["fc"]["bias"])  # trains whole
    kernel_mask = element_mask["fc"]["kernel"]
    assert np.all(
        trajectory["fc"]["kernel"][-1][kernel_mask] != params["fc"]["kernel"][kernel_mask]
    )
    if mode == "hard":
        np.testing.assert_array_equal(
            trajectory["fc"]["kernel"][-1][~kernel_mask], params["fc"]["kernel"][~kernel_mask]
        )


def test_unknown_mode_refused():
    params, mask, _ = _params_mask_grads()
    with pytest.raises(ValueError, match="unknown mask mode 'soft'"):
        optim.saliency_masked(optax.sgd(0.1), mask, mode="soft")
    with pytest.raises(ValueError, match="mask mode"):
        optim.make_sgd(0.1, mask=mask, mask_mode="HARD")
    with pytest.raises(ValueError, match="mask mode"):
        optim.make_adam(0.1, mask=mask, mask_mode="")


class SaliencyMaskedTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_one_step_literal(self):
        # momentum 0.5, wd 0.1, lr 1: d = g + 0.1 p; hard zeroes the masked coordinate, paper
        # lets its decay term through.
        params = {"w": jnp.array([1.0, 2.0, -4.0])}
        mask = {"w": jnp.array([1, 0, 1])}
        grads = {"w": jnp.array([0.5, 3.0, 1.0])}
        inner = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(1.0, momentum=0.5))
        for mode, expected in [("hard", [-0.6, 0.0, -0.6]), ("paper", [-0.6, -0.2, -0.6])]:
            tx = optim.saliency_masked(inner, mask, mode)
            updates, _ = self.variant(tx.update)(grads, tx.init(params), params)
            chex.assert_trees_all_close(updates, {"w": jnp.array(expected)}, rtol=1e-6)


def test_make_sgd_matches_pytorch_on_two_steps():
    # torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01), computed by hand:
    # step 1: d = [0.5, 0.5] + 0.01 [1, -2] = [0.51, 0.48]; buf = d; p = [0.949, -2.048]
    # step 2: d = [-1, 0.25] + 0.01 p = [-0.99051, 0.22952]; buf = 0.9 buf + d
    #         = [-0.53151, 0.66152]; p = [1.002151, -2.114152]
    tx = optim.make_sgd(0.1, momentum=0.9, weight_decay=0.01)
    params = jnp.array([1.0, -2.0])
    state = tx.init(params)
    expected = [[0.949, -2.048], [1.002151, -2.114152]]
    for g, want in zip([[0.5, 0.5], [-1.0, 0.25]], expected, strict=True):
        updates, state = tx.update(jnp.array(g), state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params, want, rtol=1e-6)


def test_make_sgd_without_momentum():
    tx = optim.make_sgd(0.5, momentum=0.0, weight_decay=0.1)
    params = jnp.array([2.0])
    state = tx.init(params)
    for _ in range(2):  # p -= 0.5 (1 + 0.1 p): 2 -> 1.4 -> 0.83
        updates, state = tx.update(jnp.array([1.0]), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, [0.83], rtol=1e-6)


def test_multistep_schedule_at_epoch_boundaries():
    # 3 steps per epoch, milestones at epochs 2 and 4: epochs 0-1 lr, 2-3 lr/10, 4+ lr/100.
    schedule = optim.multistep_schedule(0.1, (2, 4), 0.1, steps_per_epoch=3)
    expected = {0: 0.1, 2: 0.1, 5: 0.1, 6: 0.01, 11: 0.01, 12: 0.001, 100: 0.001}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step
    constant = optim.multistep_schedule(0.01, (91, 136), 0.1, steps_per_epoch=10)
    assert float(constant(909)) == pytest.approx(0.01) and float(constant(910)) == pytest.approx(
        0.001
    )
    assert float(optim.multistep_schedule(0.3, (), 0.1, 5)(10**6)) == pytest.approx(0.3)


def test_make_sgd_follows_the_schedule():
    schedule = optim.multistep_schedule(1.0, (1,), 0.5, steps_per_epoch=2)
    tx = optim.make_sgd(schedule, momentum=0.0, weight_decay=0.0)
    params, state, seen = jnp.zeros(1), None, []
    state = tx.init(params)
    for _ in range(4):
        updates, state = tx.update(jnp.ones(1), state, params)
        seen.append(-float(updates[0]))
    assert seen == pytest.approx([1.0, 1.0, 0.5, 0.5])


@pytest.mark.parametrize("milestones, epoch, factor", [((0,), 0, 0.1), ((2, 2), 2, 0.01)])
def test_multistep_schedule_counts_every_milestone(milestones, epoch, factor):
    schedule = optim.multistep_schedule(1.0, milestones, 0.1, steps_per_epoch=4)
    assert float(schedule(4 * epoch)) == pytest.approx(factor, rel=1e-6)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", optim.MASK_MODES)
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_multistep_sgd_equals_make_sgd_bit_for_bit(masked, mode, momentum):
    # Values in the state (inject_hyperparams, the mask in SaliencyMaskState) change no bit:
    # repeated and passed milestones included (steps 6 and 12 of 50, 3 steps per epoch).
    params, mask, grads = _params_mask_grads()
    mask = mask if masked else None
    schedule = optim.multistep_schedule(0.05, (2, 2, 4), 0.1, 3)
    old = optim.make_sgd(schedule, momentum, 5e-4, mask, mode)
    new = optim.multistep_sgd(0.05, (2, 2, 4), 0.1, 3, momentum, 5e-4, mask, mode)
    chex.assert_trees_all_equal(_run(old, params, grads), _run(new, params, grads))


def test_multistep_sgd_without_milestones_is_constant_and_has_no_empty_array():
    # Checkpoints cannot hold empty arrays: no milestone is one never reached.
    params, _, grads = _params_mask_grads()
    old = optim.make_sgd(0.05, 0.9, 5e-4)
    new = optim.multistep_sgd(0.05, (), 0.1, 3, 0.9, 5e-4)
    chex.assert_trees_all_equal(_run(old, params, grads), _run(new, params, grads))
    assert all(np.size(x) > 0 for x in jax.tree.leaves(new.init(params)))


def test_multistep_sgd_is_one_computation_for_all_values():
    # Equal (and equally hashed) whatever the values, so a TrainState holding either has one
    # tree structure; momentum on/off and mask/no mask are other computations.
    params, mask, _ = _params_mask_grads()
    a = optim.multistep_sgd(0.1, (2,), 0.1, 5)
    b = optim.multistep_sgd(0.7, (3, 9), 0.5, 2, momentum=0.5, weight_decay=0.0)
    assert a == b and hash(a) == hash(b)
    assert a != optim.multistep_sgd(0.1, (2,), 0.1, 5, momentum=0.0)
    masked = optim.multistep_sgd(0.1, (2,), 0.1, 5, mask=mask)
    other_mask = jax.tree.map(lambda m: ~m, mask)
    assert masked != a and masked == optim.multistep_sgd(0.2, (), 0.1, 5, mask=other_mask)
    assert masked != optim.multistep_sgd(0.1, (2,), 0.1, 5, mask=mask, mask_mode="paper")
    # The values are in the state: the learning rate, and the mask.
    state = masked.init(params)
    chex.assert_trees_all_equal(state.mask, mask)
    assert float(state.inner_state.hyperparams["learning_rate"]) == pytest.approx(0.1)


def test_adam_weight_decay_is_decoupled_and_inside_the_hard_mask():
    params = {"w": jnp.array([1.0, 2.0])}
    tx = optim.make_adam(0.1, clip_norm=None, mask={"w": jnp.array([1, 0])}, weight_decay=0.5)
    updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    # A zero gradient leaves Adam's term at 0; AdamW's decay is -lr * wd * p, salient weights only.
    np.testing.assert_allclose(updates["w"], [-0.05, 0.0])
