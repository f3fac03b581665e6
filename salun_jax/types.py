"""Type aliases shared across the library."""

from typing import Any

PyTree = Any  # a nested structure of arrays (params, optimizer states, masks, batches)
