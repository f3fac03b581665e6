"""Tests for the class-conditional DDPM UNet (salun_jax/models/unet.py)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax.models.unet import (
    NULL_CLASS_PARAM,
    Downsample,
    minimal_unet,
    paper_cifar10_unet,
    timestep_embedding,
    tiny_digits_unet,
)

# Derived by hand and by `_expected_param_count` (a per-layer count without Flax):
# DDIM-repo CIFAR-10 UNet 35,746,307 + 512 * (sum of the 22 res-block widths = 4,992) for the
# wider [temb, cemb] projection + class path 330,112.
PAPER_PARAM_COUNT = 38_632_323
TINY_PARAM_COUNT = 775_681


def _abstract_params(model, batch=1):
    s = model.image_size
    x = jnp.zeros((batch, s, s, model.out_channels))
    t = jnp.zeros((batch,), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, t, train=False))
    return variables["params"]


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _expected_param_count(
    ch, ch_mult, num_res_blocks, attn_resolutions, image_size, in_ch, num_classes, conditional=True
):
    """Counts parameters layer by layer from the upstream module definitions (no Flax)."""

    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    def dense(cin, cout):
        return cin * cout + cout

    def gn(c):
        return 2 * c

    emb = 4 * ch
    proj_in = 2 * emb if conditional else emb  # Linear(temb_ch + cemb_ch -> out)

    def res(cin, cout):
        n = gn(cin) + conv(3, cin, cout) + dense(proj_in, cout) + gn(cout) + conv(3, cout, cout)
        return n + (conv(1, cin, cout) if cin != cout else 0)

    def attn(c):
        return gn(c) + 4 * dense(c, c)

    n = dense(ch, emb) + dense(emb, emb)  # temb.dense
    if conditional:
        n += num_classes * ch + ch + dense(ch, emb) + dense(emb, emb)  # classes_emb, null, cemb
    n += conv(3, in_ch, ch)
    skips, cur, res_now = [ch], ch, image_size
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            n += res(cur, ch * mult)
            cur = ch * mult
            n += attn(cur) if res_now in attn_resolutions else 0
            skips.append(cur)
        if level != len(ch_mult) - 1:
            n += conv(3, cur, cur)
            skips.append(cur)
            res_now //= 2
    n += 2 * res(cur, cur) + attn(cur)
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            n += res(cur + skips.pop(), ch * ch_mult[level])
            cur = ch * ch_mult[level]
            n += attn(cur) if res_now in attn_resolutions else 0
        if level != 0:
            n += conv(3, cur, cur)
            res_now *= 2
    return n + gn(cur) + conv(3, cur, in_ch)


@pytest.fixture(scope="module")
def tiny():
    # The smallest UNet (one level, no blocks on the way down, the middle attention, dropout):
    # compiling its init and forward, not running them, is what these tests cost.
    model = minimal_unet()
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t = jnp.array([0, 10, 500, 999])
    y = jnp.array([0, 3, 7, 9])
    # rbg keys: XLA:CPU compiles the ~100 threefry initialisers slowly (about 2x the init time).
    init = jax.jit(lambda k: model.init(k, x, t, y, train=False))
    params = init(jax.random.key(0, impl="rbg"))["params"]
    return model, params, (x, t, y)


def test_param_count_formula_reproduces_ddim_unet():
    # The unconditional DDIM-repo CIFAR-10 UNet has 35,746,307 parameters ("35.7M").
    assert _expected_param_count(128, (1, 2, 2, 2), 2, (16,), 32, 3, 0, conditional=False) == (
        35_746_307
    )


@pytest.mark.parametrize(
    "model, expected, args",
    [
        (paper_cifar10_unet(), PAPER_PARAM_COUNT, (128, (1, 2, 2, 2), 2, (16,), 32, 3, 10)),
        (tiny_digits_unet(), TINY_PARAM_COUNT, (32, (1, 2), 1, (4,), 8, 1, 10)),
    ],
    ids=["paper", "tiny"],
)
def test_param_count(model, expected, args):
    params = _abstract_params(model)
    assert _count(params) == expected
    assert _expected_param_count(*args) == expected
    assert params[NULL_CLASS_PARAM].shape == (model.ch,)


def test_paper_output_shape():
    model = paper_cifar10_unet()
    params = _abstract_params(model)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    out = jax.eval_shape(
        lambda p, x, t: model.apply({"params": p}, x, t, t, train=False), params, x, t
    )
    assert out.shape == (1, 32, 32, 3) and out.dtype == jnp.float32


def test_tiny_forward_null_mask_and_dropout(tiny):
    model, params, (x, t, y) = tiny

    @jax.jit
    def apply(params, null_mask, dropout_key):
        variables = {"params": params}
        eval_out = model.apply(variables, x, t, y, train=False, null_mask=null_mask)
        train_out = model.apply(
            variables, x, t, y, train=True, null_mask=null_mask, rngs={"dropout": dropout_key}
        )
        return eval_out, train_out, model.apply(variables, x, t, y, train=False)

    none = jnp.zeros(4, bool)
    some = jnp.array([True, False, True, False])
    eval_a, train_a, no_mask = apply(params, none, jax.random.key(1))
    eval_b, train_b, _ = apply(params, none, jax.random.key(2))
    eval_null, _, _ = apply(params, some, jax.random.key(1))
    chex.assert_shape(eval_a, (4, 8, 8, 1))
    chex.assert_tree_all_finite((eval_a, train_a))
    # null_mask=None is the same as an all-False mask.
    chex.assert_trees_all_close(no_mask, eval_a, atol=1e-5)
    # Eval mode ignores the dropout key; train mode uses it.
    chex.assert_trees_all_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)
    # The null class changes exactly the masked examples.
    diff = np.abs(np.asarray(eval_null - eval_a)).reshape(4, -1).max(axis=1)
    assert diff[0] > 1e-4 and diff[2] > 1e-4
    np.testing.assert_allclose(diff[[1, 3]], 0.0, atol=1e-5)


def test_init_matches_pytorch_defaults(tiny):
    _, params, _ = tiny
    kernel = params["conv_in"]["kernel"]
    bound = 1.0 / math.sqrt(3 * 3 * 1)
    assert np.abs(kernel).max() <= bound
    assert np.abs(params["conv_in"]["bias"]).max() <= bound
    emb = params["class_embedding"]["embedding"]
    assert 0.7 < float(jnp.std(emb)) < 1.3  # N(0, 1)


@pytest.mark.parametrize("size", [8, 32, 5])
def test_downsample_asymmetric_padding(size):
    x = jnp.ones((1, size, size, 4))
    variables = jax.eval_shape(Downsample().init, jax.random.key(0), x)
    out = jax.eval_shape(Downsample().apply, variables, x)
    assert out.shape == (1, (size + 1 - 3) // 2 + 1, (size + 1 - 3) // 2 + 1, 4)
    if size % 2 == 0:
        assert out.shape[1] == size // 2


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(jnp.array([0, 3]), 8)  # half = 4, freq_k = 10000^(-k/3)
    freq = 10000.0 ** (-np.arange(4) / 3.0)
    expected = np.concatenate([np.sin(3 * freq), np.cos(3 * freq)])
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    np.testing.assert_allclose(emb[1], expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    model = tiny_digits_unet()
    t = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"\[B, 8, 8, C\]"):
        jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 1)), t, t, train=False)
        )
    with pytest.raises(ValueError, match="null_class=False"):
        jax.eval_shape(
            lambda: model.clone(null_class=False).init(
                jax.random.key(0),
                jnp.zeros((2, 8, 8, 1)),
                t,
                t,
                train=False,
                null_mask=jnp.zeros(2, bool),
            )
        )
    params = _abstract_params(model.clone(null_class=False))
    assert NULL_CLASS_PARAM not in params
    assert _count(params) == TINY_PARAM_COUNT - 32
