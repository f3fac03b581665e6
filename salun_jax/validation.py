"""Argument checks at the door of the Python API: each raises one `ValueError` line naming the
argument, before any work (no compile, no full pass over images).

Conventions of the API (`train_classifier`, `UnlearnTask`, `evaluate`, `evaluate_unlearning`):
  * images are uint8 ``[N, H, W, C]`` with values 0..255, as `load_dataset` gives them; the
    library scales them to [0, 1] itself (`data.augment.to_float`), so float images would be
    scaled twice. Convert [0, 1] floats with ``(x * 255).round().astype(np.uint8)``.
  * labels are integer class ids ``[N]`` in ``[0, K)``.
  * index arrays are 1-D integer positions into those arrays.

Level 0: imports nothing from salun_jax but `salun_jax.types`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

UINT8_HINT = (
    "images enter the API as uint8 [N, H, W, C] with values 0..255, as load_dataset gives "
    "them; convert [0, 1] floats with (x * 255).round().astype(np.uint8)"
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    """`value` is an integer (not a bool), at least `minimum` when given."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """`value` is a bool (Python or numpy)."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """`value` is a finite real number in the interval from `low` to `high` (each bound closed
    unless `low_open` / `high_open`; None: unbounded on that side)."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}"
        interval += ")" if high_open or high is None else "]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_milestones(name: str, milestones: Any) -> None:
    """A sequence of non-negative integers, strictly increasing (epochs of a multi-step LR)."""
    if not isinstance(milestones, Sequence | np.ndarray) or isinstance(milestones, str):
        raise ValueError(f"{name} must be a sequence of epochs, got {milestones!r}")
    values = tuple(milestones)
    ok = all(_is_int(m) and m >= 0 for m in values) and all(
        a < b for a, b in zip(values, values[1:], strict=False)
    )
    if not ok:
        raise ValueError(
            f"{name} must be non-negative integers, strictly increasing, got {milestones!r}"
        )


def check_sgd_config(config: Any, *, zero_learning_rate_ok: bool = False) -> None:
    """The fields `TrainConfig` and `UnlearnConfig` share (epochs, batch size, SGD with a
    multi-step LR, augmentation): one ValueError naming the first bad field, e.g.
    ``TrainConfig.milestones must be non-negative integers, strictly increasing, got (-1,)``.
    The learning rate must be > 0 (>= 0 with `zero_learning_rate_ok`)."""
    name = type(config).__name__
    check_int(f"{name}.epochs", config.epochs, 0)
    check_int(f"{name}.batch_size", config.batch_size, 1)
    check_real(
        f"{name}.learning_rate", config.learning_rate, 0.0, low_open=not zero_learning_rate_ok
    )
    check_real(f"{name}.momentum", config.momentum, 0.0, 1.0, high_open=True)
    check_real(f"{name}.weight_decay", config.weight_decay, 0.0)
    check_milestones(f"{name}.milestones", config.milestones)
    check_real(f"{name}.gamma", config.gamma, 0.0, low_open=True)
    check_int(f"{name}.crop_padding", config.crop_padding, 0)
    check_bool(f"{name}.flip", config.flip)


def check_images_uint8(name: str, images: Any) -> tuple[int, int, int, int]:
    """`images` is a uint8 array ``[N, H, W, C]`` (H, W, C > 0); returns its shape. Looks at the
    dtype and shape only (no pass over the pixels)."""
    dtype, shape = getattr(images, "dtype", None), getattr(images, "shape", None)
    if dtype is None or shape is None:
        raise ValueError(f"{name} must be a uint8 array [N, H, W, C], got {type(images).__name__}")
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"{name} must be uint8, got {np.dtype(dtype)}: {UINT8_HINT}")
    if len(shape) != 4 or min(shape[1:]) <= 0:
        raise ValueError(
            f"{name} must be 4-D [N, H, W, C] (one channel: [N, H, W, 1]), got shape {tuple(shape)}"
        )
    return tuple(int(d) for d in shape)


def check_same_image_shape(name: str, images: Any, reference_name: str, reference: Any) -> None:
    """`images` and `reference` (both checked 4-D) have the same H, W, C."""
    if tuple(images.shape[1:]) != tuple(reference.shape[1:]):
        raise ValueError(
            f"{name} are [H, W, C] = {tuple(images.shape[1:])}, but {reference_name} are "
            f"{tuple(reference.shape[1:])}"
        )


def check_labels(
    name: str, labels: Any, num_classes: int | None = None, length: int | None = None
) -> np.ndarray:
    """`labels` is a 1-D integer array of class ids in ``[0, num_classes)`` (``>= 0`` without
    `num_classes`), of `length` when given; returns it as a numpy array. One min/max pass."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {labels.shape}")
    if length is not None and len(labels) != length:
        raise ValueError(f"{name} has {len(labels)} entries, but there are {length} images")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            classes = "[0, inf)" if num_classes is None else f"[0, {num_classes})"
            raise ValueError(
                f"{name} must be class ids in {classes}, got values in [{low}, {high}]"
            )
    return labels


def check_indices(name: str, indices: Any, size: int, *, non_empty: bool = False) -> np.ndarray:
    """`indices` is a 1-D integer array of positions in ``[0, size)`` (at least one when
    `non_empty`); returns it as a numpy array. One min/max pass."""
    indices = np.asarray(indices)
    if indices.size == 0 and indices.dtype == np.float64 and not non_empty:
        indices = indices.astype(np.int64)  # np.array([]) is float: an empty list is fine
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{name} must be integer indices, got dtype {indices.dtype}")
    if indices.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {indices.shape}")
    if not indices.size:
        if non_empty:
            raise ValueError(f"{name} is empty: there is nothing to train on")
        return indices
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= size:
        raise ValueError(
            f"{name} must be in [0, {size}) (the number of images), got values in [{low}, {high}]"
        )
    return indices
