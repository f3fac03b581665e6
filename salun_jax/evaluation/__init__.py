"""Evaluation of unlearning: accuracies (UA/RA/TA), MIA-Efficacy (SVC attack), Avg. Gap, timing."""

from salun_jax.evaluation.metrics import (
    METRIC_KEYS,
    Stopwatch,
    Timer,
    accuracy,
    avg_gap,
    gaps,
    timed,
    unlearning_metrics,
)
from salun_jax.evaluation.mia import (
    FEATURE_KINDS,
    from_logits,
    loss_mia,
    m_entropy_upstream,
    mia_efficacy,
    mia_features,
    stratified_shadow_indices,
    svc_mia,
)

__all__ = [
    "FEATURE_KINDS",
    "METRIC_KEYS",
    "Stopwatch",
    "Timer",
    "accuracy",
    "avg_gap",
    "from_logits",
    "gaps",
    "loss_mia",
    "m_entropy_upstream",
    "mia_efficacy",
    "mia_features",
    "stratified_shadow_indices",
    "svc_mia",
    "timed",
    "unlearning_metrics",
]
