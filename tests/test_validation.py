"""The Python API refuses bad arguments at the door: one ValueError naming the argument, before
any compile or prediction (`salun_jax.validation`)."""

import dataclasses
import types

import numpy as np
import pytest

import salun_jax as sj
from salun_jax.evaluation import evaluate_unlearning

K = 4  # classes
N, M = 40, 16  # train / test images


@pytest.fixture(scope="module")
def model():
    return sj.create_model("small_cnn", K, (0.5,), (0.25,), width=0.25)


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 8, 8, 1), dtype=np.uint8)
    labels = (np.arange(N) % K).astype(np.int32)
    test_images = rng.integers(0, 256, (M, 8, 8, 1), dtype=np.uint8)
    test_labels = (np.arange(M) % K).astype(np.int32)
    return images, labels, test_images, test_labels


@pytest.fixture(scope="module")
def split(arrays):
    _, labels, _, test_labels = arrays
    return sj.make_split(labels, test_labels, scenario="random", num_forget=4, val_fraction=0.0)


@pytest.fixture(scope="module")
def task(model, arrays, split):
    images, labels, _, _ = arrays
    return sj.UnlearnTask(model, images, labels, split, K)


def _never_called(*args, **kwargs):
    raise AssertionError("the model ran before the arguments were checked")


# A state whose model must not run: each refusal comes before any prediction.
STATE = types.SimpleNamespace(apply_fn=_never_called, variables={})
RECIPE = sj.TrainConfig(model="small_cnn", width=0.25, epochs=1, batch_size=8)


# ------------------------------------------------------------------------------------------------
# train_classifier


def _train(model, images, labels, indices, config=RECIPE):
    return sj.train_classifier(images, labels, indices, model, config, progress=False)


@pytest.mark.parametrize(
    "bad_label, message",
    [(-1, r"labels must be class ids in \[0, 4\)"), (K, r"labels must be class ids in \[0, 4\)")],
)
def test_train_classifier_refuses_labels_outside_the_classes(model, arrays, bad_label, message):
    images, labels, _, _ = arrays
    labels = labels.copy()
    labels[3] = bad_label  # -1 trained as the last class before
    with pytest.raises(ValueError, match=message):
        _train(model, images, labels, np.arange(N))


def test_train_classifier_refuses_non_integer_or_mis_sized_labels(model, arrays):
    images, labels, _, _ = arrays
    with pytest.raises(ValueError, match="labels must be integer class ids"):
        _train(model, images, labels.astype(np.float32), np.arange(N))
    with pytest.raises(ValueError, match="labels has 39 entries, but there are 40 images"):
        _train(model, images, labels[:-1], np.arange(N - 1))
    with pytest.raises(ValueError, match=r"labels must be 1-D"):
        _train(model, images, labels[:, None], np.arange(N))


def test_train_classifier_refuses_float_images_and_says_how_to_convert(model, arrays):
    images, labels, _, _ = arrays
    floats = images.astype(np.float32) / 255.0
    with pytest.raises(ValueError, match=r"images must be uint8, got float32.*astype\(np.uint8\)"):
        _train(model, floats, labels, np.arange(N))
    with pytest.raises(ValueError, match=r"images must be 4-D \[N, H, W, C\]"):
        _train(model, images[..., 0], labels, np.arange(N))


@pytest.mark.parametrize(
    "indices, message",
    [
        (np.arange(N + 1), r"train_indices must be in \[0, 40\)"),
        (np.array([-1, 0, 1]), r"train_indices must be in \[0, 40\)"),
        (np.zeros(0, np.int64), "train_indices is empty"),
        (np.arange(4.0), "train_indices must be integer"),
        (np.arange(4).reshape(2, 2), "train_indices must be 1-D"),
    ],
)
def test_train_classifier_refuses_bad_train_indices(model, arrays, indices, message):
    images, labels, _, _ = arrays
    with pytest.raises(ValueError, match=message):
        _train(model, images, labels, indices)


# ------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    "field, value",
    [
        ("milestones", (-1,)),
        ("milestones", (5, 3)),
        ("milestones", (2, 2)),
        ("milestones", (1.5,)),
        ("epochs", -1),
        ("epochs", 1.5),
        ("batch_size", 0),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1e-4),
        ("gamma", 0.0),
        ("crop_padding", -1),
        ("flip", "yes"),
        ("width", 0.0),
        ("model", ""),
    ],
)
def test_train_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must"):
        sj.TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("milestones", (-1,)),
        ("epochs", -1),
        ("batch_size", 0),
        ("learning_rate", -0.01),
        ("momentum", 1.5),
        ("weight_decay", -1.0),
        ("gamma", -0.1),
        ("crop_padding", -4),
        ("l1_coefficient", -1e-4),
        ("no_l1_epochs", -1),
        ("boundary_bound", -0.1),
        ("soft_mask_ratio", 1.5),
        ("woodfisher_samples", -1),
        ("iu_step_size", float("inf")),
        ("update_batch_stats", 1),
    ],
)
def test_unlearn_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"UnlearnConfig\.{field} must"):
        sj.UnlearnConfig(**{field: value})


