"""Tests for the diffusion losses of salun_jax.losses, against hand-written references.

The references re-derive every random draw from the key splits the docstrings document
(`denoising_loss`: rng -> (flip, loss), loss -> (noise, t, null, dropout); `diffusion_forget_loss`:
rng -> (forget, retain, pseudo), forget -> (noise, t, null, target null, dropout, target dropout),
retain -> (noise, t, null)) and compute q_sample, the pseudo classes and the reductions by hand.
"""

import functools
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from salun_jax.diffusion import linear_schedule
from salun_jax.losses import (
    antithetic_timesteps,
    denoising_loss,
    diffusion_ascent_loss,
    diffusion_forget_loss,
    diffusion_loss,
    forward_noising,
    guided_forget_loss,
    pseudo_labels,
    sample_null_mask,
    to_model_range,
)
from salun_jax.models.unet import minimal_unet
from salun_jax.step import TrainState, make_step

NUM_CLASSES = 4


def run_jit(fn, *args):
    """fn(*args), jitted and compiled at XLA's backend optimisation level 0: compiling, not
    running, is what these tiny programs cost, and level 0 halves it (the numerics are XLA's
    either way)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _key_data(key):
    return np.asarray(jax.random.key_data(key))


def _abar(schedule):
    """alpha-bar in float64 from the betas, by hand (not the schedule's own cumprod)."""
    return np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))


def _antithetic(t_rng, n, num_timesteps):
    half = np.asarray(jax.random.randint(t_rng, (n // 2 + 1,), 0, num_timesteps, jnp.int32))
    return np.concatenate([half, num_timesteps - 1 - half])[:n]


def _uint8_images(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _q_sample_np(schedule, x0, t, noise):
    abar = _abar(schedule)[t][:, None, None, None]
    return np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise


# ------------------------------------------------------------------------------------------------
# 1. The pieces.


def test_to_model_range():
    images = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
    out = to_model_range(images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out.ravel(), [-1.0, -0.6, 1.0], atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 8])
def test_antithetic_timesteps(n):
    rng = jax.random.key(n)
    t = np.asarray(antithetic_timesteps(rng, n, 10))
    assert t.shape == (n,) and t.dtype == np.int32
    assert ((0 <= t) & (t < 10)).all()
    half = n // 2 + 1
    np.testing.assert_array_equal(t[half:], 9 - t[: n - half])  # the antithetic pairs
    np.testing.assert_array_equal(t, _antithetic(rng, n, 10))


def test_sample_null_mask():
    key = jax.random.key(0)
    assert sample_null_mask(key, 100, 0.0) is None  # no mask at all, not an all-False one
    assert bool(sample_null_mask(key, 100, 1.0).all())
    mask = sample_null_mask(key, 20000, 0.1)
    assert mask.shape == (20000,) and mask.dtype == jnp.bool_
    assert 0.09 < float(mask.mean()) < 0.11
    np.testing.assert_array_equal(mask, jax.random.bernoulli(key, 0.1, (20000,)))


def test_forward_noising_closed_form():
    schedule = linear_schedule(3, 0.1, 0.3)  # abar = .9, .72, .504
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (5, 2, 2, 1)), jnp.float32)
    noise_rng, t_rng = jax.random.split(jax.random.key(4))
    x_t, t, noise = forward_noising(schedule, x0, noise_rng, t_rng)
    np.testing.assert_array_equal(noise, jax.random.normal(noise_rng, x0.shape))
    np.testing.assert_array_equal(t, _antithetic(t_rng, 5, 3))
    abar = np.array([0.9, 0.72, 0.504])[np.asarray(t)][:, None, None, None]
    expected = np.sqrt(abar) * np.asarray(x0) + np.sqrt(1 - abar) * np.asarray(noise)
    np.testing.assert_allclose(x_t, expected, rtol=1e-5, atol=1e-6)


class DiffusionLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_reductions(self):
        eps_true = jnp.zeros((2, 1, 2, 1))
        eps_pred = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(2, 1, 2, 1)
        # squares [1, 4] and [9, 16]: per-example sums 5 and 25.
        for reduction, expected in [("upstream", 15.0), ("mean", 7.5), ("per_example", [5, 25])]:
            fn = self.variant(functools.partial(diffusion_loss, reduction=reduction))
            chex.assert_trees_all_close(fn(eps_true, eps_pred), jnp.asarray(expected, jnp.float32))


def test_pseudo_labels_next_and_random():
    labels = jnp.arange(10, dtype=jnp.int32)
    np.testing.assert_array_equal(pseudo_labels(labels, 10, "next"), (np.arange(10) + 1) % 10)
    many = np.tile(np.arange(10), 500)
    drawn = np.asarray(pseudo_labels(jnp.asarray(many), 10, "random", jax.random.key(0)))
    assert np.all(drawn != many)
    for c in range(10):  # every other class occurs
        assert set(drawn[many == c].tolist()) == set(range(10)) - {c}
    with pytest.raises(ValueError, match="rng"):
        pseudo_labels(labels, 10, "random")
    with pytest.raises(ValueError, match="unknown pseudo_class"):
        pseudo_labels(labels, 10, "previous")
    with pytest.raises(ValueError, match="at least 2 classes"):
        pseudo_labels(labels, 1)


def test_bad_loss_arguments():
    schedule = linear_schedule(10)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        denoising_loss(None, schedule, cond_drop_prob=1.5)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        diffusion_forget_loss(None, schedule, num_classes=4, alpha=1.0, cond_drop_prob=-0.1)
    with pytest.raises(ValueError, match="unknown reduction"):
        diffusion_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), reduction="max")
    with pytest.raises(ValueError, match="shape mismatch"):
        diffusion_loss(jnp.zeros((1, 2)), jnp.zeros((1, 3)))


