"""Tests for DDPM training (salun_jax.train_diffusion), DDPM unlearning (the saliency mask and
SalUn / RL / GA / Retrain of salun_jax.unlearn.diffusion) and the generation metrics
(salun_jax.evaluation.generation)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from salun_jax import saliency
from salun_jax.data.batches import epoch_batches, gather_batches
from salun_jax.data.splits import make_split
from salun_jax.diffusion import linear_schedule
from salun_jax.evaluation.generation import (
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
from salun_jax.losses import _eps, ddpm_esd_loss, denoising_loss, esd_target, guided_forget_loss
from salun_jax.models.unet import NULL_CLASS_PARAM, minimal_unet
from salun_jax.train_diffusion import (
    DiffusionTrainConfig,
    create_diffusion_state,
    epochs_for_iterations,
    init_unet_params,
    train_diffusion,
)
from salun_jax.unlearn import METHODS, get_method, unlearn
from salun_jax.unlearn.common import UnlearnOutput
from salun_jax.unlearn.diffusion import (
    DiffusionTask,
    DiffusionUnlearnConfig,
    check_class,
    ddpm_esd,
    ddpm_gradient_ascent,
    ddpm_random_label,
    ddpm_retrain,
    ddpm_salun,
    diffusion_saliency_scores,
    effective_alpha,
)

NUM_CLASSES = 4


def compile_fast(fn, *args):
    """fn jitted for `args`, compiled at XLA's backend optimisation level 0: compiling, not
    running, is what these tiny programs cost, and level 0 halves it (the numerics are XLA's
    either way)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def _unet(null_class=True):
    # One level, no residual blocks on the way down: three blocks and the middle attention in
    # all, the smallest UNet that compiles (in seconds on CPU).
    return minimal_unet(NUM_CLASSES, null_class=null_class)


@pytest.fixture(scope="module")
def model():
    return _unet()


@pytest.fixture(scope="module")
def params(model):
    # What train_diffusion initialises with DiffusionTrainConfig(seed=0).
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


@pytest.fixture(scope="module")
def task(model, schedule, data):
    images, labels = data
    split = make_split(
        labels, np.arange(8) % NUM_CLASSES, scenario="class", forget_class=0, val_fraction=0.0
    )
    return DiffusionTask(model, images, labels, split, NUM_CLASSES, schedule)


def _original_state(params):
    return create_diffusion_state(_unet(), None, DiffusionTrainConfig(), params=params)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_task_is_the_class_split(task, data):
    _, labels = data
    np.testing.assert_array_equal(task.forget, np.flatnonzero(labels == 0))
    np.testing.assert_array_equal(task.retain, np.flatnonzero(labels != 0))


# ------------------------------------------------------------------------------------------------
# 1. Training.


