"""Data: in-memory data sets (sources)."""

from salun_jax.data.sources import DATASET_STATS as DATASET_STATS
from salun_jax.data.sources import Dataset as Dataset
from salun_jax.data.sources import load_dataset as load_dataset
from salun_jax.data.sources import subset_per_class as subset_per_class
