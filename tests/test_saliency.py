"""Saliency scores, global top-k masks, sweeps, statistics and mask files (SalUn Eq. 3; upstream
`generate_mask.py`)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax import saliency
from salun_jax.data.batches import gather_batches
from salun_jax.losses import classification_forget_loss
from salun_jax.saliency import MaskMismatchError

# jax.tree.leaves sorts dict keys, so "bn" comes before "fc" although it is written second.
# Flattened scores, in leaf order: bn/scale [5, 1, 2], then fc/kernel (row-major) [3, 1, 2, 2].
SCORES = {
    "fc": {"kernel": np.array([[3.0, 1.0], [2.0, 2.0]])},
    "bn": {"scale": np.array([5.0, 1.0, 2.0])},
}
# Flat positions by descending score, ties to the earlier leaf / element:
# 5 (bn 0), 3 (fc 0), 2 (bn 2) before 2 (fc 2) before 2 (fc 3), 1 (bn 1) before 1 (fc 1).
ORDER = [0, 3, 2, 5, 6, 1, 4]


def _flat(tree):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize(
    "fraction, ones",
    [(0.1, 0), (0.2, 1), (0.3, 2), (0.5, 3), (0.6, 4), (0.7, 4), (0.8, 5), (0.9, 6), (1.0, 7)],
)
def test_mask_marks_the_top_int_fraction_weights_with_ties_to_the_earlier(fraction, ones):
    assert ones == int(fraction * 7)
    mask = saliency.mask_from_scores(SCORES, fraction)
    chex.assert_trees_all_equal_shapes(mask, SCORES)
    assert all(x.dtype == bool for x in jax.tree.leaves(mask))
    expected = np.zeros(7, bool)
    expected[ORDER[:ones]] = True
    np.testing.assert_array_equal(_flat(mask), expected)


def test_mask_literal_at_half():
    mask = saliency.mask_from_scores(jax.tree.map(jnp.asarray, SCORES), 0.5)
    np.testing.assert_array_equal(mask["bn"]["scale"], [True, False, True])
    np.testing.assert_array_equal(mask["fc"]["kernel"], [[True, False], [False, False]])


def _tied_scores(seed=0):
    rng = np.random.default_rng(seed)
    # Few distinct values: many ties across and within leaves.
    return {
        "a": rng.integers(0, 4, (5, 3)).astype(np.float32),
        "b": [
            rng.integers(0, 4, (7,)).astype(np.float32),
            rng.integers(0, 4, (2, 2, 2)).astype(np.float32),
        ],
    }


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0])
def test_mask_has_exactly_int_fraction_ones_and_is_a_top_set(fraction):
    scores = _tied_scores()
    mask = saliency.mask_from_scores(scores, fraction)
    flat_scores, flat_mask = _flat(scores), _flat(mask)
    assert flat_mask.sum() == int(fraction * flat_scores.size)
    if 0 < flat_mask.sum() < flat_mask.size:
        assert flat_scores[flat_mask].min() >= flat_scores[~flat_mask].max()
    # Within a tied value, the chosen ones are the first in leaf order.
    for value in np.unique(flat_scores):
        chosen = flat_mask[flat_scores == value]
        assert np.all(np.diff(chosen.astype(int)) <= 0), f"tie at {value} not broken in order"


def test_mask_sweep_equals_mask_from_scores():
    scores = _tied_scores(1)
    sweep = saliency.mask_sweep(scores)
    assert list(sweep) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    for fraction, mask in sweep.items():
        chex.assert_trees_all_equal(mask, saliency.mask_from_scores(scores, fraction))
    custom = saliency.mask_sweep(scores, (0.3, 0.05))
    assert set(custom) == {0.3, 0.05}
    chex.assert_trees_all_equal(custom[0.05], saliency.mask_from_scores(scores, 0.05))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_outside_unit_interval_refused(fraction):
    with pytest.raises(ValueError, match="fraction"):
        saliency.mask_from_scores(SCORES, fraction)
    with pytest.raises(ValueError, match="fraction"):
        saliency.mask_sweep(SCORES, (0.5, fraction))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_refused(bad):
    scores = {"a": np.array([1.0, bad]), "b": np.ones(3)}
    with pytest.raises(ValueError, match="NaN or inf"):
        saliency.mask_from_scores(scores, 0.5)
    with pytest.raises(ValueError, match="NaN or inf"):
        saliency.mask_sweep(scores)


def test_mask_stats_per_leaf_fractions():
    stats = saliency.mask_stats(saliency.mask_from_scores(SCORES, 0.5))
    assert stats["ones"] == 3 and stats["size"] == 7
    assert stats["fraction"] == pytest.approx(3 / 7)
    assert stats["per_leaf"] == pytest.approx({"bn/scale": 2 / 3, "fc/kernel": 1 / 4})
    assert list(stats["per_leaf"]) == ["bn/scale", "fc/kernel"]  # leaf order
    full = saliency.mask_stats({"w": np.ones((2, 3), bool), "v": [np.zeros(4, bool)]})
    assert full["per_leaf"] == {"v/0": 0.0, "w": 1.0}
    assert full["ones"] == 6 and full["fraction"] == pytest.approx(0.6)


def test_leaf_names_follow_leaf_order():
    tree = {"z": {"kernel": 1, "bias": 2}, "a": [3, {"b": 4}]}
    assert saliency.leaf_names(tree) == ["a/0", "a/1/b", "z/bias", "z/kernel"]
    assert jax.tree.leaves(tree) == [3, 4, 2, 1]


def _params():
    return {
        "conv": {"kernel": jnp.zeros((3, 3, 1, 2))},
        "fc": {"bias": jnp.zeros(4), "kernel": jnp.zeros((2, 4))},
    }


def _mask_for(params, seed=0):
    rng = np.random.default_rng(seed)
    scores = jax.tree.map(lambda p: rng.random(p.shape), params)
    return saliency.mask_from_scores(scores, 0.5)


def test_save_load_round_trip(tmp_path):
    params = _params()
    mask = _mask_for(params)
    path = str(tmp_path / "with_0.5.npz")
    saliency.save_mask(path, mask)
    loaded = saliency.load_mask(path, params)
    chex.assert_trees_all_equal(loaded, mask)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(x.dtype == bool for x in jax.tree.leaves(loaded))
    assert list(tmp_path.iterdir()) == [tmp_path / "with_0.5.npz"]  # no temporary left


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        saliency.load_mask(str(tmp_path / "nope.npz"), _params())


def _other_params(case):
    """Params of 'another model' and the leaf path the error must name."""
    params = _params()
    if case == "missing":  # the params have a leaf the mask lacks
        return {**params, "bn": {"scale": jnp.ones(2)}}, "bn/scale"
    if case == "extra":  # the mask has leaves the params lack (fc/bias first, then fc/kernel)
        return {"conv": params["conv"]}, "fc/bias"
    if case == "shape":  # two wrong shapes: the first in leaf order is named
        return {
            "conv": {"kernel": jnp.zeros((3, 3, 1, 4))},
            "fc": {"bias": jnp.zeros(4), "kernel": jnp.zeros((4, 4))},
        }, "conv/kernel"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_load_against_another_models_params_refused(tmp_path, case):
    path = str(tmp_path / "mask.npz")
    saliency.save_mask(path, _mask_for(_params()))
    other, name = _other_params(case)
    with pytest.raises(MaskMismatchError, match=f"'{name}'"):
        saliency.load_mask(path, other)


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_check_same_structure_names_first_mismatch(case):
    mask = _mask_for(_params())
    saliency.check_same_structure(mask, _params())  # fits
    other, name = _other_params(case)
    with pytest.raises(MaskMismatchError, match=f"^scores .*'{name}'"):
        saliency.check_same_structure(mask, other, what="scores")
    assert issubclass(MaskMismatchError, ValueError)


def test_check_same_structure_names_first_extra_leaf_in_leaf_order():
    mask = {"l": [np.zeros(1, bool) for _ in range(12)]}
    params = {"l": [jnp.zeros(1), jnp.zeros(1)]}
    with pytest.raises(MaskMismatchError, match="'l/2'"):
        saliency.check_same_structure(mask, params)


# --- Gradient scores on a tiny linear model, hand-computed in numpy. ---

NUM_CLASSES = 3


def _linear_apply(variables, images, train):
    assert not train  # the mask loss runs the model in eval mode
    del train
    x = images.reshape(images.shape[0], -1)
    return x @ variables["params"]["w"] + variables["params"]["b"]


def _linear_problem():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 2, 2, 1)).astype(np.uint8)
    labels = rng.integers(0, NUM_CLASSES, 10).astype(np.int32)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, NUM_CLASSES)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=NUM_CLASSES), jnp.float32),
    }
    return images, labels, params


def _ce_grads(params, images, labels):
    """Mean-CE gradient over the given samples (float64)."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    logits = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    delta = (probs - np.eye(NUM_CLASSES)[labels]) / len(x)
    return {"w": x.T @ delta, "b": delta.sum(0)}