def test_retrain_steps_on_the_denoising_loss_of_the_retain_set(model, schedule, params, task):
    # Retrain = train_diffusion on D_r. One epoch of one step (18 retain images, batch 24: 6
    # padded). The loop's documented draws: batches from default_rng([seed, epoch]), key
    # fold_in(key(seed), epoch), then the step folds in its counter and the device index. The
    # record's loss must be the weighted mean of the production loss (`losses.denoising_loss`,
    # tested in test_losses_diffusion.py) at the initial weights (init_unet_params, key(seed, rbg)).
    config = DiffusionTrainConfig(
        num_iterations=1,
        batch_size=24,
        learning_rate=1e-3,
        cond_drop_prob=0.5,
        flip=True,
        ema_decay=0.5,
        seed=0,
    )
    out = ddpm_retrain(None, task, config, None, progress=False)
    assert isinstance(out, UnlearnOutput)
    assert len(out.history) == 1 and int(out.state.step) == 1
    assert out.compile_seconds > 0 and out.run_seconds > 0

    (indices,), (weights,) = epoch_batches(task.retain, 24, np.random.default_rng([0, 0]))
    np.testing.assert_array_equal(np.sort(indices[0][weights[0] > 0]), task.retain)  # all of D_r
    batch = {"image": task.images[indices[0]], "label": task.labels[indices[0]]}
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0), 0)
    loss_fn = denoising_loss(model.apply, schedule, cond_drop_prob=0.5, flip=True)
    per_example, aux = compile_fast(lambda p: loss_fn(p, batch, key, None), params)(params)
    n = len(task.retain)
    np.testing.assert_allclose(
        out.history[0]["loss"], np.sum(np.asarray(per_example) * weights[0]) / n, rtol=1e-4
    )
    np.testing.assert_allclose(
        out.history[0]["null_fraction"],
        np.sum(aux["metrics"]["null_fraction"] * weights[0]) / n,
        rtol=1e-6,
    )
    assert out.history[0]["num_examples"] == n
    # One Adam step moved every weight but the forgotten class's embedding (no D_r example has
    # its gradient); the EMA (decay 0.5) went half way.
    new = jax.device_get(out.state.params)
    forgotten = np.zeros((NUM_CLASSES, 8), bool)
    forgotten[0] = True
    np.testing.assert_array_equal(
        new["class_embedding"]["embedding"] == params["class_embedding"]["embedding"], forgotten
    )
    for p0, p, ema in zip(
        _leaves(params), _leaves(new), _leaves(out.state.ema_params), strict=True
    ):
        assert np.mean(p != p0) > 0.5
        np.testing.assert_allclose(ema, 0.5 * p0 + 0.5 * p, rtol=1e-5, atol=1e-7)


def test_train_diffusion_rejects_bad_data(model, schedule, data):
    images, labels = data
    config = DiffusionTrainConfig(num_iterations=1, batch_size=8)
    train = np.arange(24)
    with pytest.raises(ValueError, match="uint8"):
        train_diffusion(images.astype(np.float32), labels, train, model, schedule, config)
    with pytest.raises(ValueError, match="uint8"):
        train_diffusion(images[:, :4], labels, train, model, schedule, config)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        train_diffusion(images, labels + 1, train, model, schedule, config)


def test_epochs_for_iterations():
    assert epochs_for_iterations(800_000, 50_000, 128) == 2047  # 391 steps per epoch
    assert epochs_for_iterations(1, 10, 64) == 1
    assert epochs_for_iterations(7, 10, 4) == 3  # 3 steps per epoch: 3 epochs give 9 >= 7
    with pytest.raises(ValueError, match="num_iterations"):
        epochs_for_iterations(0, 10, 4)
    with pytest.raises(ValueError, match="no training examples"):
        epochs_for_iterations(1, 0, 4)


# ------------------------------------------------------------------------------------------------
# 2. Class checks, alpha, configs.


@pytest.mark.parametrize("bad", [12, -1, 4, 2.0, True])
def test_unknown_forget_class_is_rejected(bad):
    with pytest.raises(ValueError, match="forget_class"):
        check_class(bad, NUM_CLASSES)


def test_check_class_and_effective_alpha():
    assert check_class(np.int64(3), NUM_CLASSES) == 3
    assert effective_alpha(1e-3, (32, 32, 3)) == pytest.approx(3.072)
    assert effective_alpha(1e-3, (8, 8, 1)) == pytest.approx(0.064)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pseudo_class": "nope"}, "pseudo_class"),
        ({"num_iterations": 0}, ">= 1"),
        ({"batch_size": 0}, ">= 1"),
        ({"log_every": 0}, ">= 1"),
        ({"cond_drop_prob": 1.5}, "cond_drop_prob"),
    ],
)
def test_bad_unlearn_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusionUnlearnConfig(**kwargs)


def test_unknown_mask_mode_is_rejected_by_the_config():
    with pytest.raises(ValueError, match="mask_mode"):
        DiffusionUnlearnConfig(mask_mode="typo")


def test_bad_train_configs_and_removed_fields():
    with pytest.raises(ValueError, match=">= 1"):
        DiffusionTrainConfig(num_iterations=0)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        DiffusionTrainConfig(cond_drop_prob=-0.1)
    with pytest.raises(TypeError, match="objective"):  # the method decides the objective now
        DiffusionUnlearnConfig(objective="rl")


