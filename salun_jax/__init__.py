"""salun_jax: SalUn (gradient-based weight saliency for machine unlearning) in JAX/Flax.

Stable API: data loading and splits, models, the training step and loop, saliency masks, the
mask-aware optimizers, the unlearning methods and their evaluation. See README.md.
"""

from salun_jax.data import load_dataset
from salun_jax.data.splits import Split, load_split, make_split, save_split
from salun_jax.models import create_model
from salun_jax.optim import make_adam, make_sgd, multistep_schedule, saliency_masked
from salun_jax.saliency import (
    gradient_saliency,
    load_mask,
    mask_from_scores,
    mask_stats,
    mask_sweep,
    save_mask,
)
from salun_jax.train import TrainConfig, TrainState, fit, make_train_step, train_classifier

__all__ = [
    "Split",
    "TrainConfig",
    "TrainState",
    "create_model",
    "fit",
    "gradient_saliency",
    "load_dataset",
    "load_mask",
    "load_split",
    "make_adam",
    "make_sgd",
    "make_split",
    "make_train_step",
    "mask_from_scores",
    "mask_stats",
    "mask_sweep",
    "multistep_schedule",
    "saliency_masked",
    "save_mask",
    "save_split",
    "train_classifier",
]
__version__ = "0.1.0"