def _per_batch_forget_grads(params, images, labels, batch_size):
    """grad of -mean CE per batch of (unshuffled) consecutive samples; the last one is partial."""
    return [
        jax.tree.map(
            np.negative, _ce_grads(params, images[s : s + batch_size], labels[s : s + batch_size])
        )
        for s in range(0, len(images), batch_size)
    ]


def _tree_sum(trees):
    return jax.tree.map(lambda *xs: sum(xs), *trees)


class GradientSaliencyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sum_of_per_batch_means_with_a_padded_last_batch(self):
        images, labels, params = _linear_problem()
        batches = gather_batches({"image": images, "label": labels}, np.arange(10), 4)
        chex.assert_shape(batches["image"], (3, 4, 2, 2, 1))
        np.testing.assert_array_equal(batches["weight"][2], [1, 1, 0, 0])  # 2 valid, 2 padding
        loss_fn = classification_forget_loss(_linear_apply, {}, crop_padding=0, flip=False)
        per_batch = _per_batch_forget_grads(params, images, labels, 4)
        expected_signed = _tree_sum(per_batch)

        signed = self.variant(lambda p, b, r: saliency.accumulate_gradients(loss_fn, p, b, r))(
            params, batches, jax.random.key(0)
        )
        scores = self.variant(lambda p, b, r: saliency.gradient_saliency(loss_fn, p, b, r))(
            params, batches, jax.random.key(0)
        )
        chex.assert_trees_all_close(signed, expected_signed, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(
            scores, jax.tree.map(np.abs, expected_signed), rtol=1e-5, atol=1e-6
        )
        chex.assert_trees_all_equal_shapes_and_dtypes(scores, params)
        # The padded batch is a mean over its 2 valid samples, not over 4 (a sanity check that
        # the test can tell the two apart).
        wrong = _tree_sum(
            per_batch[:2]
            + [
                jax.tree.map(
                    np.negative, _ce_grads(params, batches["image"][2], batches["label"][2])
                )
            ]
        )
        assert not np.allclose(wrong["w"], expected_signed["w"], rtol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_clip_norm_clips_each_batch_before_accumulating(self):
        images, labels, params = _linear_problem()
        batches = gather_batches({"image": images, "label": labels}, np.arange(10), 4)
        loss_fn = classification_forget_loss(_linear_apply, {}, crop_padding=0, flip=False)
        per_batch = _per_batch_forget_grads(params, images, labels, 4)
        norms = [np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(t))) for t in per_batch]
        clip = float(np.median(norms))  # one batch above, one below, one at the median
        assert min(norms) < clip < max(norms)
        expected = _tree_sum(
            [
                jax.tree.map(lambda g, n=n: g * min(1.0, clip / (n + 1e-6)), t)
                for t, n in zip(per_batch, norms, strict=True)
            ]
        )
        signed = self.variant(
            lambda p, b, r: saliency.accumulate_gradients(loss_fn, p, b, r, clip_norm=clip)
        )(params, batches, jax.random.key(0))
        chex.assert_trees_all_close(signed, expected, rtol=1e-5, atol=1e-6)
        scores = self.variant(
            lambda p, b, r: saliency.gradient_saliency(loss_fn, p, b, r, clip_norm=clip)
        )(params, batches, jax.random.key(0))
        chex.assert_trees_all_close(scores, jax.tree.map(np.abs, expected), rtol=1e-5, atol=1e-6)
        unclipped = _tree_sum(per_batch)
        assert not np.allclose(expected["w"], unclipped["w"], rtol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_i_uses_fold_in_rng_i(self):
        def loss_fn(params, batch, rng):
            noise = jax.random.normal(rng, params["w"].shape)
            return jnp.sum(params["w"] * noise) * batch["scale"]

        params = {"w": jnp.zeros((2, 3))}
        batches = {"scale": jnp.array([1.0, -2.0, 0.5])}
        rng = jax.random.key(7)
        expected = sum(
            s * jax.random.normal(jax.random.fold_in(rng, i), (2, 3))
            for i, s in enumerate([1.0, -2.0, 0.5])
        )
        signed = self.variant(lambda p, b, r: saliency.accumulate_gradients(loss_fn, p, b, r))(
            params, batches, rng
        )
        chex.assert_trees_all_close(signed["w"], expected, rtol=1e-6)


def test_classification_forget_loss_is_negative_weighted_mean_ce():
    images, labels, params = _linear_problem()
    loss_fn = classification_forget_loss(_linear_apply, {}, crop_padding=0, flip=False)
    batch = {
        "image": images[:4],
        "label": labels[:4],
        "weight": np.array([1.0, 1.0, 1.0, 0.0], np.float32),
    }
    x = images[:3].reshape(3, -1) / 255.0
    logits = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.mean(log_probs[np.arange(3), labels[:3]])  # -CE
    assert float(loss_fn(params, batch, jax.random.key(0))) == pytest.approx(expected, rel=1e-5)


def test_saliency_mask_on_scores_is_finite_and_sized():
    images, labels, params = _linear_problem()
    batches = gather_batches({"image": images, "label": labels}, np.arange(10), 4)
    loss_fn = classification_forget_loss(_linear_apply, {}, crop_padding=0, flip=False)
    scores = saliency.gradient_saliency(loss_fn, params, batches, jax.random.key(0))
    chex.assert_tree_all_finite(scores)
    assert all(np.all(np.asarray(s) >= 0) for s in jax.tree.leaves(scores))
    mask = saliency.mask_from_scores(scores, 0.5)
    assert saliency.mask_stats(mask)["ones"] == int(0.5 * 15)
    saliency.check_same_structure(mask, params)


@pytest.mark.parametrize("damage", ["garbage", "npy", "truncated", "float"])
def test_load_mask_refuses_damaged_or_non_mask_files_naming_them(tmp_path, damage):
    params = _params()
    path = tmp_path / "mask.npz"
    saliency.save_mask(str(path), _mask_for(params))
    if damage == "garbage":
        path.write_bytes(b"not a mask at all")
    elif damage == "npy":
        np.save(str(tmp_path / "mask.npy"), np.ones(3))
        path = tmp_path / "mask.npy"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    else:  # a float score file under a mask's name moves every weight if applied
        np.savez(
            str(path),
            **{
                k: np.asarray(v, np.float32)
                for k, v in zip(saliency.leaf_names(params), jax.tree.leaves(params), strict=True)
            },
        )
    with pytest.raises(MaskMismatchError, match=str(path.name)):
        saliency.load_mask(str(path), params)


def test_masked_optimizer_checks_the_mask_on_first_use():
    import optax

    from salun_jax.optim import make_sgd, saliency_masked

    params = {"conv": {"kernel": jnp.ones((3, 3, 16, 32))}, "fc": {"bias": jnp.ones(4)}}
    good = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    make_sgd(0.1, mask=good).init(params)  # fits
    broadcastable = {**good, "conv": {"kernel": np.ones(32, bool)}}  # would move every weight
    with pytest.raises(MaskMismatchError, match="'conv/kernel' has shape \\(32,\\)"):
        make_sgd(0.1, mask=broadcastable).init(params)
    scores = jax.tree.map(lambda p: np.asarray(p, np.float32), params)  # a score tree
    with pytest.raises(MaskMismatchError, match="float32, not a 0/1 mask"):
        make_sgd(0.1, mask=scores).init(params)
    counts = jax.tree.map(lambda p: np.full(p.shape, 2, np.int32), params)
    with pytest.raises(MaskMismatchError, match="values other than 0 and 1"):
        saliency_masked(optax.sgd(0.1), counts).init(params)
    whole_leaf = {"conv": {"kernel": False}, "fc": {"bias": np.ones(4, np.int8)}}
    saliency_masked(optax.sgd(0.1), whole_leaf).init(params)  # a bool freezes a whole leaf