# ------------------------------------------------------------------------------------------------
# 3. The saliency mask.


def test_saliency_scores_are_the_clipped_gradient_sum(model, schedule, params, task):
    # 6 forget images in batches of 4: two batches, the second padded. Reference: the documented
    # batches (shuffled by default_rng(seed)) and keys (fold_in(key(seed), i)), each batch's
    # gradient of the mask loss clipped to norm c on its own, then summed.
    c, seed = 1e-3, 5
    scores = diffusion_saliency_scores(
        _original_state(params), task, batch_size=4, guidance_scale=2.0, clip_norm=c, seed=seed
    )
    saliency.check_same_structure(scores, params, "scores")
    batches = gather_batches(
        {"image": task.images, "label": task.labels}, task.forget, 4, np.random.default_rng(seed)
    )
    np.testing.assert_array_equal(batches["weight"][1], [1, 1, 0, 0])
    grad_fn = compile_fast(
        jax.grad(guided_forget_loss(model.apply, schedule, 2.0)),
        params,
        jax.tree.map(lambda x: x[0], batches),
        jax.random.key(0),
    )
    total = [np.zeros(np.shape(x)) for x in jax.tree.leaves(params)]
    for i in range(2):
        grads = _leaves(
            grad_fn(
                params,
                jax.tree.map(lambda x, i=i: x[i], batches),
                jax.random.fold_in(jax.random.key(seed), i),
            )
        )
        norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads))
        assert norm > c  # so the clipping acts
        total = [t + g * c / (norm + 1e-6) for t, g in zip(total, grads, strict=True)]
    for got, want in zip(_leaves(scores), total, strict=True):
        np.testing.assert_allclose(got, np.abs(want), rtol=1e-3, atol=1e-9)

    mask = saliency.mask_from_scores(jax.device_get(scores), 0.5)
    saliency.check_same_structure(mask, params)
    size = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    assert saliency.mask_stats(mask)["ones"] == size // 2
    flat = np.concatenate([np.ravel(x) for x in _leaves(scores)])
    chosen = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mask)])
    assert flat[chosen].min() >= flat[~chosen].max()  # the largest scores are the salient ones


def test_guidance_and_class_drop_need_a_null_class(params, task):
    # The params of a UNet built with null_class=False: the same tree without the null class.
    no_null = {k: v for k, v in params.items() if k != NULL_CLASS_PARAM}
    model = _unet(null_class=False)
    state = create_diffusion_state(model, None, DiffusionTrainConfig(), params=no_null)
    no_null_task = dataclasses.replace(task, model=model)
    with pytest.raises(ValueError, match="null class"):
        diffusion_saliency_scores(state, no_null_task, batch_size=8, guidance_scale=2.0)
    with pytest.raises(ValueError, match="null class"):
        generate_samples(
            model.apply,
            no_null,
            task.schedule,
            np.zeros(2, np.int32),
            jax.random.key(0),
            image_shape=(8, 8, 1),
            num_steps=2,
        )
    mask = jax.tree.map(lambda x: np.ones(np.shape(x), bool), no_null)
    config = DiffusionUnlearnConfig(num_iterations=1, batch_size=4, cond_drop_prob=0.1)
    for method, method_mask in [
        (ddpm_salun, mask),
        (ddpm_random_label, None),
        (ddpm_gradient_ascent, None),
    ]:
        with pytest.raises(ValueError, match="null class"):
            method(state, no_null_task, config, jax.random.key(0), mask=method_mask, progress=False)


# ------------------------------------------------------------------------------------------------
# 4. Unlearning.


def _random_mask(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.random(np.shape(x)) < 0.5, jax.device_get(params))