# ------------------------------------------------------------------------------------------------
# 2. The production denoising loss (what `train_diffusion` steps on), with a fake model.


def _recording_apply(calls):
    """A fake UNet: eps = w * x_t (w = 0: eps = 0), recording what the loss passes it."""

    def apply_fn(variables, x_t, t, y, *, train, null_mask, rngs):
        calls.append(
            {"x_t": x_t, "t": t, "y": y, "train": train, "null_mask": null_mask, "rngs": rngs}
        )
        return variables["params"]["w"] * x_t

    return apply_fn


def _denoising_keys(rng):
    flip_rng, loss_rng = jax.random.split(rng)
    return (flip_rng, *jax.random.split(loss_rng, 4))  # flip, noise, t, null, dropout


@pytest.mark.parametrize("cond_drop_prob", [0.0, 0.5, 1.0])
def test_denoising_loss_of_a_zero_model_is_the_noise_energy(cond_drop_prob):
    schedule = linear_schedule(20)
    batch = {"image": _uint8_images(0, (16, 4, 4, 2)), "label": np.arange(16, dtype=np.int32) % 10}
    calls = []
    loss_fn = denoising_loss(_recording_apply(calls), schedule, cond_drop_prob=cond_drop_prob)
    rng = jax.random.key(3)
    per_example, aux = loss_fn({"w": jnp.float32(0.0)}, batch, rng, None)

    _, noise_rng, t_rng, null_rng, dropout_rng = _denoising_keys(rng)
    noise = np.asarray(jax.random.normal(noise_rng, (16, 4, 4, 2)), np.float64)
    chex.assert_shape(per_example, (16,))
    np.testing.assert_allclose(per_example, np.sum(noise**2, axis=(1, 2, 3)), rtol=1e-5)

    (call,) = calls
    assert call["train"] is True
    np.testing.assert_array_equal(call["y"], batch["label"])
    t = _antithetic(t_rng, 16, 20)
    np.testing.assert_array_equal(call["t"], t)
    x0 = batch["image"].astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(call["x_t"], _q_sample_np(schedule, x0, t, noise), atol=1e-5)
    np.testing.assert_array_equal(_key_data(call["rngs"]["dropout"]), _key_data(dropout_rng))
    null_fraction = aux["metrics"]["null_fraction"]
    if cond_drop_prob == 0:
        assert call["null_mask"] is None  # a UNet without a null class can train
        np.testing.assert_array_equal(null_fraction, np.zeros(16))
    else:
        expected = np.asarray(jax.random.bernoulli(null_rng, cond_drop_prob, (16,)))
        np.testing.assert_array_equal(call["null_mask"], expected)
        np.testing.assert_array_equal(null_fraction, expected.astype(np.float32))
        if cond_drop_prob < 1:
            assert 0 < expected.sum() < 16


