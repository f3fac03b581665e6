"""Shuffled, padded index batches, and batches gathered into stacked arrays."""

from __future__ import annotations

import math

import numpy as np


def epoch_batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                  num_devices: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled batches over `indices`, the last partial batch padded (weight 0) to full size.

    Returns:
      (batch indices [S, D, B/D] int32, weights [S, D, B/D] float32).
    """
    indices = np.asarray(indices)
    if indices.size == 0:
        raise ValueError("cannot make batches from an empty index set")
    if batch_size % num_devices:
        raise ValueError(f"batch size {batch_size} is not divisible by {num_devices} devices")
    order = rng.permutation(indices) if rng is not None else indices
    steps = math.ceil(order.size / batch_size)
    pad = steps * batch_size - order.size
    padded = np.concatenate([order, np.resize(order, pad)]) if pad else order
    weights = np.ones(padded.size, np.float32)
    if pad:
        weights[-pad:] = 0.0
    shape = (steps, num_devices, batch_size // num_devices)
    return padded.reshape(shape).astype(np.int32), weights.reshape(shape)


def gather_batches(arrays: dict[str, np.ndarray], indices: np.ndarray, batch_size: int,
                   rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Stacks `arrays[name][batch]` for padded batches over `indices`: each value [S, B, ...],
    plus `weight` [S, B] (0 on padding). For jitted scans over a whole (small) set."""
    batch_indices, weights = epoch_batches(indices, batch_size, rng, num_devices=1)
    batch_indices, weights = batch_indices[:, 0], weights[:, 0]
    out = {name: np.asarray(values)[batch_indices] for name, values in arrays.items()}
    out["weight"] = weights
    return out