def test_salun_keeps_non_salient_weights_bit_identical(params, task):
    mask = _random_mask(params)
    config = DiffusionUnlearnConfig(
        num_iterations=3,
        batch_size=4,
        learning_rate=1e-2,
        alpha=1e-2,
        pseudo_class="random",
        log_every=2,
    )
    out = ddpm_salun(
        _original_state(params), task, config, jax.random.key(1), mask=mask, progress=False
    )
    assert isinstance(out, UnlearnOutput) and out.model is None
    changed, salient = 0, 0
    for old, new, m in zip(
        _leaves(params), _leaves(out.state.params), jax.tree.leaves(mask), strict=True
    ):
        np.testing.assert_array_equal(new[~m], old[~m])  # bit-identical
        changed += int(np.sum(new[m] != old[m]))
        salient += int(m.sum())
    assert changed > 0.5 * salient
    assert int(out.state.step) == 3 and out.state.ema_params is None  # no EMA when unlearning
    # log_every 2: records after steps 2 and 3; each step sees 4 forget + 4 retain pairs.
    assert [r["num_examples"] for r in out.history] == [8.0, 4.0]
    for record in out.history:
        assert record["phase"] == "SalUn"
        assert record["forget_loss"] > 0 and record["retain_loss"] > 0
        assert record["loss"] == pytest.approx(
            record["forget_loss"] + 1e-2 * record["retain_loss"], rel=1e-5
        )
    assert out.run_seconds > 0 and out.compile_seconds > 0


def test_rl_changes_all_weights(params, task):
    # Batches of 6: 12 retain draws of the 18 retain images, so every retained class occurs.
    config = DiffusionUnlearnConfig(num_iterations=2, batch_size=6, learning_rate=1e-2)
    out = ddpm_random_label(
        _original_state(params), task, config, jax.random.key(1), progress=False
    )
    old, new = _leaves(params), _leaves(out.state.params)
    changed = sum(int(np.sum(a != b)) for a, b in zip(old, new, strict=True))
    assert changed > 0.9 * sum(a.size for a in old)
    assert len(out.history) == 1 and out.history[0]["phase"] == "RL"
    # Every class embedding row moved: row 0 through the forget pass, rows 1-3 only through the
    # retain batches (the pseudo-class target takes no gradient), so those come from D_r.
    embedding = "class_embedding", "embedding"
    before = params[embedding[0]][embedding[1]]
    after = jax.device_get(out.state.params)[embedding[0]][embedding[1]]
    assert np.all(np.any(after != before, axis=1))


def test_ga_ascends_the_forget_loss_with_the_retain_term(params, task):
    # GA is upstream's `forget_loss + alpha * retain_loss` with forget_loss = -L_simple(D_f), so
    # it needs retain data.
    split = dataclasses.replace(task.split, retain=np.zeros(0, np.int64))
    config = DiffusionUnlearnConfig(
        num_iterations=2, batch_size=4, learning_rate=1e-2, log_every=1, alpha=0.5
    )
    with pytest.raises(ValueError, match="GA needs retain data"):
        ddpm_gradient_ascent(
            _original_state(params),
            dataclasses.replace(task, split=split),
            config,
            jax.random.key(2),
            progress=False,
        )
    out = ddpm_gradient_ascent(
        _original_state(params), task, config, jax.random.key(2), progress=False
    )
    assert len(out.history) == 2
    for record in out.history:
        assert record["forget_loss"] < 0 < record["retain_loss"]
        assert record["loss"] == pytest.approx(
            record["forget_loss"] + 0.5 * record["retain_loss"], rel=1e-5
        )
    assert any(
        np.any(a != b) for a, b in zip(_leaves(params), _leaves(out.state.params), strict=True)
    )


