"""Evaluation of unlearning: predictions and UA/RA/TA, MIA-Efficacy (SVC attack), Avg. Gap, and
the generation metrics of the DDPM (`generation`)."""

from salun_jax.evaluation.classification import (
    evaluate_unlearning,
    make_predict_fn,
    model_accuracy,
    predict,
)
from salun_jax.evaluation.metrics import METRIC_KEYS, accuracy, avg_gap, gaps
from salun_jax.evaluation.mia import (
    FEATURE_KINDS,
    from_logits,
    loss_mia,
    m_entropy_upstream,
    mia_features,
    stratified_shadow_indices,
    svc_mia,
)

__all__ = [
    "FEATURE_KINDS",
    "METRIC_KEYS",
    "accuracy",
    "avg_gap",
    "evaluate_unlearning",
    "from_logits",
    "gaps",
    "loss_mia",
    "m_entropy_upstream",
    "make_predict_fn",
    "mia_features",
    "model_accuracy",
    "predict",
    "stratified_shadow_indices",
    "svc_mia",
]
