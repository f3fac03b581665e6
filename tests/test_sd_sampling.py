"""Tests for the text-to-image samplers (salun_jax.diffusion.sd_sampling) and the scaled_linear
schedule: grids against diffusers' formulas, one- and two-step updates by hand, CFG, per-example
determinism, and the pmap path on two devices."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from salun_jax.diffusion import sd_sampling
from salun_jax.diffusion.schedule import make_schedule, scaled_linear_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_apply(variables, x, t, context):
    """A linear 'UNet': eps = w x + mean(context) + t / 1000 (per example)."""
    w = variables["params"]["w"]
    bias = jnp.mean(context, axis=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000.0
    return w * x + bias


PARAMS = {"w": jnp.float32(0.3)}


@pytest.fixture(scope="module")
def schedule():
    return scaled_linear_schedule()


def test_scaled_linear_schedule_is_squared_sqrt_spacing():
    s = scaled_linear_schedule(1000)
    betas = np.asarray(s.betas, np.float64)
    assert betas[0] == pytest.approx(0.00085, rel=1e-6)
    assert betas[-1] == pytest.approx(0.012, rel=1e-6)
    assert np.sqrt(betas[500]) == pytest.approx(
        np.sqrt(0.00085) + 500 / 999 * (np.sqrt(0.012) - np.sqrt(0.00085)), rel=1e-6
    )
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
    assert make_schedule("scaled_linear").num_timesteps == 1000
    with pytest.raises(ValueError, match="unknown beta schedule 'cosine'"):
        make_schedule("cosine")


def test_ddim_grid_is_leading_plus_one(schedule):
    grid = sd_sampling.make_grid(schedule, "ddim", 50)
    ts = grid.timesteps.astype(int)
    assert ts[0] == 981 and ts[-1] == 1 and np.all(np.diff(ts) == -20)
    abar = np.asarray(schedule.alphas_cumprod)
    np.testing.assert_array_equal(grid.a_t, abar[ts])
    np.testing.assert_array_equal(grid.a_next[:-1], abar[ts[1:]])
    assert grid.a_next[-1] == abar[0]  # set_alpha_to_one=False
    assert grid.init_sigma == 1.0 and np.all(grid.input_scale == 1.0)


@pytest.mark.parametrize("scheduler", ["euler", "lms"])
def test_sigma_grids_and_lms_coefficients_match_quadrature(schedule, scheduler):
    grid = sd_sampling.make_grid(schedule, scheduler, 6)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    ts = np.linspace(0, 999, 6)[::-1]
    np.testing.assert_allclose(grid.timesteps, ts, rtol=1e-6)
    sig = np.interp(ts, np.arange(1000), np.sqrt((1 - abar) / abar))
    np.testing.assert_allclose(grid.sigma, sig, rtol=1e-5)
    np.testing.assert_allclose(grid.input_scale, 1 / np.sqrt(sig**2 + 1), rtol=1e-5)
    assert grid.init_sigma == pytest.approx(sig.max())
    sigmas = np.concatenate([sig, [0.0]])
    if scheduler == "euler":
        np.testing.assert_allclose(grid.coeffs[:, 0], np.diff(sigmas), rtol=1e-5)
        return
    assert grid.coeffs.shape == (6, 4)
    for i in range(6):
        order = min(i + 1, 4)
        for k in range(4):
            if k >= order:
                assert grid.coeffs[i, k] == 0.0
                continue

            def basis(tau, i=i, k=k, order=order):
                prod = 1.0
                for j in range(order):
                    if j != k:
                        prod *= (tau - sigmas[i - j]) / (sigmas[i - k] - sigmas[i - j])
                return prod

            expected = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-8)[0]
            assert grid.coeffs[i, k] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_text_guided_eps_is_cfg_with_uncond_first():
    x = jnp.ones((2, 2, 2, 1))
    t = jnp.array([10.0, 20.0])
    context = jnp.stack([jnp.full((3, 4), 1.0), jnp.full((3, 4), 2.0)])
    uncond = jnp.full((3, 4), -1.0)
    eps_c = fake_apply({"params": PARAMS}, x, t, context)
    eps_u = fake_apply({"params": PARAMS}, x, t, jnp.broadcast_to(uncond, context.shape))
    got = sd_sampling.text_guided_eps(fake_apply, PARAMS, x, t, context, uncond, 7.5)
    np.testing.assert_allclose(got, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-6)
    one = sd_sampling.text_guided_eps(fake_apply, PARAMS, x, t, context, uncond, 1)
    np.testing.assert_allclose(one, eps_c, rtol=1e-6)


def _run(schedule, scheduler, num_steps, contexts, **kwargs):
    return sd_sampling.sample(
        fake_apply,
        PARAMS,
        schedule,
        contexts,
        jnp.zeros((3, 4)),
        jax.random.key(7),
        sample_shape=(2, 2, 1),
        scheduler=scheduler,
        num_steps=num_steps,
        guidance_scale=2.0,
        **kwargs,
    )


def _eps(x, t, c, s=2.0):
    # CFG of fake_apply with an all-zero uncond context.
    eps_c = 0.3 * x + c + t / 1000.0
    eps_u = 0.3 * x + t / 1000.0
    return eps_u + s * (eps_c - eps_u)


def test_one_ddim_step_by_hand(schedule):
    contexts = jnp.full((1, 3, 4), 0.5)
    got = _run(schedule, "ddim", 1, contexts)
    x = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(7), 0), (2, 2, 1)))
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    a_t, a_prev = abar[1], abar[0]  # N = 1: t = 0 * 1000 + 1, prev = -999 -> abar_0
    eps = _eps(x, 1.0, 0.5)
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["euler", "lms"])
def test_two_sigma_steps_by_hand(schedule, scheduler):
    contexts = jnp.full((1, 3, 4), 0.5)
    got = _run(schedule, scheduler, 2, contexts)
    grid = sd_sampling.make_grid(schedule, scheduler, 2)
    s0, s1 = (float(v) for v in grid.sigma)
    x = grid.init_sigma * np.asarray(
        jax.random.normal(jax.random.fold_in(jax.random.key(7), 0), (2, 2, 1)), np.float64
    )
    d0 = _eps(x / np.sqrt(s0**2 + 1), 999.0, 0.5)
    x = x + (s1 - s0) * d0  # first step: order 1 for both
    d1 = _eps(x / np.sqrt(s1**2 + 1), 0.0, 0.5)
    if scheduler == "euler":
        x = x + (0.0 - s1) * d1
    else:  # order 2: integrals of the linear Lagrange basis through (s1, s0) over [s1, 0]
        c_new = integrate.quad(lambda u: (u - s0) / (s1 - s0), s1, 0.0)[0]
        c_old = integrate.quad(lambda u: (u - s1) / (s0 - s1), s1, 0.0)[0]
        x = x + c_new * d1 + c_old * d0
    np.testing.assert_allclose(got[0], x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "lms"])
def test_samples_are_per_example_deterministic(schedule, scheduler):
    contexts = jnp.stack([jnp.full((3, 4), v) for v in (0.1, 0.2, 0.3)])
    a = _run(schedule, scheduler, 4, contexts, batch_size=2, eta=1.0)
    b = _run(schedule, scheduler, 4, contexts[:2], batch_size=8, eta=1.0)
    c = _run(schedule, scheduler, 4, contexts, batch_size=2, eta=1.0)
    assert a.shape == (3, 2, 2, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a[:2], b)  # independent of chunking
    assert not np.allclose(a[0], a[1])


def test_decode_fn_and_bad_inputs(schedule):
    contexts = jnp.full((2, 3, 4), 0.5)
    decoded = _run(schedule, "ddim", 2, contexts, decode_fn=lambda x: jnp.tanh(x) * 0 + 1)
    np.testing.assert_array_equal(decoded, np.ones((2, 2, 2, 1), np.float32))
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'"):
        _run(schedule, "pndm", 2, contexts)
    with pytest.raises(ValueError, match="num_steps must be in"):
        _run(schedule, "ddim", 0, contexts)
    with pytest.raises(ValueError, match="contexts must be"):
        _run(schedule, "ddim", 2, contexts[:0])


def test_sd_unet_samples_batched_over_prompts():
    from salun_jax.models.sd import load_unet

    unet, params = load_unet(os.path.join(REPO, "tests", "fixtures", "sd_tiny", "unet"))
    contexts = jax.random.normal(jax.random.key(0), (3, 5, 16))
    out = sd_sampling.sample(
        unet.apply,
        params,
        scaled_linear_schedule(),
        contexts,
        jnp.zeros((5, 16)),
        jax.random.key(1),
        sample_shape=(8, 8, 4),
        num_steps=2,
        batch_size=2,
    )
    assert out.shape == (3, 8, 8, 4) and np.all(np.isfinite(out))


_TWO_DEVICES = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    sys_path = {repo!r}
    import sys; sys.path.insert(0, sys_path); sys.path.insert(0, os.path.join(sys_path, "tests"))
    from test_sd_sampling import fake_apply, PARAMS
    from salun_jax.diffusion import sd_sampling
    from salun_jax.diffusion.schedule import scaled_linear_schedule
    assert jax.local_device_count() == 2
    contexts = jnp.stack([jnp.full((3, 4), v) for v in (0.1, 0.2, 0.3)])
    out = sd_sampling.sample(fake_apply, PARAMS, scaled_linear_schedule(), contexts,
        jnp.zeros((3, 4)), jax.random.key(7), sample_shape=(2, 2, 1), num_steps=4, eta=1.0,
        guidance_scale=2.0, batch_size=1)
    np.save({path!r}, out)
    """
)


def test_two_devices_give_the_one_device_samples(schedule, tmp_path):
    # pmap without collectives: no all-reduce, so no rendezvous deadlock to guard against.
    path = str(tmp_path / "two.npy")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    script = _TWO_DEVICES.format(repo=REPO, path=path)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    contexts = jnp.stack([jnp.full((3, 4), v) for v in (0.1, 0.2, 0.3)])
    one = _run(schedule, "ddim", 4, contexts, eta=1.0, batch_size=1)
    np.testing.assert_allclose(np.load(path), one, rtol=1e-6, atol=1e-6)
