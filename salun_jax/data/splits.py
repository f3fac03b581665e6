"""Train/validation split and forget/retain selection, saved as .npz with a content hash.

Semantics follow the original code (upstream `Classification/dataset.py`):
- validation: per class, `RandomState(seed).choice(class_idx, n_val, replace=False)`, stacked in
  class order; train = the rest in ascending index order;
- random forgetting: `RandomState(seed - 1).choice(len(train), n, replace=False)` positions of the
  train set;
- class-wise forgetting: all train images of class k (or n of them, chosen with
  `RandomState(seed - 1)`); the test set may drop class k.
All index arrays are absolute indices into the data set's train (or test) arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from typing import Any

import numpy as np

from salun_jax import validation

_ARRAYS = ("train", "val", "forget", "retain", "test")


class SplitMismatchError(ValueError):
    """A saved split does not belong to the data set it is loaded against."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Index arrays (int64, absolute into the data set's train/test arrays) plus a description."""

    train: np.ndarray
    val: np.ndarray
    forget: np.ndarray
    retain: np.ndarray
    test: np.ndarray
    description: dict[str, Any]

    @property
    def hash(self) -> str:
        """sha256 (first 16 hex digits) over the index arrays and the description."""
        digest = hashlib.sha256()
        for name in _ARRAYS:
            array = np.ascontiguousarray(getattr(self, name), dtype=np.int64)
            digest.update(name.encode())
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
        digest.update(json.dumps(self.description, sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def sizes(self) -> dict[str, int]:
        return {name: int(getattr(self, name).size) for name in _ARRAYS}


def train_val_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Per-class validation split as upstream. Returns (train_idx ascending, val_idx)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    val = []
    for k in np.unique(labels):
        class_idx = np.flatnonzero(labels == k)
        n_val = int(round(val_fraction * class_idx.size))
        if n_val:
            val.append(rng.choice(class_idx, n_val, replace=False))
    val_idx = np.concatenate(val).astype(np.int64) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(labels.size), val_idx).astype(np.int64)  # ascending
    return train_idx, val_idx


def make_split(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    *,
    scenario: str = "random",
    seed: int = 1,
    val_fraction: float = 0.1,
    num_forget: int | None = None,
    forget_fraction: float | None = None,
    forget_class: int | None = None,
    drop_forget_class_from_test: bool = True,
    dataset: str = "",
) -> Split:
    """Builds a split.

    Args:
      train_labels, test_labels: int labels of the data set's train and test arrays.
      scenario: "random" (n or a fraction of the train set), "class" (all, or n, of a class), or
        "none" (no forget set: for training the original model).
      seed: split seed; validation uses `seed`, forget selection `seed - 1` (as upstream).
      val_fraction: per-class fraction of the train images held out for validation.
      num_forget / forget_fraction: size of the forget set (random: required, one of the two;
        class-wise: optional, default all of the class).
      forget_class: the class to forget (class-wise).
      drop_forget_class_from_test: class-wise runs evaluate TA without the forgotten class.
      dataset: the data set's name, recorded in the description.

    Returns:
      A `Split`.

    Raises:
      ValueError: unknown scenario, or sizes/classes out of range.
    """
    train_labels = validation.check_labels("make_split train_labels", train_labels)
    test_labels = validation.check_labels("make_split test_labels", test_labels)
    train, val = train_val_split(train_labels, val_fraction, seed)
    forget_rng = np.random.RandomState(seed - 1 if seed > 0 else 0)
    test = np.arange(test_labels.size, dtype=np.int64)
    if scenario == "none":
        forget = np.zeros(0, np.int64)
    elif scenario == "random":
        if (num_forget is None) == (forget_fraction is None):
            raise ValueError("random forgetting needs exactly one of num_forget, forget_fraction")
        if forget_fraction is not None:
            if not 0.0 < forget_fraction < 1.0:
                raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
            num_forget = int(round(forget_fraction * train.size))
            if not 0 < num_forget < train.size:
                raise ValueError(
                    f"forget_fraction {forget_fraction} of {train.size} train images gives "
                    f"{num_forget} images to forget; it must give between 1 and {train.size - 1}"
                )
        if not 0 < num_forget < train.size:
            raise ValueError(f"num_forget must be in (0, {train.size}), got {num_forget}")
        positions = forget_rng.choice(np.arange(train.size), size=num_forget, replace=False)
        forget = np.sort(train[positions])
    elif scenario == "class":
        num_classes = int(train_labels.max()) + 1
        if forget_class is None or not 0 <= forget_class < num_classes:
            raise ValueError(
                f"class-wise forgetting needs forget_class in [0, {num_classes}), "
                f"got {forget_class}"
            )
        candidates = train[train_labels[train] == forget_class]
        if num_forget is None and forget_fraction is not None:
            num_forget = int(round(forget_fraction * candidates.size))
        if num_forget is None or num_forget >= candidates.size:
            forget = candidates
        else:
            if num_forget <= 0:
                raise ValueError(f"num_forget must be positive, got {num_forget}")
            forget = np.sort(forget_rng.choice(candidates, size=num_forget, replace=False))
        if drop_forget_class_from_test:
            test = test[test_labels != forget_class]
    else:
        raise ValueError(f"unknown scenario {scenario!r}; known: none, random, class")
    retain = np.setdiff1d(train, forget).astype(np.int64)
    description = {
        "dataset": dataset,
        "scenario": scenario,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "num_forget": int(forget.size),
        "forget_class": None if forget_class is None else int(forget_class),
        "drop_forget_class_from_test": bool(drop_forget_class_from_test),
        "num_train_images": int(train_labels.size),
        "num_test_images": int(test_labels.size),
        "labels_digest": _labels_digest(train_labels, test_labels),
    }
    return Split(train, val, forget.astype(np.int64), retain, test, description)


def _labels_digest(train_labels: np.ndarray, test_labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(train_labels, np.int64).tobytes())
    digest.update(b"|")
    digest.update(np.ascontiguousarray(test_labels, np.int64).tobytes())
    return digest.hexdigest()[:16]


def save_split(path: str, split: Split) -> None:
    """Writes the split to `path` (.npz) atomically, with its description and hash."""
    tmp = f"{path}.tmp.npz"
    np.savez(
        tmp,
        **{name: getattr(split, name) for name in _ARRAYS},
        description=json.dumps(split.description, sort_keys=True),
        hash=split.hash,
    )
    os.replace(tmp, path)


def load_split(
    path: str, train_labels: np.ndarray | None = None, test_labels: np.ndarray | None = None
) -> Split:
    """Loads a split and, given the data set's labels, checks that it belongs to it.

    Raises:
      FileNotFoundError: no file at `path`.
      SplitMismatchError: the stored hash does not match the content, or the split was made for a
        data set with other sizes or labels (the message says what differs).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no split file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name].astype(np.int64) for name in _ARRAYS}
            description = json.loads(str(f["description"]))
            stored_hash = str(f["hash"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise SplitMismatchError(
            f"split {path} is unreadable ({type(error).__name__}: {error})"
        ) from error
    split = Split(**arrays, description=description)
    if split.hash != stored_hash:
        raise SplitMismatchError(
            f"split {path} is corrupt: content hash {split.hash} != stored {stored_hash}"
        )
    if train_labels is not None and test_labels is not None:
        check_split(split, train_labels, test_labels)
    return split


def check_split(split: Split, train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    """Raises SplitMismatchError if `split` was not made for a data set with these labels."""
    d = split.description
    problems = []
    if d.get("num_train_images") != len(train_labels):
        problems.append(f"train size {d.get('num_train_images')} in split vs {len(train_labels)}")
    if d.get("num_test_images") != len(test_labels):
        problems.append(f"test size {d.get('num_test_images')} in split vs {len(test_labels)}")
    if not problems and d.get("labels_digest") != _labels_digest(train_labels, test_labels):
        problems.append("the labels differ (same sizes, different label arrays)")
    if problems:
        raise SplitMismatchError(
            f"split (dataset {d.get('dataset')!r}, hash {split.hash}) does not match this data "
            f"set: {'; '.join(problems)}"
        )


def check_split_fits(
    split: Split,
    train_labels: np.ndarray,
    test_labels: np.ndarray | None = None,
    *,
    records: bool = True,
) -> None:
    """Raises ValueError unless `split` can index these arrays: its train/val/forget/retain
    indices 1-D integers in [0, len(train_labels)) and (given `test_labels`) its test indices in
    [0, len(test_labels)); and, where its description records them (a `make_split` split), the
    data set's sizes and (given `test_labels`) the labels digest match (`SplitMismatchError`).
    A hand-made split without those records, or `records=False`, is checked by its indices
    only."""
    if not isinstance(split, Split):
        raise ValueError(
            f"split must be a salun_jax Split (make_split), got {type(split).__name__}"
        )
    for name in ("train", "val", "forget", "retain"):
        validation.check_indices(f"split.{name}", getattr(split, name), len(train_labels))
    if test_labels is not None:
        validation.check_indices("split.test", split.test, len(test_labels))
    d = split.description if records and isinstance(split.description, dict) else {}
    problems = []
    if "num_train_images" in d and d["num_train_images"] != len(train_labels):
        problems.append(f"train size {d['num_train_images']} in split vs {len(train_labels)}")
    if test_labels is not None and "num_test_images" in d:
        if d["num_test_images"] != len(test_labels):
            problems.append(f"test size {d['num_test_images']} in split vs {len(test_labels)}")
        elif "labels_digest" in d and d["labels_digest"] != _labels_digest(
            train_labels, test_labels
        ):
            problems.append("the labels differ (same sizes, different label arrays)")
    if problems:
        raise SplitMismatchError(
            f"split (dataset {d.get('dataset')!r}, hash {split.hash}) was made for other data: "
            f"{'; '.join(problems)}"
        )