def test_configs_accept_good_values():
    assert sj.TrainConfig(milestones=[3, 7], epochs=np.int64(10), seed=np.int32(1)).epochs == 10
    assert sj.TrainConfig(milestones=(), momentum=0.0, weight_decay=0, learning_rate=1).gamma
    assert sj.UnlearnConfig(epochs=0, soft_mask_ratio=1.0, iu_step_size=-0.5).epochs == 0
    with pytest.raises(ValueError, match="mask_mode"):  # the existing checks stay
        sj.UnlearnConfig(mask_mode="soft")
    with pytest.raises(ValueError, match="rl_variant"):
        sj.UnlearnConfig(rl_variant="paper")


# ------------------------------------------------------------------------------------------------
# UnlearnTask and make_split


def test_unlearn_task_refuses_bad_images_and_labels(model, arrays, split):
    images, labels, _, _ = arrays
    with pytest.raises(ValueError, match=r"UnlearnTask.images must be uint8.*astype\(np.uint8\)"):
        sj.UnlearnTask(model, images / 255.0, labels, split, K)
    bad = labels.copy()
    bad[0] = -1
    with pytest.raises(ValueError, match=r"UnlearnTask.labels must be class ids in \[0, 4\)"):
        sj.UnlearnTask(model, images, bad, split, K)
    with pytest.raises(ValueError, match=r"UnlearnTask.labels must be class ids in \[0, 3\)"):
        sj.UnlearnTask(model, images, labels, split, 3)
    with pytest.raises(ValueError, match="UnlearnTask.labels has 39 entries"):
        sj.UnlearnTask(model, images, labels[:-1], split, K)
    with pytest.raises(ValueError, match="UnlearnTask.num_classes is 5, but the model has only 4"):
        sj.UnlearnTask(model, images, labels, split, K + 1)


def test_unlearn_task_refuses_a_split_made_for_other_data(model, arrays):
    images, labels, _, test_labels = arrays
    bigger = np.arange(2 * N) % K
    other = sj.make_split(bigger, test_labels, scenario="random", num_forget=8, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"split\.train must be in \[0, 40\)"):
        sj.UnlearnTask(model, images, labels, other, K)
    # Indices that fit, but the split records another train set size.
    inside = dataclasses.replace(
        other, train=other.train[other.train < N], forget=np.arange(4), retain=np.arange(4, N)
    )
    with pytest.raises(ValueError, match="split .* was made for other data: train size 80"):
        sj.UnlearnTask(model, images, labels, inside, K)
    hand_made = dataclasses.replace(inside, description={})  # no records: indices only
    assert sj.UnlearnTask(model, images, labels, hand_made, K).num_classes == K


def test_make_split_refuses_non_integer_or_negative_labels(arrays):
    _, labels, _, test_labels = arrays
    with pytest.raises(ValueError, match="make_split train_labels must be integer"):
        sj.make_split(labels.astype(float), test_labels, num_forget=4)
    with pytest.raises(ValueError, match=r"make_split test_labels must be class ids"):
        sj.make_split(labels, test_labels - 1, num_forget=4)


# ------------------------------------------------------------------------------------------------
# evaluate / evaluate_unlearning


def test_evaluate_refuses_float_test_images(task, arrays):
    _, _, test_images, test_labels = arrays
    floats = test_images.astype(np.float32) / 255.0  # scaled twice before: TA of a constant
    with pytest.raises(ValueError, match=r"test_images must be uint8.*astype\(np.uint8\)"):
        sj.evaluate(STATE, task, floats, test_labels)


def test_evaluate_refuses_test_arrays_that_do_not_fit(task, arrays):
    _, _, test_images, test_labels = arrays
    with pytest.raises(ValueError, match=r"test_images are \[H, W, C\] = \(8, 4, 1\)"):
        sj.evaluate(STATE, task, test_images[:, :, :4], test_labels)
    with pytest.raises(ValueError, match=r"test_labels must be class ids in \[0, 4\)"):
        sj.evaluate(STATE, task, test_images, test_labels + 1)
    with pytest.raises(ValueError, match="test_labels has 15 entries, but there are 16 images"):
        sj.evaluate(STATE, task, test_images, test_labels[:-1])


def test_evaluate_refuses_a_split_made_for_other_test_data(model, arrays, task):
    images, labels, test_images, test_labels = arrays
    # Same sizes, other test labels: the split's labels digest differs.
    shuffled = test_labels[::-1].copy()
    with pytest.raises(ValueError, match="split .* was made for other data: the labels differ"):
        sj.evaluate(STATE, task, test_images, shuffled)
    # A split made for a larger test set: its test indices fall outside these test arrays.
    other = sj.make_split(labels, np.arange(2 * M) % K, num_forget=4, val_fraction=0.0)
    wide = sj.UnlearnTask(model, images, labels, other, K)
    with pytest.raises(ValueError, match=r"split\.test must be in \[0, 16\)"):
        sj.evaluate(STATE, wide, test_images, test_labels)


def test_evaluate_unlearning_refuses_bad_arrays(arrays, split):
    images, labels, test_images, test_labels = arrays
    good = (images, labels, test_images, test_labels)

    def call(train_images, train_labels, test_images, test_labels, split=split):
        return evaluate_unlearning(
            _never_called, {}, train_images, train_labels, test_images, test_labels, split
        )

    with pytest.raises(ValueError, match="train_images must be uint8"):
        call(images.astype(np.float32), *good[1:])
    with pytest.raises(ValueError, match="train_labels must be class ids"):
        call(images, labels - 1, *good[2:])
    with pytest.raises(ValueError, match=r"split\.train must be in \[0, 30\)"):
        call(images[:30], labels[:30], *good[2:])