def test_esd_loss_is_negative_guidance_with_the_null_class(model, params, schedule):
    # One grid step: k = 0, so x_k is the drawn x_T and every UNet query sits at grid[0].
    frozen = jax.tree.map(lambda x: x * 1.1, params)  # the frozen copy differs from the trained
    state = _original_state(params).replace(extra={"frozen": frozen})
    loss_fn = ddpm_esd_loss(
        model.apply, schedule, image_shape=(8, 8, 1), negative_guidance=2.0, num_steps=1
    )
    labels = jnp.array([0, 0, 2], jnp.int32)
    rng = jax.random.key(3)
    loss, aux = loss_fn(params, {"label": labels}, rng, state)
    draw_rng, dropout_rng = jax.random.split(rng)
    x_t = jax.random.normal(jax.random.split(draw_rng)[1], (3, 8, 8, 1))
    t = jnp.zeros((3,), jnp.int32)  # the uniform grid of 1 step is range(0, T, T) = [0]

    def frozen_eps(null):
        return model.apply(
            {"params": frozen}, x_t, t, labels, train=False, null_mask=jnp.full(3, null)
        )

    target = esd_target(frozen_eps(True), frozen_eps(False), 2.0)
    eps = _eps(model.apply, params, x_t, t, labels, None, dropout_rng)
    expected = jnp.mean(jnp.square(eps - target).reshape(3, -1), axis=1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(aux["metrics"]["esd_steps"], 0.0)


def test_esd_moves_the_weights_and_keeps_the_frozen_copy(params, task):
    config = DiffusionUnlearnConfig(
        num_iterations=2, batch_size=2, learning_rate=1e-2, esd_num_steps=3, log_every=1
    )
    out = ddpm_esd(_original_state(params), task, config, jax.random.key(1), progress=False)
    assert [r["phase"] for r in out.history] == ["ESD", "ESD"]
    assert all(0 <= r["esd_steps"] <= 2 and r["loss"] > 0 for r in out.history)
    for old, frozen in zip(_leaves(params), _leaves(out.state.extra["frozen"]), strict=True):
        np.testing.assert_array_equal(old, frozen)
    assert any(
        np.any(a != b) for a, b in zip(_leaves(params), _leaves(out.state.params), strict=True)
    )
    with pytest.raises(ValueError, match="esd_num_steps must be >= 1"):
        DiffusionUnlearnConfig(esd_num_steps=0)


def test_bad_unlearning_inputs(params, task, tmp_path):
    state = _original_state(params)
    config = DiffusionUnlearnConfig(num_iterations=1, batch_size=4)
    mask = jax.tree.map(lambda x: np.ones(np.shape(x), bool), jax.device_get(params))
    with pytest.raises(ValueError, match="needs a saliency mask"):
        ddpm_salun(state, task, config, jax.random.key(0))
    no_retain = dataclasses.replace(
        task, split=dataclasses.replace(task.split, retain=np.zeros(0, np.int64))
    )
    with pytest.raises(ValueError, match="needs retain data"):
        ddpm_random_label(state, no_retain, config, jax.random.key(0), progress=False)
    no_forget = dataclasses.replace(
        task, split=dataclasses.replace(task.split, forget=np.zeros(0, np.int64))
    )
    for method in (ddpm_random_label, ddpm_gradient_ascent):
        with pytest.raises(ValueError, match="forget set is empty"):
            method(state, no_forget, config, jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="forget set is empty"):
        diffusion_saliency_scores(state, no_forget, batch_size=4)
    # A mask made for another model (one layer wider) is refused with the layer's name.
    wide = dict(mask, conv_in=dict(mask["conv_in"], kernel=np.ones((3, 3, 1, 12), bool)))
    with pytest.raises(saliency.MaskMismatchError, match="conv_in/kernel"):
        ddpm_salun(state, task, config, jax.random.key(0), mask=wide, progress=False)
    path = str(tmp_path / "mask.npz")
    saliency.save_mask(path, wide)
    with pytest.raises(saliency.MaskMismatchError, match="conv_in/kernel"):
        saliency.load_mask(path, params)
    with pytest.raises(ValueError, match="does not take a mask"):
        ddpm_retrain(None, task, DiffusionTrainConfig(num_iterations=1), None, mask=mask)


def test_diffusion_methods_are_registered(task, params):
    assert METHODS["diffusion"] == {
        "Retrain": ddpm_retrain,
        "SalUn": ddpm_salun,
        "RL": ddpm_random_label,
        "GA": ddpm_gradient_ascent,
        "ESD": ddpm_esd,
    }
    assert get_method("SalUn", "diffusion") is ddpm_salun
    with pytest.raises(ValueError, match="unknown diffusion unlearning method 'FT'"):
        get_method("FT", "diffusion")
    # `unlearn` picks the diffusion registry from the task's type.
    with pytest.raises(ValueError, match="needs a saliency mask"):
        unlearn("SalUn", _original_state(params), task)
    with pytest.raises(ValueError, match="Retrain needs its training config"):
        unlearn("Retrain", None, task)


# ------------------------------------------------------------------------------------------------
# 5. Evaluation.


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
    np.testing.assert_array_equal(sample_labels, np.repeat(np.arange(3), 4))
    predicted = np.array([0, 1, 2, 2, 1, 1, 1, 0, 2, 2, 2, 2])
    features = np.random.default_rng(0).normal(size=(12, 2)).astype(np.float32)

    def predict_fn(variables, images):  # "classifies" by looking up the image's index
        del variables
        index = images[:, 0, 0, 0].astype(jnp.int32)
        return jax.nn.one_hot(jnp.asarray(predicted)[index], num_classes), jnp.asarray(features)[
            index
        ]

    samples = np.zeros((12, 2, 2, 1), np.uint8)
    samples[:, 0, 0, 0] = np.arange(12)
    real = np.random.default_rng(1).normal(size=(50, 2))
    result = evaluate_samples(
        predict_fn,
        None,
        samples,
        sample_labels,
        forget_class=0,
        num_classes=num_classes,
        real_features=real,
        batch_size=5,
    )
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
    assert frechet_distance(mu, sigma, mu + delta, sigma) == pytest.approx(delta @ delta, rel=1e-9)
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2.
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), np.diag(va), np.zeros(3), np.diag(vb)) == pytest.approx(
        np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    )
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
        5.0, abs=0.1
    )
    mean, cov = feature_statistics(x)
    chex.assert_shape([mean, cov], [(3,), (3, 3)])
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


