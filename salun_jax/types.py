"""Type aliases shared across the library."""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

PyTree = Any  # a nested structure of arrays (params, optimizer states, masks, batches)

# A training loss: (params, batch, rng, model state) -> (scalar loss, aux dict with the updated
# BatchNorm statistics); a mask loss: the scalar (params, batch, rng).
LossFn = Callable[[PyTree, dict, jax.Array, Any], tuple[jax.Array, dict]]
BatchLossFn = Callable[[PyTree, dict, jax.Array], jax.Array]

# An epoch's batches: (indices, weights): indices [S, D, B/D] int32, or {stream: [S, D, B/D]} for
# paired batches (stream "" gives the data's own keys, stream "retain" gives "retain_image",
# ...); weights [S, D, B/D] float32 (0 on padding). A batches function gives them for an epoch.
EpochBatches = tuple[np.ndarray | dict[str, np.ndarray], np.ndarray]
BatchesFn = Callable[[int, np.random.Generator], EpochBatches]
