import numpy as np
import pytest

from salun_jax.data.splits import (
    SplitMismatchError,
    load_split,
    make_split,
    save_split,
    train_val_split,
)


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 5, 500).astype(np.int32), rng.integers(0, 5, 100).astype(np.int32)


def _check_partition(split, n_train):
    everything = np.concatenate([split.train, split.val])
    assert np.array_equal(np.sort(everything), np.arange(n_train))  # complete
    assert np.intersect1d(split.train, split.val).size == 0  # disjoint
    assert np.intersect1d(split.forget, split.retain).size == 0
    assert np.array_equal(np.sort(np.concatenate([split.forget, split.retain])), split.train)


def test_val_split_per_class_and_matches_upstream_recipe(labels):
    train_labels, _ = labels
    train, val = train_val_split(train_labels, 0.1, seed=1)
    for k in range(5):
        n_k = np.sum(train_labels == k)
        assert np.sum(train_labels[val] == k) == round(0.1 * n_k)
    assert np.all(np.diff(train) > 0)  # ascending, as set difference in CPython gives upstream
    # Upstream: RandomState(seed).choice(class_idx, n, replace=False) per class in class order.
    rng = np.random.RandomState(1)
    expected = np.concatenate(
        [
            rng.choice(
                np.flatnonzero(train_labels == k),
                round(0.1 * np.sum(train_labels == k)),
                replace=False,
            )
            for k in range(5)
        ]
    )
    np.testing.assert_array_equal(val, expected)


def test_random_forgetting(labels):
    split = make_split(*labels, scenario="random", seed=2, num_forget=45)
    _check_partition(split, 500)
    assert split.forget.size == 45 and split.test.size == 100
    positions = np.random.RandomState(1).choice(np.arange(split.train.size), 45, replace=False)
    np.testing.assert_array_equal(split.forget, np.sort(split.train[positions]))
    by_fraction = make_split(*labels, scenario="random", seed=2, forget_fraction=0.1)
    assert by_fraction.forget.size == round(0.1 * split.train.size)


def test_class_wise_forgetting(labels):
    train_labels, test_labels = labels
    split = make_split(*labels, scenario="class", forget_class=3, seed=1)
    _check_partition(split, 500)
    assert np.all(train_labels[split.forget] == 3)
    assert not np.any(train_labels[split.retain] == 3)
    assert np.sum(train_labels[split.train] == 3) == split.forget.size  # exactly all of class 3
    assert not np.any(test_labels[split.test] == 3)
    some = make_split(*labels, scenario="class", forget_class=3, num_forget=10)
    assert some.forget.size == 10 and np.all(train_labels[some.forget] == 3)
    keep_test = make_split(
        *labels, scenario="class", forget_class=3, drop_forget_class_from_test=False
    )
    assert keep_test.test.size == 100


def test_reproducible_and_hash_stable(labels, tmp_path):
    a = make_split(*labels, scenario="random", seed=4, num_forget=30)
    b = make_split(*labels, scenario="random", seed=4, num_forget=30)
    c = make_split(*labels, scenario="random", seed=5, num_forget=30)
    assert a.hash == b.hash and a.hash != c.hash
    path = str(tmp_path / "split.npz")
    save_split(path, a)
    loaded = load_split(path, *labels)
    assert loaded.hash == a.hash
    for name in ("train", "val", "forget", "retain", "test"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(a, name))


def test_mismatch_refused(labels, tmp_path):
    train_labels, test_labels = labels
    path = str(tmp_path / "split.npz")
    save_split(path, make_split(*labels, scenario="random", num_forget=30, dataset="toy"))
    with pytest.raises(SplitMismatchError, match="train size 500 in split vs 400"):
        load_split(path, train_labels[:400], test_labels)
    other = train_labels.copy()
    other[0] = (other[0] + 1) % 5
    with pytest.raises(SplitMismatchError, match="labels differ"):
        load_split(path, other, test_labels)


def test_corrupt_split_refused(labels, tmp_path):
    path = str(tmp_path / "split.npz")
    split = make_split(*labels, scenario="random", num_forget=30)
    np.savez(
        path,
        train=split.train,
        val=split.val,
        forget=split.forget[:-1],
        retain=split.retain,
        test=split.test,
        description="{}",
        hash=split.hash,
    )
    with pytest.raises(SplitMismatchError, match="corrupt"):
        load_split(path)
    with pytest.raises(FileNotFoundError):
        load_split(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scenario="random"), "exactly one of"),
        (dict(scenario="random", num_forget=10_000), "num_forget must be"),
        (dict(scenario="random", forget_fraction=1.5), "forget_fraction must be"),
        (dict(scenario="class", forget_class=9), "forget_class in"),
        (dict(scenario="sideways"), "unknown scenario"),
        (dict(scenario="none", val_fraction=1.0), "val_fraction"),
    ],
)
def test_bad_split_arguments(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_split(*labels, **kwargs)
