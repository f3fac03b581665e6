"""Tests for text-to-image unlearning (salun_jax.unlearn.sd and the SD losses): ESD's target,
FMN's attention loss on constructed maps, the trainable sets, the hard SalUn-SD mask, ESD-x and
FMN on a one-level SD UNet, and the registry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from salun_jax import saliency
from salun_jax.diffusion.schedule import scaled_linear_schedule
from salun_jax.losses import (
    attention_resteering_loss,
    esd_target,
    text_attention_loss,
    text_forget_loss,
)
from salun_jax.models.sd import CLIPTokenizer, UNet2DConditionModel, UNetConfig
from salun_jax.models.sd.layers import attention_probs
from salun_jax.step import TrainState
from salun_jax.unlearn import METHODS, get_method, unlearn
from salun_jax.unlearn.sd import (
    SDTask,
    SDUnlearnConfig,
    concept_positions,
    sd_esd,
    sd_fmn,
    sd_random_label,
    sd_salun,
    trainable_fraction,
    trainable_params,
)


@pytest.fixture(scope="module")
def unet_and_params():
    # The SD UNet class at its smallest: one cross-attention level (down, mid, up), 4x4x2
    # inputs; compiling its steps, not running them, is what these tests cost.
    unet = UNet2DConditionModel(
        UNetConfig(
            sample_size=4,
            in_channels=2,
            out_channels=2,
            block_out_channels=(8,),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
            attention_head_dim=2,
            cross_attention_dim=16,
            norm_num_groups=4,
        )
    )
    params = jax.jit(unet.init)(
        jax.random.key(0), jnp.zeros((1, 4, 4, 2)), jnp.zeros(1), jnp.zeros((1, 10, 16))
    )
    return unet, params["params"]


@pytest.fixture(scope="module")
def task(unet_and_params):
    unet, _ = unet_and_params
    rng = np.random.default_rng(0)
    tokenizer = CLIPTokenizer.from_words(["a", "photo", "of", "the", "digit"], max_length=10)
    prompts = ["", "a photo of the digit 3", "a photo of the digit 4"]
    ids = tokenizer(prompts)
    contexts = rng.normal(size=(3, 10, 16)).astype(np.float32)
    return SDTask(
        unet,
        scaled_linear_schedule(),
        contexts,
        ids,
        forget_images=rng.normal(size=(6, 4, 4, 2)).astype(np.float32),
        forget_prompt=np.ones(6, np.int32),
        pseudo_prompt=np.full(6, 2, np.int32),
        retain_images=rng.normal(size=(6, 4, 4, 2)).astype(np.float32),
        retain_prompt=np.full(6, 2, np.int32),
        concept_token_ids=tuple(tokenizer.encode("3")),
        eos_token_id=tokenizer.eos_id,
    )


def _state(unet, params):
    return TrainState.create(apply_fn=unet.apply, params=params, tx=optax.identity())


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_esd_target_on_constructed_eps():
    eps_null = jnp.array([1.0, -2.0, 0.5])
    eps_cond = jnp.array([3.0, -2.0, 0.0])
    # eps_null - eta (eps_cond - eps_null), eta = 2: [1 - 4, -2 - 0, 0.5 + 1]
    np.testing.assert_allclose(esd_target(eps_null, eps_cond, 2.0), [-3.0, -2.0, 1.5])
    np.testing.assert_allclose(esd_target(eps_null, eps_cond, 0.0), eps_null)


def test_attention_resteering_loss_on_constructed_maps():
    # Two modules, B = 2, 1 head, 2 queries, 3 tokens.
    a = jnp.array([[[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]], [[[1.0, 0.0, 0.0], [0.2, 0.2, 0.6]]]])
    b = jnp.array([[[[0.2, 0.8, 0.0]]], [[[0.3, 0.3, 0.4]]]])  # 1 query
    positions = jnp.array([[False, True, False], [True, False, True]])
    got = attention_resteering_loss([a, b], positions)
    # example 0: token 1 -> 0.25^2 + 0.6^2 + 0.8^2; example 1: tokens 0, 2.
    expected0 = np.sqrt(0.25**2 + 0.6**2 + 0.8**2)
    expected1 = np.sqrt(1.0 + 0.2**2 + 0.6**2 + 0.3**2 + 0.4**2)
    np.testing.assert_allclose(got, [expected0, expected1], rtol=1e-6)


def test_concept_positions_with_and_without_the_pooler(task):
    ids = task.token_ids
    concept = concept_positions(ids, task.concept_token_ids, task.eos_token_id, False)
    assert concept[1].sum() == 1 and not concept[0].any() and not concept[2].any()
    assert ids[1][concept[1]][0] == task.concept_token_ids[0]
    pooled = concept_positions(ids, task.concept_token_ids, task.eos_token_id, True)
    np.testing.assert_array_equal(pooled, concept | (ids == task.eos_token_id))


def test_attention_loss_reads_every_cross_attention_map(task, unet_and_params):
    unet, params = unet_and_params
    positions = jnp.asarray(concept_positions(task.token_ids, task.concept_token_ids, None, False))
    loss_fn = text_attention_loss(unet.apply, task.schedule, jnp.asarray(task.contexts), positions)
    batch = {"image": jnp.asarray(task.forget_images[:2]), "prompt": jnp.array([1, 1])}
    loss, _ = loss_fn(params, batch, jax.random.key(0), None)
    # By hand: the same noising, the maps recomputed from each attn2's q and k.
    _, variables = unet.apply(
        {"params": params},
        *_noised(task, batch, jax.random.key(0)),
        jnp.asarray(task.contexts)[batch["prompt"]],
        mutable=["intermediates"],
    )
    maps = jax.tree.leaves(variables["intermediates"])
    # Each attn2 has 5 leaves: to_q, to_k, to_v kernels (no bias), to_out_0 kernel and bias.
    num_cross = sum("attn2" in name for name in saliency.leaf_names(params)) // 5
    assert len(maps) == num_cross > 0
    for m in maps:
        np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)  # softmax over tokens
    total = sum(jnp.sum(jnp.square(m[..., positions[1]]), axis=(1, 2, 3)) for m in maps)
    np.testing.assert_allclose(loss, jnp.sqrt(total), rtol=1e-5)
    # Without the mutable collection nothing is recorded and the output is the same.
    plain = unet.apply(
        {"params": params},
        *_noised(task, batch, jax.random.key(0)),
        jnp.asarray(task.contexts)[batch["prompt"]],
    )
    assert plain.shape == (2, 4, 4, 2)
    q = jnp.ones((1, 4, 6))
    np.testing.assert_allclose(attention_probs(q, jnp.zeros((1, 3, 6)), 2), 1 / 3, rtol=1e-6)


def _noised(task, batch, rng):
    from salun_jax.losses import _sd_noising, _sd_x0

    x0_rng, noise_rng = jax.random.split(rng)
    x_t, t, _ = _sd_noising(task.schedule, _sd_x0(batch, "", x0_rng), noise_rng)
    return x_t, t


def test_trainable_sets(unet_and_params):
    _, params = unet_and_params
    names = saliency.leaf_names(params)
    for which, rule in [
        ("xattn", lambda n: "attn2" in n),
        ("xattn-kv", lambda n: "attn2/to_k" in n or "attn2/to_v" in n),
        (
            "noxattn",
            lambda n: (
                "attn2" not in n
                and not n.startswith(("time_embedding", "conv_out", "conv_norm_out"))
            ),
        ),
        ("full", lambda n: True),
    ]:
        selection = trainable_params(params, which)
        assert jax.tree.leaves(selection) == [rule(n) for n in names], which
    assert 0 < trainable_fraction(trainable_params(params, "xattn"), params) < 0.5
    with pytest.raises(ValueError, match="unknown trainable set"):
        trainable_params(params, "attn1")


def test_results_report_each_methods_trainable_share(unet_and_params):
    # results.json's trainable_fraction: SalUn its mask's, ESD and FMN their parameter sets'.
    from salun_jax.pipeline.sd import _trainable_share

    _, params = unet_and_params
    sizes = [x.size for x in jax.tree.leaves(params)]
    names = saliency.leaf_names(params)

    def share(rule):
        return sum(n for n, name in zip(sizes, names, strict=True) if rule(name)) / sum(sizes)

    esd = SDUnlearnConfig(esd_train="noxattn")  # ESD-u: all but cross-attention and the ends
    ends = ("time_embedding", "conv_out", "conv_norm_out")
    assert _trainable_share("ESD", esd, None, params) == pytest.approx(
        share(lambda n: "attn2" not in n and not n.startswith(ends))
    )
    fmn = SDUnlearnConfig(fmn_only_cross_attention=True)
    assert _trainable_share("FMN", fmn, None, params) == pytest.approx(
        share(lambda n: "attn2" in n)
    )
    assert _trainable_share("FMN", SDUnlearnConfig(), None, params) == 1.0
    mask = jax.tree.map(lambda x: jnp.zeros(x.shape, bool).at[(0,) * x.ndim].set(True), params)
    assert _trainable_share("SalUn", SDUnlearnConfig(), mask, params) == pytest.approx(
        len(sizes) / sum(sizes)
    )
    assert _trainable_share("SalUn", SDUnlearnConfig(), None, params) is None
    assert _trainable_share("RL", SDUnlearnConfig(), None, params) == 1.0


def test_salun_sd_keeps_non_salient_weights_bit_identical(task, unet_and_params):
    unet, params = unet_and_params
    # Random scores: the mask's origin does not matter here (the pipeline test builds one with
    # `sd_saliency_scores`).
    leaves, treedef = jax.tree.flatten(jax.device_get(params))
    rng = np.random.default_rng(0)
    scores = jax.tree.unflatten(treedef, [rng.random(np.shape(x)) for x in leaves])
    mask = saliency.mask_from_scores(scores, 0.5)
    config = SDUnlearnConfig(
        num_iterations=3, batch_size=2, learning_rate=1e-2, alpha=0.5, log_every=3
    )
    out = sd_salun(_state(unet, params), task, config, jax.random.key(1), mask=mask, progress=False)
    changed = salient = 0
    for old, new, m in zip(
        _leaves(params), _leaves(out.state.params), jax.tree.leaves(mask), strict=True
    ):
        np.testing.assert_array_equal(new[~m], old[~m])  # bit-identical
        changed += int(np.sum(new[m] != old[m]))
        salient += int(m.sum())
    assert changed > 0.5 * salient
    record = out.history[0]
    assert record["phase"] == "SalUn" and record["mask_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert record["loss"] == pytest.approx(
        record["forget_loss"] + 0.5 * record["retain_loss"], rel=1e-5
    )
    with pytest.raises(ValueError, match="needs a saliency mask"):
        sd_salun(_state(unet, params), task, config, jax.random.key(1))


def test_forget_loss_targets_the_pseudo_prompt(task, unet_and_params):
    unet, params = unet_and_params
    contexts = jnp.asarray(task.contexts)
    loss_fn = text_forget_loss(unet.apply, task.schedule, contexts, alpha=0.0)
    batch = {
        "image": jnp.asarray(task.forget_images[:2]),
        "prompt": jnp.array([1, 1]),
        "pseudo": jnp.array([1, 1]),  # pseudo = own prompt: the forget term vanishes
        "retain_image": jnp.asarray(task.retain_images[:2]),
        "retain_prompt": jnp.array([2, 2]),
    }
    state = _state(unet, params)
    loss, aux = loss_fn(params, batch, jax.random.key(0), state)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)
    loss, aux = loss_fn(params, {**batch, "pseudo": jnp.array([2, 2])}, jax.random.key(0), state)
    assert np.all(aux["metrics"]["forget_loss"] > 0)


def test_esd_x_trains_only_cross_attention(task, unet_and_params):
    unet, params = unet_and_params
    config = SDUnlearnConfig(
        num_iterations=2,
        batch_size=2,
        learning_rate=1e-2,
        esd_num_steps=3,
        esd_train="xattn",
        log_every=1,
    )
    out = sd_esd(_state(unet, params), task, config, jax.random.key(2), progress=False)
    selection = jax.tree.leaves(trainable_params(params, "xattn"))
    for old, new, keep in zip(_leaves(params), _leaves(out.state.params), selection, strict=True):
        if keep:
            assert np.any(new != old)
        else:
            np.testing.assert_array_equal(new, old)
    for old, frozen in zip(_leaves(params), _leaves(out.state.extra["frozen"]), strict=True):
        np.testing.assert_array_equal(old, frozen)
    assert all(0 <= r["esd_steps"] <= 2 for r in out.history)


def test_fmn_lowers_the_concept_attention(task, unet_and_params):
    unet, params = unet_and_params
    config = SDUnlearnConfig(
        num_iterations=6,
        batch_size=2,
        learning_rate=3e-2,
        grad_clip=1.0,
        weight_decay=0.01,
        fmn_use_pooler=False,
        log_every=3,
    )
    out = sd_fmn(_state(unet, params), task, config, jax.random.key(3), progress=False)
    assert out.history[-1]["loss"] < out.history[0]["loss"]
    only = SDUnlearnConfig(num_iterations=1, fmn_only_cross_attention=True)
    with pytest.raises(ValueError, match="concept's token ids"):
        sd_fmn(
            _state(unet, params),
            dataclasses.replace(task, concept_token_ids=()),
            only,
            jax.random.key(0),
        )


def test_sd_methods_are_registered(task, unet_and_params):
    unet, params = unet_and_params
    assert METHODS["sd"] == {"SalUn": sd_salun, "RL": sd_random_label, "ESD": sd_esd, "FMN": sd_fmn}
    assert get_method("FMN", "sd") is sd_fmn
    with pytest.raises(ValueError, match="needs a saliency mask"):
        unlearn("SalUn", _state(unet, params), task)  # the kind comes from the task's type
    with pytest.raises(ValueError, match="unknown esd_train"):
        SDUnlearnConfig(esd_train="esd-q")
    assert SDUnlearnConfig(epochs=2, batch_size=4).num_steps(10) == 6
