"""Tests for DDPM training, diffusion SalUn (mask, pseudo classes, masked unlearning) and the
generation metrics (salun_jax.diffusion.training / unlearning / evaluation)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from salun_jax import saliency
from salun_jax.diffusion import linear_schedule
from salun_jax.diffusion.evaluation import (
    class_accuracies,
    classifier_frechet_distance,
    evaluate_samples,
    feature_statistics,
    frechet_distance,
    generate_samples,
    samples_per_class_labels,
    save_sample_grid,
    unlearning_accuracy,
)
from salun_jax.diffusion.training import (
    DiffusionTrainConfig,
    create_diffusion_state,
    epochs_for_iterations,
    init_unet_params,
    make_diffusion_train_step,
)
from salun_jax.diffusion.unlearning import (
    DiffusionUnlearnConfig,
    check_class,
    diffusion_forget_retain,
    diffusion_saliency_scores,
    effective_alpha,
    pseudo_labels,
    unlearn_diffusion,
)
from salun_jax.models.unet import NULL_CLASS_PARAM, UNet

NUM_CLASSES = 4


def _unet(null_class=True, ch=8):
    # One level, no residual blocks on the way down: three blocks and the middle attention in
    # all, the smallest UNet that compiles (in seconds on CPU).
    return UNet(ch=ch, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), dropout=0.1,
                num_classes=NUM_CLASSES, image_size=8, out_channels=1, num_groups=4,
                null_class=null_class)


@pytest.fixture(scope="module")
def model():
    return _unet()


@pytest.fixture(scope="module")
def params(model):
    return init_unet_params(model, jax.random.key(0, impl="rbg"))


@pytest.fixture(scope="module")
def schedule():
    return linear_schedule(100)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(24, dtype=np.int32) % NUM_CLASSES
    return images, labels


# ------------------------------------------------------------------------------------------------
# Training.


@pytest.fixture(scope="module")
def train_step(model, schedule):
    # One compilation serves both train-step tests (same shapes); more would fail the trace check.
    return jax.jit(chex.assert_max_traces(
        make_diffusion_train_step(model.apply, schedule, cond_drop_prob=0.1, flip=True), n=1))


@pytest.fixture(scope="module")
def train_state(model, params):
    # Shared: the optimizer is a static field of the state, so a new one would retrace the step.
    config = DiffusionTrainConfig(learning_rate=3e-3, ema_decay=0.9, flip=False)
    return create_diffusion_state(model, None, config, params=params)


def _batch(seed, weight=None):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)),
            "label": jnp.arange(8, dtype=jnp.int32) % NUM_CLASSES,
            "weight": jnp.ones(8, jnp.float32) if weight is None else jnp.asarray(weight)}


def test_train_step_does_not_retrace_and_loss_decreases(train_step, train_state):
    state = train_state
    batch = _batch(1)
    key = jax.random.key(2)
    state, first = train_step(state, batch, key)
    for _ in range(11):
        state, metrics = train_step(state, batch, key)
    chex.assert_tree_all_finite(state.params)
    assert int(state.step) == 12
    assert set(metrics) >= {"loss", "num_examples", "grad_norm", "null_fraction"}
    assert float(metrics["num_examples"]) == 8.0
    # The same draws as the first step (its keys fold in state.step = 0), trained weights.
    _, again = train_step(state.replace(step=jnp.zeros((), jnp.int32)), batch, key)
    assert float(again["loss"]) < 0.8 * float(first["loss"])
    # The EMA trails the params.
    assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])


def test_train_step_ignores_padded_examples(train_step, train_state):
    state = train_state
    weight = np.array([1.0] * 5 + [0.0] * 3, np.float32)
    batch = _batch(2, weight)
    other = dict(batch, image=batch["image"].at[5:].set(255 - batch["image"][5:]))
    _, m1 = train_step(state, batch, jax.random.key(3))
    _, m2 = train_step(state, other, jax.random.key(3))  # differs only where the weight is 0
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    assert float(m1["num_examples"]) == 5.0


def test_epochs_for_iterations():
    assert epochs_for_iterations(800_000, 50_000, 128) == 2047  # 391 steps per epoch
    assert epochs_for_iterations(1, 10, 64) == 1
    with pytest.raises(ValueError):
        epochs_for_iterations(0, 10, 4)


# ------------------------------------------------------------------------------------------------
# Pseudo classes, class checks, alpha.


def test_pseudo_labels_next_and_random():
    labels = jnp.arange(10, dtype=jnp.int32)
    np.testing.assert_array_equal(pseudo_labels(labels, 10, "next"), (np.arange(10) + 1) % 10)
    many = jnp.tile(labels, 500)
    drawn = np.asarray(pseudo_labels(many, 10, "random", jax.random.key(0)))
    assert np.all(drawn != np.asarray(many))
    assert drawn.min() >= 0 and drawn.max() < 10
    for c in range(10):  # every other class occurs
        assert set(drawn[np.asarray(many) == c].tolist()) == set(range(10)) - {c}
    with pytest.raises(ValueError, match="rng"):
        pseudo_labels(labels, 10, "random")
    with pytest.raises(ValueError, match="unknown pseudo_class"):
        pseudo_labels(labels, 10, "previous")


@pytest.mark.parametrize("bad", [12, -1, 10, 2.0, True])
def test_unknown_forget_class_is_rejected(bad):
    with pytest.raises(ValueError, match="forget_class"):
        check_class(bad, 10)
    with pytest.raises(ValueError, match="forget_class"):
        diffusion_forget_retain(np.arange(20) % 10, bad, 10)


def test_forget_retain_split_and_effective_alpha():
    labels = np.array([0, 1, 2, 0, 1])
    forget, retain = diffusion_forget_retain(labels, 0, 3)
    np.testing.assert_array_equal(forget, [0, 3])
    np.testing.assert_array_equal(retain, [1, 2, 4])
    assert effective_alpha(1e-3, (32, 32, 3)) == pytest.approx(3.072)
    assert effective_alpha(1e-3, (8, 8, 1)) == pytest.approx(0.064)
    with pytest.raises(ValueError, match="pseudo_class"):
        DiffusionUnlearnConfig(pseudo_class="nope")
    with pytest.raises(ValueError, match="objective"):
        DiffusionUnlearnConfig(objective="sgd")


# ------------------------------------------------------------------------------------------------
# The saliency mask.


def test_mask_has_exact_count_structure_and_per_batch_clipping(model, params, schedule, data):
    images, labels = data
    forget = labels == 1  # 6 images: one batch of 8 (2 padded)
    kwargs = dict(batch_size=8, guidance_scale=2.0)
    clipped = diffusion_saliency_scores(model.apply, params, schedule, images[forget],
                                        labels[forget], jax.random.key(5), clip_norm=1e-3,
                                        **kwargs)
    saliency.check_same_structure(clipped, params, "scores")
    # Hand check for one batch: clip(g) = g * c / (|g| + 1e-6) has norm c (as |g| >> c here).
    norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(clipped))))
    assert norm == pytest.approx(1e-3, rel=1e-3)
    mask = saliency.mask_from_scores(jax.device_get(clipped), 0.5)
    saliency.check_same_structure(mask, params)
    total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    assert saliency.mask_stats(mask)["ones"] == int(0.5 * total)
    assert all(np.asarray(x).dtype == bool for x in jax.tree.leaves(mask))
    # The most salient weights are those with the largest |score|.
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(clipped)])
    chosen = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mask)])
    assert flat[chosen].min() >= flat[~chosen].max()


def test_guidance_needs_a_null_class(params, schedule, data):
    images, labels = data
    # The params of a UNet built with null_class=False: the same tree without the null class.
    no_null = {k: v for k, v in params.items() if k != NULL_CLASS_PARAM}
    apply_fn = _unet(null_class=False).apply
    with pytest.raises(ValueError, match="null class"):
        diffusion_saliency_scores(apply_fn, no_null, schedule, images, labels, jax.random.key(0),
                                  batch_size=8, guidance_scale=2.0)
    with pytest.raises(ValueError, match="null class"):
        generate_samples(apply_fn, no_null, schedule, np.zeros(2, np.int32), jax.random.key(0),
                         image_shape=(8, 8, 1), num_steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="null class"):
        unlearn_diffusion(apply_fn, no_null, schedule, forget_images=images[:4],
                          forget_labels=labels[:4] * 0, retain_images=images, retain_labels=labels,
                          num_classes=NUM_CLASSES, config=DiffusionUnlearnConfig(), progress=False)


# ------------------------------------------------------------------------------------------------
# Unlearning.


def test_salun_changes_only_salient_weights(model, params, schedule, data):
    images, labels = data
    forget = labels == 0
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    mask = jax.tree.unflatten(treedef, [rng.random(np.shape(x)) < 0.5 for x in leaves])
    config = DiffusionUnlearnConfig(num_iterations=3, batch_size=4, learning_rate=1e-2,
                                    alpha=1e-2, pseudo_class="random")
    out = unlearn_diffusion(model.apply, params, schedule, forget_images=images[forget],
                            forget_labels=labels[forget], retain_images=images[~forget],
                            retain_labels=labels[~forget], num_classes=NUM_CLASSES, config=config,
                            mask=mask, progress=False, log_every=1)
    changed_salient = 0
    for old, new, m in zip(leaves, jax.tree.leaves(out.params), jax.tree.leaves(mask),
                           strict=True):
        old, new = np.asarray(old), np.asarray(new)
        np.testing.assert_array_equal(new[~m], old[~m])  # bit-identical
        changed_salient += int(np.sum(new[m] != old[m]))
    assert changed_salient > 0.5 * sum(int(m.sum()) for m in jax.tree.leaves(mask))
    assert len(out.history) == 3
    record = out.history[-1]
    assert record["mask_sparsity"] == pytest.approx(
        1 - saliency.mask_stats(mask)["fraction"], abs=1e-6)
    assert record["retain_loss"] > 0 and record["forget_loss"] > 0
    assert out.run_seconds > 0


def test_bad_unlearning_inputs(params, schedule, data, tmp_path):
    images, labels = data
    kwargs = dict(forget_images=images[:4], forget_labels=labels[:4], num_classes=NUM_CLASSES,
                  config=DiffusionUnlearnConfig(), progress=False)
    apply_fn = _unet().apply
    with pytest.raises(ValueError, match="retain data"):
        unlearn_diffusion(apply_fn, params, schedule, retain_images=None, retain_labels=None,
                          **kwargs)
    with pytest.raises(ValueError, match="forget labels"):
        unlearn_diffusion(apply_fn, params, schedule, retain_images=images, retain_labels=labels,
                          **dict(kwargs, forget_labels=labels[:4] + 10))
    # A mask made for another model (one layer wider) is refused with the layer's name.
    mask = jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)
    mask["conv_in"]["kernel"] = np.ones((3, 3, 1, 12), bool)
    with pytest.raises(saliency.MaskMismatchError, match="conv_in/kernel"):
        unlearn_diffusion(apply_fn, params, schedule, retain_images=images, retain_labels=labels,
                          mask=mask, **kwargs)
    path = str(tmp_path / "mask.npz")
    saliency.save_mask(path, mask)
    with pytest.raises(saliency.MaskMismatchError, match="conv_in/kernel"):
        saliency.load_mask(path, params)


# ------------------------------------------------------------------------------------------------
# Evaluation.


def test_unlearning_and_class_accuracies():
    predictions = np.array([0, 1, 1, 3, 2, 2, 2, 0])
    labels = np.array([0, 0, 0, 0, 2, 2, 2, 2])
    assert unlearning_accuracy(predictions[:4], 0) == 75.0
    assert class_accuracies(predictions, labels) == {0: 25.0, 2: 75.0}
    accs = class_accuracies(predictions, labels, range(3))
    assert np.isnan(accs[1])
    with pytest.raises(ValueError):
        unlearning_accuracy(np.array([]), 0)


def test_evaluate_samples_on_constructed_classifier_outputs():
    num_classes = 3
    sample_labels = samples_per_class_labels(num_classes, 4)  # 0000 1111 2222
    predicted = np.array([0, 1, 2, 2, 1, 1, 1, 0, 2, 2, 2, 2])
    features = np.random.default_rng(0).normal(size=(12, 2)).astype(np.float32)

    def predict_fn(variables, images):  # "classifies" by looking up the image's index
        del variables
        index = images[:, 0, 0, 0].astype(jnp.int32)
        return jax.nn.one_hot(jnp.asarray(predicted)[index], num_classes), jnp.asarray(
            features)[index]

    samples = np.zeros((12, 2, 2, 1), np.uint8)
    samples[:, 0, 0, 0] = np.arange(12)
    real = np.random.default_rng(1).normal(size=(50, 2))
    result = evaluate_samples(predict_fn, None, samples, sample_labels, forget_class=0,
                              num_classes=num_classes, real_features=real, batch_size=5)
    assert result["UA"] == 75.0
    assert result["forget_class_accuracy"] == 25.0
    assert result["per_class_accuracy"] == {"0": 25.0, "1": 75.0, "2": 100.0}
    assert result["retain_accuracy"] == 87.5
    assert result["FD"] == pytest.approx(classifier_frechet_distance(real, features[4:]))


def test_frechet_distance_identical_and_closed_forms():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 5))
    assert classifier_frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    # Shifted Gaussians with a shared covariance: |delta|^2.
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    mu = rng.normal(size=5)
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(mu, sigma, mu + delta, sigma) == pytest.approx(delta @ delta,
                                                                           rel=1e-9)
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2.
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), np.diag(va), np.zeros(3), np.diag(vb)) == pytest.approx(
        np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2))
    # General PSD pair against scipy's matrix square root (the pytorch-fid formula).
    from scipy import linalg

    b = rng.normal(size=(5, 5))
    sigma2 = b @ b.T
    expected = np.trace(sigma + sigma2 - 2 * np.real(linalg.sqrtm(sigma @ sigma2)))
    assert frechet_distance(mu, sigma, mu, sigma2) == pytest.approx(expected, rel=1e-6)
    # Samples of N(0, I) and N(d, I): ~|d|^2.
    x = rng.normal(size=(20000, 3))
    d = np.array([2.0, 0.0, -1.0])
    assert classifier_frechet_distance(x, rng.normal(size=(20000, 3)) + d) == pytest.approx(
        5.0, abs=0.1)
    mean, cov = feature_statistics(x)
    chex.assert_shape([mean, cov], [(3,), (3, 3)])
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


def test_sample_grid_png(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    path = save_sample_grid(images, labels, tmp_path / "grids" / "x.png", num_classes=3,
                            per_class=2, scale=2, padding=1)
    with Image.open(path) as grid:
        assert grid.size == (2 * 17 + 1, 3 * 17 + 1)
        assert grid.mode == "L"
        pixels = np.asarray(grid)
    np.testing.assert_array_equal(pixels[1:17:2, 1:17:2], images[0, ..., 0])  # row 0, col 0
    with pytest.raises(ValueError):
        save_sample_grid(images.astype(np.float32), labels, tmp_path / "y.png", num_classes=3)


def test_generate_samples_chunks_and_dtype(model, params, schedule):
    labels = np.array([0, 1, 2, 3, 0], np.int32)
    out = generate_samples(model.apply, params, schedule, labels, jax.random.key(0),
                           image_shape=(8, 8, 1), num_steps=2, batch_size=2)
    assert out.shape == (5, 8, 8, 1) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="out-of-range"):
        generate_samples(model.apply, params, schedule, np.array([12], np.int32),
                         jax.random.key(0), image_shape=(8, 8, 1), num_steps=2)
