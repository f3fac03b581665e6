"""Tests for salun_jax.diffusion: the schedule, CFG and the DDIM/DDPM samplers (against NumPy
ports of upstream), and the tiny UNet trained through the production loss and step.

The losses themselves are tested in test_losses_diffusion.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from salun_jax.diffusion import (
    ddim_sample,
    ddpm_sample,
    guided_eps,
    linear_schedule,
    q_sample,
    timestep_sequence,
    to_uint8,
)
from salun_jax.losses import denoising_loss
from salun_jax.models.unet import minimal_unet
from salun_jax.step import TrainState, make_step

NULL_VALUE = 0.7


# A fake eps-model with a closed form: eps = a x + 0.1 (y - 4.5) for real classes, a x + null for
# the null class, plus 1e-4 t. Its params mimic the UNet's (class embedding + null class).
def fake_apply(variables, x, t, y, *, train, null_mask=None, rngs=None):
    del train, rngs
    p = variables["params"]
    cond = 0.1 * (y.astype(jnp.float32) - 4.5)
    if null_mask is not None:
        cond = jnp.where(null_mask, p["null_class_embedding"], cond)
    return p["a"] * x + (cond + 1e-4 * t)[:, None, None, None]


def fake_params(a=0.3, null=NULL_VALUE):
    return {
        "a": jnp.float32(a),
        "null_class_embedding": jnp.float32(null),
        "class_embedding": {"embedding": jnp.zeros((10, 1))},
    }


def np_fake_guided(x, t, y, a, w):
    eps_c = a * x + (0.1 * (y - 4.5) + 1e-4 * t)[:, None, None, None]
    eps_n = a * x + (NULL_VALUE + 1e-4 * t)[:, None, None, None]
    return (1 + w) * eps_c - w * eps_n


def _keys_like_sampler(rng, n_steps, shape):
    init_rng, loop_rng = jax.random.split(rng)
    x_init = np.asarray(jax.random.normal(init_rng, shape), np.float64)
    noises = [
        np.asarray(jax.random.normal(k, shape), np.float64)
        for k in jax.random.split(loop_rng, n_steps)
    ]
    return x_init, noises


# ----------------------------------------------------------------------------------------------
# Schedule


def test_linear_schedule_closed_form():
    s = linear_schedule()
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
    # Hand-checked: abar_0 = 0.9999; abar_1 = 0.9999 (1 - (1e-4 + 0.0199/999)).
    np.testing.assert_allclose(s.alphas_cumprod[:2], [0.9999, 0.99978009207], rtol=1e-7)
    np.testing.assert_allclose(s.alphas_cumprod[-1], 4.0358e-5, rtol=1e-3)
    assert s.num_timesteps == 1000 and s.betas.dtype == jnp.float32

    small = linear_schedule(3, 0.1, 0.3)  # betas .1 .2 .3 -> abar .9 .72 .504
    np.testing.assert_allclose(small.alphas_cumprod, [0.9, 0.72, 0.504], rtol=1e-6)


def test_q_sample_closed_form():
    s = linear_schedule(3, 0.1, 0.3)
    x0 = jnp.ones((2, 1, 1, 1))
    noise = 2 * jnp.ones((2, 1, 1, 1))
    out = q_sample(s, x0, jnp.array([0, 2]), noise)
    expected = [np.sqrt(0.9) + 2 * np.sqrt(0.1), np.sqrt(0.504) + 2 * np.sqrt(0.496)]
    np.testing.assert_allclose(out.ravel(), expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Guidance


def test_guided_eps_formula():
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    t = jnp.array([1, 50, 999])
    y = jnp.array([0, 4, 9])
    params = fake_params()
    for w in [2.0, 0.5]:
        expected = np_fake_guided(np.asarray(x), np.asarray(t), np.asarray(y), 0.3, w)
        np.testing.assert_allclose(
            guided_eps(fake_apply, params, x, t, y, w), expected, rtol=1e-5, atol=1e-6
        )
        traced = jax.jit(lambda w: guided_eps(fake_apply, params, x, t, y, w))(w)
        np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-6)

    batch_sizes = []

    def recording_apply(variables, x, t, y, **kw):
        batch_sizes.append(x.shape[0])
        return fake_apply(variables, x, t, y, **kw)

    out = guided_eps(recording_apply, params, x, t, y, 0)
    chex.assert_trees_all_close(out, fake_apply({"params": params}, x, t, y, train=False))
    guided_eps(recording_apply, params, x, t, y, 1.0)
    assert batch_sizes == [3, 6]  # w = 0: one pass of B; else one pass of 2B


# ----------------------------------------------------------------------------------------------
# Samplers


def test_timestep_sequence_matches_upstream():
    ts, ts_next = timestep_sequence(1000, 1000)
    np.testing.assert_array_equal(ts, np.arange(999, -1, -1))
    np.testing.assert_array_equal(ts_next, np.arange(998, -2, -1))
    ts, ts_next = timestep_sequence(1000, 3)  # skip 333: range(0, 1000, 333) has 4 entries
    np.testing.assert_array_equal(ts, [999, 666, 333, 0])
    np.testing.assert_array_equal(ts_next, [666, 333, 0, -1])


def _np_ddim(schedule, x, noises, labels, ts, ts_next, eta, w, a):
    """NumPy float64 port of upstream `generalized_steps_conditional`."""
    abar = np.concatenate([[1.0], np.cumprod(1 - np.asarray(schedule.betas, np.float64))])
    for i, (t, tn) in enumerate(zip(ts, ts_next, strict=True)):
        at, an = abar[t + 1], abar[tn + 1]
        et = np_fake_guided(x, np.full(len(labels), t), labels, a, w)
        x0 = (x - et * np.sqrt(1 - at)) / np.sqrt(at)
        c1 = eta * np.sqrt((1 - at / an) * (1 - an) / (1 - at))
        c2 = np.sqrt((1 - an) - c1**2)
        x = np.sqrt(an) * x0 + c1 * noises[i] + c2 * et
    return np.clip(x, -1, 1)


def _np_ddpm(schedule, x, noises, labels, ts, ts_next, w, a):
    """NumPy float64 port of upstream `ddpm_steps` (fixedlarge)."""
    abar = np.concatenate([[1.0], np.cumprod(1 - np.asarray(schedule.betas, np.float64))])
    for i, (t, tn) in enumerate(zip(ts, ts_next, strict=True)):
        at, atm1 = abar[t + 1], abar[tn + 1]
        beta_t = 1 - at / atm1
        e = np_fake_guided(x, np.full(len(labels), t), labels, a, w)
        x0 = np.clip(np.sqrt(1 / at) * x - np.sqrt(1 / at - 1) * e, -1, 1)
        mean = (np.sqrt(atm1) * beta_t * x0 + np.sqrt(1 - beta_t) * (1 - atm1) * x) / (1 - at)
        x = mean + (t != 0) * np.sqrt(beta_t) * noises[i]
    return np.clip(x, -1, 1)


@pytest.mark.parametrize("eta, w, num_steps", [(0.0, 2.0, 10), (1.0, 1.5, 10), (0.5, 0.0, 7)])
def test_ddim_matches_numpy_reference(eta, w, num_steps):
    schedule = linear_schedule(100)
    labels = np.array([0, 3, 9])
    rng = jax.random.key(7)
    ts, ts_next = timestep_sequence(100, num_steps)
    x_init, noises = _keys_like_sampler(rng, len(ts), (3, 4, 4, 2))
    out = ddim_sample(
        fake_apply,
        fake_params(),
        schedule,
        rng,
        labels,
        image_shape=(4, 4, 2),
        num_steps=num_steps,
        eta=eta,
        guidance_scale=w,
    )
    expected = _np_ddim(schedule, x_init, noises, labels, ts, ts_next, eta, w, 0.3)
    np.testing.assert_allclose(out, expected, atol=2e-4)


def test_ddpm_matches_numpy_reference():
    schedule = linear_schedule(50)
    labels = np.array([1, 8])
    rng = jax.random.key(3)
    ts, ts_next = timestep_sequence(50, 50)
    x_init, noises = _keys_like_sampler(rng, len(ts), (2, 3, 3, 1))
    out = ddpm_sample(
        fake_apply, fake_params(), schedule, rng, labels, image_shape=(3, 3, 1), guidance_scale=2.0
    )
    expected = _np_ddpm(schedule, x_init, noises, labels, ts, ts_next, 2.0, 0.3)
    np.testing.assert_allclose(out, expected, atol=2e-4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_oracle_model_recovers_data_point(sampler):
    # For data = a point mass at x0*, the exact eps is (x_t - sqrt(abar_t) x0*) / sqrt(1 - abar_t);
    # with it every step predicts x0 = x0*, and both samplers must return x0*.
    schedule = linear_schedule(100)
    target = jnp.linspace(-0.9, 0.9, 12).reshape(1, 2, 2, 3)

    def oracle(variables, x, t, y, *, train, null_mask=None):
        abar = schedule.alphas_cumprod[t][:, None, None, None]
        return (x - jnp.sqrt(abar) * target) / jnp.sqrt(1 - abar)

    kw = {"image_shape": (2, 2, 3), "guidance_scale": 0.0, "num_steps": 20}
    labels = jnp.array([0, 1])
    if sampler == "ddim":
        out = ddim_sample(oracle, {}, schedule, jax.random.key(0), labels, eta=1.0, **kw)
    else:
        out = ddpm_sample(oracle, {}, schedule, jax.random.key(0), labels, **kw)
    np.testing.assert_allclose(out, jnp.broadcast_to(target, out.shape), atol=1e-3)


def test_ddim_seed_behaviour():
    schedule = linear_schedule(100)
    labels = jnp.array([2, 5])
    kw = {"image_shape": (4, 4, 1), "num_steps": 10, "guidance_scale": 1.0}
    params = fake_params()
    det_a = ddim_sample(fake_apply, params, schedule, jax.random.key(0), labels, eta=0.0, **kw)
    det_b = ddim_sample(fake_apply, params, schedule, jax.random.key(0), labels, eta=0.0, **kw)
    chex.assert_trees_all_equal(det_a, det_b)
    sto_a = ddim_sample(fake_apply, params, schedule, jax.random.key(0), labels, eta=1.0, **kw)
    sto_b = ddim_sample(fake_apply, params, schedule, jax.random.key(1), labels, eta=1.0, **kw)
    assert not np.allclose(sto_a, sto_b)
    assert not np.allclose(sto_a, det_a)  # same x_T, eta changes the path


@pytest.mark.parametrize("sampler", [ddim_sample, ddpm_sample])
def test_samplers_do_not_retrace(sampler):
    chex.clear_trace_counter()  # the counter is keyed by the function's code, shared by params
    counted_apply = chex.assert_max_traces(
        lambda *args, **kw: fake_apply(*args, **kw), n=1
    )  # one trace per (shape, static) config
    schedule = linear_schedule(100)
    extra = {"eta": 0.3} if sampler is ddim_sample else {}
    outs = []
    for seed, w, a in [(0, 2.0, 0.3), (1, 0.5, 0.1), (2, jnp.float32(3.0), 0.2)]:
        out = sampler(
            counted_apply,
            fake_params(a=a),
            schedule,
            jax.random.key(seed),
            jnp.array([seed, 9 - seed]),
            image_shape=(4, 4, 1),
            num_steps=5,
            guidance_scale=w,
            **extra,
        )
        chex.assert_shape(out, (2, 4, 4, 1))
        chex.assert_tree_all_finite(out)
        outs.append(out)
    assert not np.allclose(outs[0], outs[1])


def test_to_uint8():
    x = jnp.array([-1.0, -2.0, 0.0, 1.0, 3.0]).reshape(1, 1, 5, 1)
    np.testing.assert_array_equal(to_uint8(x).ravel(), [0, 0, 128, 255, 255])
    y = jnp.array([-0.5, 0.0, 0.5]).reshape(1, 1, 3, 1)  # stretched to [0, 1] per image
    np.testing.assert_array_equal(to_uint8(y, per_image_minmax=True).ravel(), [0, 128, 255])
    assert to_uint8(x).dtype == jnp.uint8


# ----------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": np.array([0, 10])}, r"labels must lie in \[0, 10\).*\[10\]"),
        ({"labels": np.array([-1, 2])}, r"out-of-range values \[-1\]"),
        ({"labels": np.array([[0, 1]])}, "1-D"),
        ({"labels": np.array([0.0, 1.0])}, "integers"),
        ({"params": {"a": jnp.float32(0.3)}}, "null class"),
        ({"num_steps": 0}, r"num_steps must be in \[1, 100\]"),
        ({"num_steps": 101}, "num_steps"),
        ({"image_shape": (4, 4)}, r"image_shape must be \(H, W, C\)"),
        ({"eta": -1.0}, "eta must be a non-negative"),
    ],
)
def test_sampler_bad_inputs(kwargs, match):
    args = {
        "params": fake_params(),
        "labels": np.array([0, 1]),
        "num_steps": 5,
        "image_shape": (4, 4, 1),
        "eta": 0.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ddim_sample(
            fake_apply,
            args.pop("params"),
            linear_schedule(100),
            jax.random.key(0),
            args.pop("labels"),
            guidance_scale=2.0,
            **args,
        )


def test_no_null_class_ok_without_guidance():
    params = {"a": jnp.float32(0.3)}
    out = ddpm_sample(
        fake_apply,
        params,
        linear_schedule(20),
        jax.random.key(0),
        jnp.array([1]),
        image_shape=(2, 2, 1),
        guidance_scale=0.0,
        num_classes=3,
    )
    chex.assert_shape(out, (1, 2, 2, 1))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ddpm_sample(
            fake_apply,
            params,
            linear_schedule(20),
            jax.random.key(0),
            jnp.array([3]),
            image_shape=(2, 2, 1),
            guidance_scale=0.0,
            num_classes=3,
        )


def test_schedule_bad_inputs():
    with pytest.raises(ValueError, match="betas"):
        linear_schedule(10, 0.0, 0.02)


# ----------------------------------------------------------------------------------------------
# The real tiny UNet end to end


def compile_fast(fn, *args):
    """fn jitted for `args`, compiled at XLA's backend optimisation level 0: compiling, not
    running, is what these tiny programs cost, and level 0 halves it (the numerics are XLA's
    either way)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def tiny():
    # The smallest UNet: one level, no blocks on the way down, the middle attention, dropout.
    model = minimal_unet()
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    key = jax.random.key(0, impl="rbg")  # XLA:CPU compiles threefry initialisers slowly
    init = compile_fast(lambda k: model.init(k, x, t, t, train=False)["params"], key)
    return model, init(key)