@pytest.mark.parametrize("flip", [False, True])
def test_denoising_loss_flip_draws(flip):
    schedule = linear_schedule(20)
    images = np.zeros((32, 3, 3, 1), np.uint8)
    images[:, :, 0] = 255  # left column white: a flip moves it to the right
    calls = []
    loss_fn = denoising_loss(_recording_apply(calls), schedule, cond_drop_prob=0.0, flip=flip)
    rng = jax.random.key(11)
    loss_fn({"w": jnp.float32(0.0)}, {"image": images, "label": np.zeros(32, np.int32)}, rng, None)
    flip_rng, noise_rng, t_rng, _, _ = _denoising_keys(rng)
    x0 = images.astype(np.float64) / 127.5 - 1.0
    if flip:
        do_flip = np.asarray(jax.random.bernoulli(flip_rng, 0.5, (32,)))
        assert 0 < do_flip.sum() < 32
        x0 = np.where(do_flip[:, None, None, None], x0[:, :, ::-1], x0)
    noise = np.asarray(jax.random.normal(noise_rng, images.shape), np.float64)
    expected = _q_sample_np(schedule, x0, _antithetic(t_rng, 32, 20), noise)
    np.testing.assert_allclose(calls[0]["x_t"], expected, atol=1e-5)


def test_denoising_loss_reads_the_prefixed_stream():
    calls = []
    loss_fn = denoising_loss(
        _recording_apply(calls), linear_schedule(20), cond_drop_prob=0.0, prefix="retain_"
    )
    batch = {
        "retain_image": _uint8_images(1, (4, 2, 2, 1)),
        "retain_label": np.array([3, 1, 2, 0], np.int32),
    }
    per_example, _ = loss_fn({"w": jnp.float32(0.0)}, batch, jax.random.key(0), None)
    np.testing.assert_array_equal(calls[0]["y"], batch["retain_label"])
    chex.assert_shape(per_example, (4,))


def test_denoising_loss_through_the_step():
    # eps = w * x_t at w = 0: loss_i = sum noise_i^2 and d loss_i / dw = -2 sum(noise_i * x_t,i),
    # averaged over the real (weight 1) examples only; SGD(lr) moves w by -lr * grad.
    schedule = linear_schedule(20)
    weight = np.array([1.0] * 5 + [0.0] * 3, np.float32)
    batch = {
        "image": _uint8_images(2, (8, 4, 4, 1)),
        "label": np.arange(8, dtype=np.int32),
        "weight": weight,
    }
    loss_fn = denoising_loss(_recording_apply([]), schedule, cond_drop_prob=0.5)
    state = TrainState.create(apply_fn=None, params={"w": jnp.float32(0.0)}, tx=optax.sgd(0.1))
    key = jax.random.key(5)
    new_state, metrics = jax.jit(make_step(loss_fn, axis_name=None))(state, batch, key)

    _, noise_rng, t_rng, null_rng, _ = _denoising_keys(jax.random.fold_in(key, 0))  # step 0
    noise = np.asarray(jax.random.normal(noise_rng, (8, 4, 4, 1)), np.float64)
    x0 = batch["image"].astype(np.float64) / 127.5 - 1.0
    x_t = _q_sample_np(schedule, x0, _antithetic(t_rng, 8, 20), noise)
    loss = np.sum(np.sum(noise**2, axis=(1, 2, 3)) * weight) / 5
    grad = np.sum(-2 * np.sum(noise * x_t, axis=(1, 2, 3)) * weight) / 5
    null = np.asarray(jax.random.bernoulli(null_rng, 0.5, (8,)), np.float64)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], abs(grad), rtol=1e-4)
    np.testing.assert_allclose(metrics["null_fraction"], np.sum(null * weight) / 5, rtol=1e-6)
    assert float(metrics["num_examples"]) == 5.0
    np.testing.assert_allclose(new_state.params["w"], -0.1 * grad, rtol=1e-4)
    assert int(new_state.step) == 1


