"""Training a classifier from scratch: the original model and Retrain (SGD + multi-step LR).

References: upstream `Classification/main_train.py` (182 epochs, SGD 0.1, momentum 0.9, weight decay
5e-4, milestones 91/136); Retrain is the same recipe on D_r (upstream `unlearn/retrain.py`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np

from salun_jax import loop, optim, provenance, validation
from salun_jax.data.batches import index_batches
from salun_jax.losses import classification_loss
from salun_jax.step import TrainState, create_train_state, make_step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of (re)training a classifier from scratch."""

    model: str = "resnet18"
    width: float = 1.0
    epochs: int = 182
    batch_size: int = 256
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (91, 136)
    gamma: float = 0.1
    crop_padding: int = 4
    flip: bool = True
    # Init, keys and batch order; make_split's default seed, as the pipeline trains the original
    # model of split seed s with seed s.
    seed: int = 1

    def __post_init__(self):
        validation.check_sgd_config(self)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"TrainConfig.model must be a model name, got {self.model!r}")
        validation.check_real("TrainConfig.width", self.width, 0.0, low_open=True)
        validation.check_int("TrainConfig.seed", self.seed)


def check_training_data(
    images: np.ndarray, labels: np.ndarray, train_indices: np.ndarray, model: nn.Module
) -> None:
    """`train_classifier`'s data checks (see its Raises)."""
    n = validation.check_images_uint8("images", images)[0]
    num_classes = getattr(model, "num_classes", None)
    validation.check_labels(
        "labels", labels, num_classes if isinstance(num_classes, int) else None, n
    )
    validation.check_indices("train_indices", train_indices, n, non_empty=True)


def training_optimizer(config: TrainConfig, num_examples: int, learning_rate: float | None = None):
    """The optimizer of classifier training on `num_examples` examples: multi-step SGD with every
    value in its state, so seeds, Retrain and population members share the compiled step.
    `learning_rate` overrides the config's (a population member's own)."""
    return optim.multistep_sgd(
        config.learning_rate if learning_rate is None else learning_rate,
        config.milestones,
        config.gamma,
        math.ceil(num_examples / config.batch_size),
        config.momentum,
        config.weight_decay,
    )


def training_loss(config: TrainConfig):
    """The loss of classifier training: cross-entropy with the config's augmentation."""
    return classification_loss(crop_padding=config.crop_padding, flip=config.flip)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    train_indices: np.ndarray,
    model: nn.Module,
    config: TrainConfig,
    workdir: str | None = None,
    eval_fn: Callable[[TrainState], dict] | None = None,
    progress: bool = True,
    desc: str = "train",
    order_seed: int | None = None,
) -> loop.RunOutput:
    """Trains `model` from a fresh init on `images[train_indices]` with SGD + multi-step LR.

    Resumes from `workdir` if it holds checkpoints of this run. The batch order comes from
    `order_seed` (default: `config.seed`, which also seeds the init and the keys); a population
    member (`salun_jax.population`) equals this run with the population's order seed.

    Raises:
      ValueError: a bad argument (checked before any work): `images` not uint8 [N, H, W, C]
        (0..255, as `load_dataset` gives them; see `salun_jax.validation`), `labels` not integer
        class ids in [0, K) (K: the model's `num_classes`) of one per image, `train_indices`
        empty or outside [0, N), or `config` not a `TrainConfig`.
      salun_jax.loop.TrainingDivergedError: the loss became non-finite.
    """
    check_training_data(images, labels, train_indices, model)
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if order_seed is not None:
        validation.check_int("order_seed", order_seed)
    tx = training_optimizer(config, len(train_indices))
    order_seed = config.seed if order_seed is None else order_seed
    fingerprint = None
    if workdir is not None:  # what made the run, checked before its checkpoints are resumed
        fingerprint = {
            "settings": provenance.fingerprint(config=config, model=repr(model), order=order_seed),
            "data": provenance.fingerprint(images=images, labels=labels),
            "indices": provenance.fingerprint(indices=np.asarray(train_indices)),
            "code": provenance.code_version(),
        }
    state = create_train_state(model, jax.random.key(config.seed), images.shape[1:], tx)
    step = make_step(training_loss(config))
    return loop.run(
        state,
        step,
        {"image": images, "label": labels},
        index_batches(train_indices, config.batch_size),
        num_epochs=config.epochs,
        key=jax.random.key(config.seed),
        seed=order_seed,
        workdir=workdir,
        eval_fn=eval_fn,
        progress=progress,
        desc=desc,
        fingerprint=fingerprint,
    )