def test_tiny_unet_fits_constant_data(tiny):
    # The production loss and step (as `train_diffusion` builds them) on one repeated image: the
    # loss of the same draws (keys fold in state.step, reset to 0) must fall by half.
    model, params = tiny
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
    image = np.round(np.linspace(0, 255, 64)).astype(np.uint8).reshape(1, 8, 8, 1)
    batch = {
        "image": np.tile(image, (16, 1, 1, 1)),
        "label": np.arange(16, dtype=np.int32) % 10,
        "weight": np.ones(16, np.float32),
    }
    key = jax.random.key(0)
    step = compile_fast(
        make_step(
            denoising_loss(model.apply, linear_schedule(), cond_drop_prob=0.1), axis_name=None
        ),
        state,
        batch,
        key,
    )
    _, first = step(state, batch, key)
    for _ in range(30):
        state, metrics = step(state, batch, key)
    chex.assert_tree_all_finite(state.params)
    assert int(state.step) == 30
    assert set(metrics) >= {"loss", "null_fraction", "grad_norm", "num_examples"}
    _, again = step(state.replace(step=jnp.zeros((), jnp.int32)), batch, key)
    assert float(again["loss"]) < 0.5 * float(first["loss"]), (first["loss"], again["loss"])


def test_tiny_unet_samplers(tiny):
    model, params = tiny
    schedule = linear_schedule()
    labels = jnp.array([0, 5, 9])
    for sample_fn, extra in [(ddim_sample, {"eta": 1.0}), (ddpm_sample, {})]:
        out = sample_fn(
            model.apply,
            params,
            schedule,
            jax.random.key(0),
            labels,
            image_shape=(8, 8, 1),
            num_steps=4,
            guidance_scale=2.0,
            **extra,
        )
        chex.assert_shape(out, (3, 8, 8, 1))
        chex.assert_tree_all_finite(out)
        assert float(jnp.abs(out).max()) <= 1.0
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ddim_sample(
            model.apply,
            params,
            schedule,
            jax.random.key(0),
            jnp.array([10]),
            image_shape=(8, 8, 1),
            num_steps=4,
        )
