"""salun_jax: SalUn (gradient-based weight saliency for machine unlearning) in JAX/Flax.

The paper's pipeline, one call a step (see README.md):

    data = load_dataset("digits")
    split = make_split(data.train_labels, data.test_labels, forget_fraction=0.1)
    model = create_model("small_cnn", data.num_classes, data.mean, data.std)
    original = train_classifier(data.train_images, data.train_labels, split.train, model,
                                TrainConfig(model="small_cnn", epochs=20, batch_size=64)).state
    task = UnlearnTask(model, data.train_images, data.train_labels, split, data.num_classes)
    config = UnlearnConfig(epochs=5)
    mask = salun_mask(original, task, fraction=0.5, config=config)
    unlearned = unlearn("SalUn", original, task, config, mask=mask).state
    metrics = evaluate(unlearned, task, data.test_images, data.test_labels)
"""

from salun_jax import population, tuning
from salun_jax.data import load_dataset
from salun_jax.data.splits import Split, load_split, make_split, save_split
from salun_jax.evaluation.classification import evaluate
from salun_jax.loop import RunOutput, StaleRunError, TrainingDivergedError, run
from salun_jax.models import create_model
from salun_jax.optim import (
    make_adam,
    make_sgd,
    multistep_schedule,
    multistep_sgd,
    saliency_masked,
)
from salun_jax.saliency import (
    gradient_saliency,
    load_mask,
    mask_from_scores,
    mask_stats,
    mask_sweep,
    salun_mask,
    save_mask,
)
from salun_jax.step import TrainState, create_train_state, make_step
from salun_jax.train import TrainConfig, train_classifier
from salun_jax.unlearn import (
    DiffusionTask,
    DiffusionUnlearnConfig,
    SDTask,
    SDUnlearnConfig,
    UnlearnConfig,
    UnlearnOutput,
    UnlearnTask,
    get_method,
    method_key,
    unlearn,
)
from salun_jax.version import __version__


def __getattr__(name: str):
    # A finished pipeline run, back from its work directory (imported on first use: it brings the
    # pipeline's configs and data loading).
    if name in ("load_run", "evaluate_run"):
        from salun_jax.pipeline import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'salun_jax' has no attribute {name!r}")


__all__ = [
    "population",
    "tuning",
    "__version__",
    "DiffusionTask",
    "DiffusionUnlearnConfig",
    "RunOutput",
    "SDTask",
    "SDUnlearnConfig",
    "Split",
    "StaleRunError",
    "TrainConfig",
    "TrainState",
    "TrainingDivergedError",
    "UnlearnConfig",
    "UnlearnOutput",
    "UnlearnTask",
    "create_model",
    "create_train_state",
    "evaluate",
    "evaluate_run",
    "get_method",
    "gradient_saliency",
    "load_dataset",
    "load_mask",
    "load_run",
    "load_split",
    "make_adam",
    "make_sgd",
    "make_split",
    "make_step",
    "mask_from_scores",
    "method_key",
    "mask_stats",
    "mask_sweep",
    "multistep_schedule",
    "multistep_sgd",
    "run",
    "saliency_masked",
    "salun_mask",
    "save_mask",
    "save_split",
    "train_classifier",
    "unlearn",
]
