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

import importlib
import importlib.util
import sys
from types import ModuleType as _ModuleType  # `types`: salun_jax.types once imported

from salun_jax.version import __version__

# name -> the module that defines it. Imported on first use (PEP 562), so `import salun_jax` and
# the command line's --help stay light (no JAX until a name that needs it is used).
_API = {
    "population": "salun_jax.population",
    "tuning": "salun_jax.tuning",
    "load_dataset": "salun_jax.data",
    **dict.fromkeys(("Split", "load_split", "make_split", "save_split"), "salun_jax.data.splits"),
    "evaluate": "salun_jax.evaluation.classification",
    **dict.fromkeys(
        ("RunOutput", "StaleRunError", "TrainingDivergedError", "run"), "salun_jax.loop"
    ),
    "create_model": "salun_jax.models",
    **dict.fromkeys(
        ("make_adam", "make_sgd", "multistep_schedule", "multistep_sgd", "saliency_masked"),
        "salun_jax.optim",
    ),
    **dict.fromkeys(
        (
            "gradient_saliency",
            "load_mask",
            "mask_from_scores",
            "mask_stats",
            "mask_sweep",
            "salun_mask",
            "save_mask",
        ),
        "salun_jax.saliency",
    ),
    **dict.fromkeys(("TrainState", "create_train_state", "make_step"), "salun_jax.step"),
    **dict.fromkeys(("TrainConfig", "train_classifier"), "salun_jax.train"),
    **dict.fromkeys(
        (
            "DiffusionTask",
            "DiffusionUnlearnConfig",
            "SDTask",
            "SDUnlearnConfig",
            "UnlearnConfig",
            "UnlearnOutput",
            "UnlearnTask",
            "get_method",
            "method_key",
            "unlearn",
        ),
        "salun_jax.unlearn",
    ),
    # A finished pipeline run, back from its work directory.
    **dict.fromkeys(("load_run", "evaluate_run"), "salun_jax.pipeline.runs"),
}


class _Package(_ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing a submodule binds it on its package: `salun_jax.unlearn` stays the function
        # (`sj.unlearn(...)`), not the subpackage of the same name.
        if name == "unlearn" and isinstance(value, _ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f"{__name__}.{name}")  # a submodule: sj.saliency
        raise AttributeError(f"module 'salun_jax' has no attribute {name!r}")
    if name in ("population", "tuning"):  # submodules
        return importlib.import_module(module)
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


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
