"""Shared fixtures: small in-memory data, run on CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from salun_jax.data import load_dataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ZIP = os.path.join(REPO, "..", "shared", "data", "cifar10_jpeg.zip")


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