def test_sample_grid_png(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    path = save_sample_grid(
        images,
        labels,
        tmp_path / "grids" / "x.png",
        num_classes=3,
        per_class=2,
        scale=2,
        padding=1,
        min_cell_px=0,  # the bare grid (tests/test_pictures.py checks labels, title, upscaling)
        annotate=False,
    )
    with Image.open(path) as grid:
        assert grid.size == (2 * 17 + 1, 3 * 17 + 1)
        assert grid.mode == "L"
        pixels = np.asarray(grid)
    np.testing.assert_array_equal(pixels[1:17:2, 1:17:2], images[0, ..., 0])  # row 0, col 0
    with pytest.raises(ValueError):
        save_sample_grid(images.astype(np.float32), labels, tmp_path / "y.png", num_classes=3)


def test_generate_samples_chunks_and_dtype(model, params, schedule):
    # 5 labels in chunks of 2: the last chunk padded; chunk i draws with fold_in(rng, i), so the
    # first chunk equals a call on its two labels alone.
    labels = np.array([0, 1, 2, 3, 0], np.int32)
    kwargs = dict(image_shape=(8, 8, 1), num_steps=2, batch_size=2)
    out = generate_samples(model.apply, params, schedule, labels, jax.random.key(0), **kwargs)
    assert out.shape == (5, 8, 8, 1) and out.dtype == np.uint8
    first = generate_samples(model.apply, params, schedule, labels[:2], jax.random.key(0), **kwargs)
    np.testing.assert_array_equal(out[:2], first)
    assert not np.array_equal(out[:2], out[2:4])
    with pytest.raises(ValueError, match="out-of-range"):
        generate_samples(
            model.apply,
            params,
            schedule,
            np.array([12], np.int32),
            jax.random.key(0),
            image_shape=(8, 8, 1),
            num_steps=2,
        )