@pytest.mark.parametrize("cond_drop_prob", [0.0, 0.5])
def test_diffusion_ascent_loss_hand_written(cond_drop_prob):
    # Upstream `--method ga`: -L_simple(forget_i) + alpha * L_simple(retain_i), one UNet pass.
    schedule, alpha, b, shape = linear_schedule(20), 0.25, 6, (2, 2, 1)
    batch = {
        "image": _uint8_images(3, (b, *shape)),
        "label": np.zeros(b, np.int32),
        "retain_image": _uint8_images(4, (b, *shape)),
        "retain_label": np.arange(b, dtype=np.int32) % 3 + 1,
    }
    calls, w = [], 0.3
    loss, aux = diffusion_ascent_loss(
        _recording_apply(calls), schedule, alpha=alpha, cond_drop_prob=cond_drop_prob
    )({"w": jnp.float32(w)}, batch, jax.random.key(9), None)

    # rng -> (forget, retain); forget -> (noise, t, null, dropout); retain -> (noise, t, null).
    forget_rng, retain_rng = jax.random.split(jax.random.key(9))
    noise_rng, t_rng, null_rng, dropout_rng = jax.random.split(forget_rng, 4)
    r_noise_rng, r_t_rng, r_null_rng = jax.random.split(retain_rng, 3)
    abar = _abar(schedule)

    def l_simple(images, n_rng, tt_rng):
        x0 = images.astype(np.float64) / 127.5 - 1.0
        noise = np.asarray(jax.random.normal(n_rng, x0.shape), np.float64)
        t = _antithetic(tt_rng, b, 20)
        a = abar[t][:, None, None, None]
        x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
        return np.sum((noise - w * x_t) ** 2, axis=(1, 2, 3)), x_t, t

    forget, x_t, t = l_simple(batch["image"], noise_rng, t_rng)
    retain, r_x_t, r_t = l_simple(batch["retain_image"], r_noise_rng, r_t_rng)
    np.testing.assert_allclose(loss, -forget + alpha * retain, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux["metrics"]["forget_loss"], -forget, rtol=1e-4)
    np.testing.assert_allclose(aux["metrics"]["retain_loss"], retain, rtol=1e-4)

    (call,) = calls  # forget and retain through the UNet as one batch
    np.testing.assert_allclose(call["x_t"], np.concatenate([x_t, r_x_t]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(call["t"], np.concatenate([t, r_t]))
    np.testing.assert_array_equal(
        call["y"], np.concatenate([batch["label"], batch["retain_label"]])
    )
    assert call["train"]
    np.testing.assert_array_equal(_key_data(call["rngs"]["dropout"]), _key_data(dropout_rng))
    if cond_drop_prob == 0:
        assert call["null_mask"] is None
    else:
        null = [jax.random.bernoulli(k, cond_drop_prob, (b,)) for k in (null_rng, r_null_rng)]
        np.testing.assert_array_equal(call["null_mask"], np.concatenate(null))


def test_guided_forget_loss_closed_form():
    # A fake eps-model with a closed form: a x + 0.1 y for real classes, a x + 0.7 for the null.
    def fake_apply(variables, x, t, y, *, train, null_mask=None):
        assert train is False  # the mask loss runs in eval mode
        cond = jnp.where(null_mask, 0.7, 0.1 * y.astype(jnp.float32))
        return variables["params"]["a"] * x + cond[:, None, None, None]

    schedule = linear_schedule(30)
    images = _uint8_images(4, (6, 2, 2, 1))
    labels = np.array([0, 1, 2, 3, 1, 2], np.int32)
    weight = np.array([1, 1, 1, 1, 0, 0], np.float32)
    rng, w = jax.random.key(2), 2.0
    loss = guided_forget_loss(fake_apply, schedule, w)(
        {"a": jnp.float32(0.3)}, {"image": images, "label": labels, "weight": weight}, rng
    )

    noise_rng, t_rng = jax.random.split(rng)
    noise = np.asarray(jax.random.normal(noise_rng, images.shape), np.float64)
    x0 = images.astype(np.float64) / 127.5 - 1.0
    x_t = _q_sample_np(schedule, x0, _antithetic(t_rng, 6, 30), noise)
    eps_c = 0.3 * x_t + 0.1 * labels[:, None, None, None]
    eps_n = 0.3 * x_t + 0.7
    per_image = np.sum((noise - ((1 + w) * eps_c - w * eps_n)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss, np.sum(per_image * weight) / 4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. The DDPM SalUn / RL loss on a real UNet, against a two-pass reference.


def _unet(dropout):
    return minimal_unet(NUM_CLASSES, dropout=dropout)


@pytest.fixture(scope="module")
def unet_params():
    model = _unet(0.0)
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    # rbg keys: XLA:CPU compiles threefry initialisers slowly.
    return run_jit(
        lambda key: model.init(key, x, t, t, train=False)["params"], jax.random.key(0, impl="rbg")
    )


@pytest.fixture(scope="module")
def paired_batch():
    return {
        "image": _uint8_images(5, (6, 8, 8, 1)),
        "label": np.array([0, 0, 1, 2, 3, 3]),
        "retain_image": _uint8_images(6, (6, 8, 8, 1)),
        "retain_label": np.array([1, 2, 3, 1, 2, 3]),
        "weight": np.ones(6, np.float32),
    }


def reference_forget_loss(
    apply_fn, params, batch, rng, *, schedule, alpha, cond_drop_prob, pseudo_class, one_pass
):
    """SalUn Eq. 7 for a DDPM written out: returns (loss_i, forget_i, retain_i) [B].

    one_pass=False sends the forget and the retain examples through the UNet separately. That
    equals the library's single pass of 2B only without dropout: a dropout mask is drawn for the
    batch's layout, so the same key gives other masks to a batch of B than to a batch of 2B.
    """
    b, t_max = len(batch["label"]), schedule.num_timesteps
    forget_rng, retain_rng, pseudo_rng = jax.random.split(rng, 3)
    (noise_rng, t_rng, null_rng, target_null_rng, dropout_rng, target_dropout_rng) = (
        jax.random.split(forget_rng, 6)
    )
    r_noise_rng, r_t_rng, r_null_rng = jax.random.split(retain_rng, 3)
    abar = jnp.asarray(_abar(schedule), jnp.float32)

    def noised(images, noise_rng, t_rng):
        x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        noise = jax.random.normal(noise_rng, x0.shape)
        half = jax.random.randint(t_rng, (b // 2 + 1,), 0, t_max, jnp.int32)
        t = jnp.concatenate([half, t_max - 1 - half])[:b]
        a = abar[t][:, None, None, None]
        return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise, t, noise

    def null(key):
        return jax.random.bernoulli(key, cond_drop_prob, (b,)) if cond_drop_prob > 0 else None

    def eps(x, t, y, null_mask, dropout_key):
        return apply_fn(
            {"params": params},
            x,
            t,
            y,
            train=True,
            null_mask=null_mask,
            rngs={"dropout": dropout_key},
        )

    labels, r_labels = jnp.asarray(batch["label"]), jnp.asarray(batch["retain_label"])
    x_t, t, _ = noised(batch["image"], noise_rng, t_rng)
    r_x_t, r_t, r_noise = noised(batch["retain_image"], r_noise_rng, r_t_rng)
    if pseudo_class == "next":
        pseudo = (labels + 1) % NUM_CLASSES
    else:
        pseudo = (labels + jax.random.randint(pseudo_rng, (b,), 1, NUM_CLASSES)) % NUM_CLASSES
    target = jax.lax.stop_gradient(eps(x_t, t, pseudo, null(target_null_rng), target_dropout_rng))
    if one_pass:
        nulls = None if cond_drop_prob == 0 else jnp.concatenate([null(null_rng), null(r_null_rng)])
        both = eps(
            jnp.concatenate([x_t, r_x_t]),
            jnp.concatenate([t, r_t]),
            jnp.concatenate([labels, r_labels]),
            nulls,
            dropout_rng,
        )
        eps_f, eps_r = both[:b], both[b:]
    else:
        eps_f = eps(x_t, t, labels, null(null_rng), dropout_rng)
        eps_r = eps(r_x_t, r_t, r_labels, null(r_null_rng), dropout_rng)
    forget = jnp.mean(jnp.square(eps_f - target), axis=(1, 2, 3))  # per-element mean
    retain = jnp.sum(jnp.square(eps_r - r_noise), axis=(1, 2, 3))  # per-image sum
    return forget + alpha * retain, forget, retain


def _mean_loss_and_grad(loss_fn):
    """jit of params -> ((mean loss, (loss_i, forget_i, retain_i)), grads)."""

    def objective(params):
        per_example, forget, retain = loss_fn(params)
        return jnp.mean(per_example), (per_example, forget, retain)

    return jax.value_and_grad(objective, has_aux=True)


def _library_fn(apply_fn, batch, rng, **kwargs):
    """params -> (loss_i, forget_i, retain_i) of `diffusion_forget_loss`, the target pass at
    the same params (as in the step, where state.params == params)."""
    loss_fn = diffusion_forget_loss(
        apply_fn, linear_schedule(100), num_classes=NUM_CLASSES, **kwargs
    )

    def fn(params):
        per_example, aux = loss_fn(params, batch, rng, SimpleNamespace(params=params))
        return per_example, aux["metrics"]["forget_loss"], aux["metrics"]["retain_loss"]

    return fn


def test_forget_loss_one_batch_equals_two_passes_with_gradients(unet_params, paired_batch):
    rng, kwargs = jax.random.key(7), dict(alpha=0.25, cond_drop_prob=0.5, pseudo_class="next")
    apply_fn = _unet(0.0).apply  # no dropout: see reference_forget_loss
    # Compared as numpy trees: eager jnp ops on every leaf would each compile.
    (loss, values), grads = jax.device_get(
        run_jit(
            _mean_loss_and_grad(_library_fn(apply_fn, paired_batch, rng, **kwargs)), unet_params
        )
    )
    (ref_loss, ref_values), ref_grads = jax.device_get(
        run_jit(
            _mean_loss_and_grad(
                functools.partial(
                    reference_forget_loss,
                    apply_fn,
                    batch=paired_batch,
                    rng=rng,
                    schedule=linear_schedule(100),
                    one_pass=False,
                    **kwargs,
                )
            ),
            unet_params,
        )
    )
    for got, want in zip(values, ref_values, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert values[1].min() > 0 and values[2].min() > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # The target is a constant: differentiating through it would change every gradient.
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-3, atol=1e-6)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_forget_loss_random_pseudo_class_without_class_drop(unet_params, paired_batch):
    # Values only (gradients are checked above): the random pseudo class from the pseudo key,
    # and cond_drop_prob 0 (no null mask in any pass).
    rng, kwargs = jax.random.key(4), dict(alpha=2.0, cond_drop_prob=0.0, pseudo_class="random")
    apply_fn = _unet(0.0).apply
    got = run_jit(_library_fn(apply_fn, paired_batch, rng, **kwargs), unet_params)
    want = run_jit(
        functools.partial(
            reference_forget_loss,
            apply_fn,
            batch=paired_batch,
            rng=rng,
            schedule=linear_schedule(100),
            one_pass=False,
            **kwargs,
        ),
        unet_params,
    )
    for got_values, want_values in zip(got, want, strict=True):
        np.testing.assert_allclose(got_values, want_values, rtol=1e-4, atol=1e-6)


def test_forget_loss_dropout_keys(unet_params, paired_batch):
    # With dropout the layout matters, so the reference takes the library's layout (one 2B pass
    # with the dropout key, the target with its own key); a wrong key changes the masks.
    kwargs = dict(alpha=0.1, cond_drop_prob=0.5, pseudo_class="next")
    apply_fn = _unet(0.5).apply
    rng, schedule = jax.random.key(8), linear_schedule(100)
    got = run_jit(_library_fn(apply_fn, paired_batch, rng, **kwargs), unet_params)[0]
    reference = (
        jax.jit(
            lambda p, key: reference_forget_loss(
                apply_fn, p, paired_batch, key, schedule=schedule, one_pass=True, **kwargs
            )[0]
        )
        .lower(unet_params, rng)
        .compile({"xla_backend_optimization_level": 0})
    )
    np.testing.assert_allclose(got, reference(unet_params, rng), rtol=1e-4, atol=1e-6)
    assert not np.allclose(got, reference(unet_params, jax.random.key(9)), rtol=1e-3)


def test_forget_loss_through_the_step():
    # A fake linear model eps = w * x_t + 0.1 * y (+ 0.5 for the null class): the step's loss,
    # metrics and SGD update against the hand-computed forget MSE-mean and retain sum, with the
    # target from state.params (not differentiated) and the step key fold_in(key, 0).
    def fake_apply(variables, x, t, y, *, train, null_mask, rngs):
        del t, train, rngs
        cond = 0.1 * y.astype(jnp.float32)
        if null_mask is not None:
            cond = jnp.where(null_mask, 0.5, cond)
        return variables["params"]["w"] * x + cond[:, None, None, None]

    schedule, key, alpha, lr, b = linear_schedule(50), jax.random.key(1), 0.3, 0.01, 6
    batch = {
        "image": _uint8_images(7, (b, 3, 3, 1)),
        "label": np.array([0, 0, 1, 2, 3, 3]),
        "retain_image": _uint8_images(8, (b, 3, 3, 1)),
        "retain_label": np.array([1, 2, 3, 1, 2, 3]),
        "weight": np.ones(b, np.float32),
    }
    loss_fn = diffusion_forget_loss(
        fake_apply,
        schedule,
        num_classes=NUM_CLASSES,
        alpha=alpha,
        cond_drop_prob=0.5,
        pseudo_class="next",
    )
    w0 = 0.2
    state = TrainState.create(apply_fn=fake_apply, params={"w": jnp.float32(w0)}, tx=optax.sgd(lr))
    new_state, metrics = jax.jit(make_step(loss_fn, axis_name=None))(state, batch, key)

    forget_rng, retain_rng, _ = jax.random.split(jax.random.fold_in(key, 0), 3)
    noise_rng, t_rng, null_rng, target_null_rng, _, _ = jax.random.split(forget_rng, 6)
    r_noise_rng, r_t_rng, r_null_rng = jax.random.split(retain_rng, 3)

    def noised(images, noise_rng, t_rng):
        noise = np.asarray(jax.random.normal(noise_rng, images.shape), np.float64)
        x0 = images.astype(np.float64) / 127.5 - 1.0
        return _q_sample_np(schedule, x0, _antithetic(t_rng, b, 50), noise), noise

    def cond(labels, key):
        null = np.asarray(jax.random.bernoulli(key, 0.5, (b,)))
        return np.where(null, 0.5, 0.1 * labels)[:, None, None, None]

    x_t, _ = noised(batch["image"], noise_rng, t_rng)
    r_x_t, r_noise = noised(batch["retain_image"], r_noise_rng, r_t_rng)
    target = w0 * x_t + cond((batch["label"] + 1) % NUM_CLASSES, target_null_rng)
    forget_err = w0 * x_t + cond(batch["label"], null_rng) - target
    retain_err = w0 * r_x_t + cond(batch["retain_label"], r_null_rng) - r_noise
    forget = np.mean(forget_err**2, axis=(1, 2, 3))
    retain = np.sum(retain_err**2, axis=(1, 2, 3))
    # d/dw: the forget term through eps(x_t) only (the target is a constant).
    grad = np.mean(
        2 * np.mean(forget_err * x_t, axis=(1, 2, 3))
        + alpha * 2 * np.sum(retain_err * r_x_t, axis=(1, 2, 3))
    )
    np.testing.assert_allclose(metrics["loss"], np.mean(forget + alpha * retain), rtol=1e-5)
    np.testing.assert_allclose(metrics["forget_loss"], np.mean(forget), rtol=1e-4)
    np.testing.assert_allclose(metrics["retain_loss"], np.mean(retain), rtol=1e-5)
    np.testing.assert_allclose(new_state.params["w"], w0 - lr * grad, rtol=1e-5)


def test_denoising_loss_with_and_without_a_null_class():
    # Traced only (jax.eval_shape: no compilation): class-drop 0 passes no null mask, so a UNet
    # built without a null class trains; any class-drop needs the null class.
    model = _unet(0.0).clone(null_class=False)
    params = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            jnp.zeros((1, 8, 8, 1)),
            jnp.zeros(1, jnp.int32),
            jnp.zeros(1, jnp.int32),
            train=False,
        )["params"]
    )
    batch = {"image": np.zeros((2, 8, 8, 1), np.uint8), "label": np.array([0, 1], np.int32)}
    per_example, _ = jax.eval_shape(
        denoising_loss(model.apply, linear_schedule(10), cond_drop_prob=0.0),
        params,
        batch,
        jax.random.key(0),
        None,
    )
    assert per_example.shape == (2,)
    with pytest.raises(ValueError, match="null_class=False"):
        jax.eval_shape(
            denoising_loss(model.apply, linear_schedule(10), cond_drop_prob=0.1),
            params,
            batch,
            jax.random.key(0),
            None,
        )
