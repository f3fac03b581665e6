"""Sequential deletion requests (`salun_jax.unlearn.sequential`): one request is the one-shot run
bit for bit, SalUn's mask is computed anew per request, and every request's metrics cover the
data of the earlier ones."""

import chex
import jax
import numpy as np
import pytest

from salun_jax.data.splits import make_split
from salun_jax.models import create_model
from salun_jax.saliency import salun_mask
from salun_jax.train import TrainConfig, train_classifier
from salun_jax.unlearn import UnlearnConfig, UnlearnTask, get_method
from salun_jax.unlearn.sequential import request_key, request_splits, sequential_unlearn

CONFIG = UnlearnConfig(epochs=1, learning_rate=0.005, batch_size=64, crop_padding=1, flip=False)


@pytest.fixture(scope="module")
def setup(digits):
    images, labels = digits.train_images[:300], digits.train_labels[:300]
    split = make_split(labels, digits.test_labels[:100], forget_fraction=0.1, val_fraction=0.0)
    model = create_model("small_cnn", 10, digits.mean, digits.std, 0.25)
    recipe = TrainConfig(epochs=2, batch_size=64, learning_rate=0.05, crop_padding=1, flip=False)
    original = train_classifier(images, labels, split.train, model, recipe).state
    task = UnlearnTask(model, images, labels, split, 10)
    return task, original, digits.test_images[:100], digits.test_labels[:100]


def test_request_splits_partition_the_forget_set(setup):
    task = setup[0]
    splits = request_splits(task.split, 3)
    assert np.array_equal(np.concatenate([s.forget for s in splits]), task.split.forget)
    for r, split in enumerate(splits):
        later = np.concatenate([s.forget for s in splits[r + 1 :]] or [np.zeros(0, int)])
        assert set(split.retain.tolist()) == set(task.split.retain.tolist()) | set(later.tolist())
    (one,) = request_splits(task.split, 1)
    assert np.array_equal(one.forget, task.split.forget)
    assert np.array_equal(one.retain, task.split.retain)
    with pytest.raises(ValueError, match="num_requests"):
        request_splits(task.split, 0)


def test_one_request_is_the_one_shot_run_bit_for_bit(setup):
    task, original, test_images, test_labels = setup
    rng = jax.random.key(4)
    out = sequential_unlearn("SalUn", original, task, CONFIG, 1, rng, test_images, test_labels)
    mask = salun_mask(original, task, 0.5, config=CONFIG)
    chex.assert_trees_all_equal(out.masks[0], mask)
    alone = get_method("SalUn")(original, task, CONFIG, request_key(rng, 0), mask=mask).state
    chex.assert_trees_all_equal(out.state.params, alone.params)
    chex.assert_trees_all_equal(out.state.batch_stats, alone.batch_stats)
    (only,) = out.requests
    assert only["UA_earlier"] is None
    assert only["UA_forgotten"] == pytest.approx(only["UA"])


def test_each_request_has_its_own_mask_and_earlier_data_are_evaluated(setup):
    task, original, test_images, test_labels = setup
    out = sequential_unlearn(
        "SalUn", original, task, CONFIG, 3, jax.random.key(0), test_images, test_labels
    )
    assert [r["request"] for r in out.requests] == [0, 1, 2]
    assert sum(r["num_forget"] for r in out.requests) == len(task.split.forget)
    differ = [
        not all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(m0), jax.tree.leaves(m1), strict=True)
        )
        for m0, m1 in zip(out.masks, out.masks[1:], strict=False)
    ]
    assert all(differ)  # a new mask per request: its forget set, the current model
    splits = request_splits(task.split, 3)
    last = out.requests[-1]
    assert out.requests[0]["UA_earlier"] is None
    # UA over all forgotten data is the count-weighted mean of the earlier and the current UA.
    n_earlier = sum(len(s.forget) for s in splits[:2])
    n_now = len(splits[2].forget)
    expected = (last["UA_earlier"] * n_earlier + last["UA"] * n_now) / (n_earlier + n_now)
    assert last["UA_forgotten"] == pytest.approx(expected)
    for record in out.requests:
        for key in ("UA", "RA", "TA", "MIA"):
            assert 0.0 <= record[key] <= 100.0
