"""Shuffled, padded index batches, and batches gathered into stacked arrays."""

from __future__ import annotations

import logging
import math

import jax
import numpy as np

from salun_jax.types import BatchesFn

_logger = logging.getLogger(__name__)


def epoch_batches(
    indices: np.ndarray, batch_size: int, rng: np.random.Generator | None, num_devices: int = 1
) -> tuple[np.ndarray, np.ndarray]:
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


def warn_if_padded(num_examples: int, batch_size: int) -> None:
    """Logs a warning when one batch is larger than the whole set: every step then computes
    mostly padding (batch_size / num_examples times the work)."""
    if 0 < num_examples < batch_size:
        _logger.warning(
            "batch size %d is larger than the %d examples: each step pads them %.0fx; use a "
            "smaller batch size",
            batch_size,
            num_examples,
            batch_size / num_examples,
        )


def gather_batches(
    arrays: dict[str, np.ndarray],
    indices: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Stacks `arrays[name][batch]` for padded batches over `indices`: each value [S, B, ...],
    plus `weight` [S, B] (0 on padding). For jitted scans over a whole (small) set."""
    batch_indices, weights = epoch_batches(indices, batch_size, rng, num_devices=1)
    batch_indices, weights = batch_indices[:, 0], weights[:, 0]
    out = {name: np.asarray(values)[batch_indices] for name, values in arrays.items()}
    out["weight"] = weights
    return out


def cyclic_batches(
    indices: np.ndarray, batch_size: int, num_batches: int, rng: np.random.Generator
) -> np.ndarray:
    """[num_batches, batch_size] of `indices`: consecutive reshuffled passes over the set,
    concatenated (an infinite shuffled loader, as upstream's `cycle(loader)`; every batch full)."""
    indices = np.asarray(indices)
    if indices.size == 0:
        raise ValueError("cannot make batches from an empty index set")
    needed = num_batches * batch_size
    passes = [rng.permutation(indices.size) for _ in range(-(-needed // indices.size))]
    order = np.concatenate(passes)[:needed]
    return indices[order].reshape(num_batches, batch_size).astype(np.int32)


def index_batches(indices: np.ndarray, batch_size: int) -> BatchesFn:
    """The loop's batches: a fresh shuffle of `indices` each epoch, padded to full batches."""
    num_devices = jax.device_count()  # all processes'; each takes its rows (`loop.local_rows`)
    warn_if_padded(len(indices), batch_size)
    return lambda epoch, rng: epoch_batches(indices, batch_size, rng, num_devices)
