"""Unlearning methods: a registry from name to `fn(state, task, config, rng, mask=None)` returning
an `UnlearnOutput` (the unlearned state, compile and run seconds, per-epoch metrics).

Retrain is not in the registry: it trains from scratch (`salun_jax.train.train_classifier` on the
retain set); the pipeline runs it.
"""

from __future__ import annotations

from collections.abc import Callable

from salun_jax.unlearn.boundary import boundary_expanding, boundary_shrink
from salun_jax.unlearn.common import UnlearnConfig, UnlearnOutput, UnlearnTask
from salun_jax.unlearn.finetune import fine_tune, gradient_ascent, l1_sparse
from salun_jax.unlearn.influence import influence_unlearning
from salun_jax.unlearn.relabel import random_label, salun, salun_soft

METHODS: dict[str, Callable[..., UnlearnOutput]] = {
    "FT": fine_tune,
    "GA": gradient_ascent,
    "RL": random_label,
    "IU": influence_unlearning,
    "l1-sparse": l1_sparse,
    "BS": boundary_shrink,
    "BE": boundary_expanding,
    "SalUn": salun,
    "SalUn-soft": salun_soft,
}
MASKED_METHODS = ("SalUn",)


def get_method(name: str) -> Callable[..., UnlearnOutput]:
    """Raises ValueError for an unknown name, listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; known: {', '.join(METHODS)}, "
                         "Retrain")
    return METHODS[name]


__all__ = ["MASKED_METHODS", "METHODS", "UnlearnConfig", "UnlearnOutput", "UnlearnTask",
           "get_method"]
