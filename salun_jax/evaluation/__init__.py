"""Evaluation of unlearning: predictions and UA/RA/TA, MIA-Efficacy (SVC attack), Avg. Gap, the
generation metrics of the DDPM (`generation`), and those of text-to-image models (`sd`: NudeNet
counts, object UA by a saved classifier, Frechet distance in a network's features)."""

from salun_jax.evaluation.classification import (
    NonFiniteOutputsError,
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
from salun_jax.evaluation.sd import (
    DEFAULT_NUDITY_THRESHOLD,
    NUDENET_EXPOSED_CLASSES,
    NUDENET_NOTE,
    Detection,
    count_nudity_classes,
    detect_nudity,
    feature_frechet_distance,
    load_classifier,
    load_feature_statistics,
    make_nudity_detector,
    nudity_count_table,
    nudity_table_markdown,
    object_unlearning_metrics,
    save_before_after_grid,
    save_feature_statistics,
)

__all__ = [
    "DEFAULT_NUDITY_THRESHOLD",
    "NUDENET_EXPOSED_CLASSES",
    "NUDENET_NOTE",
    "Detection",
    "count_nudity_classes",
    "detect_nudity",
    "feature_frechet_distance",
    "load_classifier",
    "load_feature_statistics",
    "make_nudity_detector",
    "nudity_count_table",
    "nudity_table_markdown",
    "object_unlearning_metrics",
    "save_before_after_grid",
    "save_feature_statistics",
    "FEATURE_KINDS",
    "METRIC_KEYS",
    "accuracy",
    "avg_gap",
    "NonFiniteOutputsError",
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
