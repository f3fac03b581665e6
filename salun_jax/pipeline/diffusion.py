"""The SalUn generation pipeline: make a class-conditional DDPM forget one class.

Steps, each resumable from the work directory:
  1. the class-wise split (`split.npz`: forget = every train image of the class);
  2. the evaluation classifier on the same data (`classifier/`) and its test accuracy;
  3. the original DDPM (`original/`), and Retrain on the retained classes if in `run_methods`;
  4. the saliency mask of the forget class (`masks/forget_<c>_with_<f>.npz`);
  5. each unlearning method of `run_methods` (`unlearned/<method>/`, checkpointed by the loop);
  6. samples of every class (DDIM + CFG, the same noise for every model), classified: UA,
     per-class accuracy, FD in the classifier's features; grids in `grids/<method>.png`;
  7. `results.json` and `results.md`, after every model.
As functions, in order: `_prepare` (checks, config.json, split) -> `_start_results` ->
`_train_classifier` -> `_train_ddpms` (Original, Retrain) -> `_evaluate_trained` ->
`_unlearning_data` -> `_saliency_mask` -> `_unlearn` (each method, then `_evaluate`) ->
`_report`; each takes the checked run (`_Run`) and the results dict.

results.json:
    {"dataset", "forget_class", "num_classes", "image_shape", "split_hash", "config",
     "classifier": {"model", "test_accuracy", "FD_real_test"},
     "alpha", "effective_alpha_per_element",          # alpha * C*H*W (see losses.py)
     "mask": {"fraction", "ones", "size", "seconds", "path"},
     "methods": {name: {"UA", "forget_class_accuracy", "retain_accuracy",
                        "per_class_accuracy": {class: %}, "FD", "run_time_s",
                        "compile_time_s", "sampling_seconds", "num_samples_per_class",
                        "code", "model_code"}},  # code versions (see README)
     "wall_time_s"}                                   # of the last invocation
Percentages are in [0, 100]. `run_time_s` is the unlearning (Original/Retrain: training) time
without compilation. FD is a Frechet distance in the classifier's penultimate features between
real train images of the retained classes and samples of the retained classes; it is not FID.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from salun_jax import report, saliency
from salun_jax.data.augment import random_flip
from salun_jax.diffusion import linear_schedule
from salun_jax.evaluation.classification import make_predict_fn, model_accuracy, predict
from salun_jax.evaluation.generation import (
    classifier_frechet_distance,
    evaluate_samples,
    generate_samples,
    samples_per_class_labels,
    save_sample_grid,
)
from salun_jax.loop import TrainingDivergedError
from salun_jax.models import create_model
from salun_jax.models.unet import UNet
from salun_jax.pipeline.common import (
    UserError,
    build_split,
    check_config,
    is_primary,
    load_data,
    load_results,
    make_dataclass,
    overrides,
    save_split_once,
    write_config,
    write_results,
    write_text,
)
from salun_jax.pipeline.workdir import locked
from salun_jax.provenance import code_version
from salun_jax.train import TrainConfig, train_classifier
from salun_jax.train_diffusion import DiffusionTrainConfig, train_diffusion
from salun_jax.unlearn import MASKED_METHODS, METHODS, get_method
from salun_jax.unlearn.diffusion import (
    DiffusionTask,
    DiffusionUnlearnConfig,
    check_class,
    diffusion_saliency_scores,
    effective_alpha,
)

_logger = logging.getLogger(__name__)

FIXED_KEYS = (
    "dataset",
    "train_per_class",
    "test_per_class",
    "forget_class",
    "model",
    "diffusion",
    "train",
    "classifier",
)
ORDER = ("Original", "Retrain", "SalUn", "RL", "GA", "ESD")


def frozen_random_flip(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each image flipped left-right with probability 1/2, once: upstream builds D_f and D_r for
    the mask and unlearning with list comprehensions over a flipping dataset, so one random flip
    is applied and then frozen."""
    return np.asarray(random_flip(jax.random.key(seed), jnp.asarray(images)))


def results_markdown(results: dict) -> str:
    """The main table (UA, retained-class accuracy, FD, time) and the per-class accuracy table."""
    methods = [m for m in ORDER if m in results["methods"]]
    num_classes, forget = results["num_classes"], results["forget_class"]
    classifier = results["classifier"]
    fmt = report.format_number
    intro = (
        f"{results['dataset']}: class {forget} forgotten. Evaluation classifier "
        f"{classifier['model']}, test accuracy {classifier['test_accuracy']:.2f}%; FD = "
        f"Frechet distance in its penultimate features (not FID), real test vs real train "
        f"images: {fmt(classifier['FD_real_test'], 3)}. alpha = {results['alpha']:g} "
        f"(effective per-element weight alpha*C*H*W = "
        f"{results['effective_alpha_per_element']:.3g})."
    )
    main = report.markdown(
        [
            "Method",
            "UA (%)",
            "Forget-class acc. (%)",
            "Retained-class acc. (%)",
            "FD (classifier features)",
            "Run time (s)",
        ],
        [
            [
                m,
                fmt(r["UA"]),
                fmt(r["forget_class_accuracy"]),
                fmt(r["retain_accuracy"]),
                fmt(r["FD"], 3),
                fmt(r["run_time_s"], 1),
            ]
            for m, r in ((m, results["methods"][m]) for m in methods)
        ],
    )
    per_class = report.markdown(
        ["Method", *(f"{k}{' (forgotten)' if k == forget else ''}" for k in range(num_classes))],
        [
            [
                m,
                *(
                    fmt(results["methods"][m]["per_class_accuracy"][str(k)], 1)
                    for k in range(num_classes)
                ),
            ]
            for m in methods
        ],
    )
    return (
        f"{intro}\n\n{report.code_versions_note(results['methods'].values())}{main}\n"
        "Per-class accuracy of the classifier on samples generated for "
        f"each class (%):\n\n{per_class}"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs the pipeline; returns the markdown tables (also in `workdir/results.md`).

    Raises:
      UserError: a bad setting or data, or a diverged run (the message says which).
    """
    with locked(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> str:
    run = _prepare(config, workdir, wall_start=time.perf_counter())
    results = _start_results(run)
    judge = _train_classifier(run, results)  # 1. the evaluation classifier
    task, original, trained = _train_ddpms(run)  # 2. the original DDPM (and Retrain)
    _evaluate_trained(run, results, judge, trained)
    task = _unlearning_data(run, task)  # 3. the unlearning data and the saliency mask
    mask = _saliency_mask(run, results, original, task)
    _unlearn(run, results, judge, original, task, mask)  # 4. unlearning, each method
    return _report(run, results)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every stage reads: the config, the work directory, the data, the split and the
    models, fixed once `_prepare` has checked them (the results dict is passed on its own)."""

    config: ml_collections.ConfigDict
    workdir: str
    wall_start: float  # time.perf_counter() when the invocation started
    dataset: object
    split: object  # as saved in `workdir/split.npz`
    forget_class: int
    image_shape: tuple[int, ...]
    classifier: object  # the evaluation classifier's module
    classifier_config: TrainConfig
    model: UNet
    schedule: object
    train_config: DiffusionTrainConfig
    retrain_config: DiffusionTrainConfig
    method_configs: dict  # {method: DiffusionUnlearnConfig}, every run method but Retrain

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def results_path(self) -> str:
        return os.path.join(self.workdir, "results.json")


class _Judge(NamedTuple):
    """The trained evaluation classifier and the features of the real train images of the
    retained classes (FD's reference)."""

    predict_fn: object  # returns (logits, features)
    variables: object
    real_features: np.ndarray


def _prepare(config: ml_collections.ConfigDict, workdir: str, wall_start: float) -> _Run:
    """Checks everything that can be wrong with the config before anything is written; then
    writes config.json and the split."""
    unknown = [m for m in config.run_methods if m not in METHODS["diffusion"]]
    if unknown:
        raise UserError(f"unknown methods {unknown}; known: {', '.join(METHODS['diffusion'])}")
    check_config(workdir, config, FIXED_KEYS)
    dataset = load_data(config)
    try:
        forget_class = check_class(config.forget_class, dataset.num_classes)
    except ValueError as error:
        raise UserError(str(error)) from error
    split = build_split(
        dataset,
        dict(
            scenario="class",
            forget_class=forget_class,
            val_fraction=0.0,
            drop_forget_class_from_test=True,
        ),
    )
    classifier_config = make_dataclass(TrainConfig, config.classifier.to_dict(), "classifier")
    train_config = make_dataclass(DiffusionTrainConfig, config.train.to_dict(), "diffusion train")
    retrain_config = dataclasses.replace(
        train_config, **{"seed": train_config.seed + 1000, **overrides(config.retrain)}
    )
    method_configs = {
        m: make_dataclass(
            DiffusionUnlearnConfig,
            {**config.unlearn.to_dict(), **config.methods.get(m, {})},
            f"unlearning ({m})",
        )
        for m in config.run_methods
        if m != "Retrain"
    }
    image_shape = tuple(int(d) for d in dataset.train_images.shape[1:])
    classifier, model, schedule = _build_models(config, dataset, classifier_config, image_shape)
    write_config(workdir, config)
    split = save_split_once(workdir, dataset, split)
    return _Run(
        config=config,
        workdir=workdir,
        wall_start=wall_start,
        dataset=dataset,
        split=split,
        forget_class=forget_class,
        image_shape=image_shape,
        classifier=classifier,
        classifier_config=classifier_config,
        model=model,
        schedule=schedule,
        train_config=train_config,
        retrain_config=retrain_config,
        method_configs=method_configs,
    )


def _build_models(config, dataset, classifier_config: TrainConfig, image_shape: tuple) -> tuple:
    """The evaluation classifier's module, the UNet and the noise schedule."""
    try:
        classifier = create_model(
            classifier_config.model,
            dataset.num_classes,
            dataset.mean,
            dataset.std,
            classifier_config.width,
        )
        model = UNet(
            num_classes=dataset.num_classes,
            image_size=image_shape[0],
            out_channels=image_shape[2],
            **{k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()},
        )
        schedule = linear_schedule(**config.diffusion.to_dict())
    except (TypeError, ValueError) as error:
        raise UserError(f"bad model config: {error}") from error
    return classifier, model, schedule


def _start_results(run: _Run) -> dict:
    """results.json as a previous invocation left it (its finished methods are skipped), with
    this run's description."""
    results = load_results(run.results_path, {"methods": {}})
    results.update(
        dataset=run.dataset.name,
        forget_class=run.forget_class,
        num_classes=run.num_classes,
        image_shape=list(run.image_shape),
        split_hash=run.split.hash,
        config=run.config.to_dict(),
    )
    return results


def _save(run: _Run, results: dict) -> None:
    results["wall_time_s"] = time.perf_counter() - run.wall_start
    write_results(run.results_path, results)


def _train_classifier(run: _Run, results: dict) -> _Judge:
    """The evaluation classifier, trained (or restored from `classifier/`) on the same train
    images; its test accuracy and the real test-vs-train FD go to results["classifier"]."""
    dataset, split = run.dataset, run.split
    images = dataset.train_images
    try:
        state = train_classifier(
            images,
            dataset.train_labels,
            split.train,
            run.classifier,
            run.classifier_config,
            workdir=os.path.join(run.workdir, "classifier"),
            desc="classifier",
        ).state
    except TrainingDivergedError as error:
        raise UserError(str(error)) from error
    variables = state.variables
    predict_fn = make_predict_fn(run.classifier.apply, return_features=True)
    _, real_features = predict(predict_fn, variables, images[split.retain])
    _, test_features = predict(predict_fn, variables, dataset.test_images[split.test])
    results["classifier"] = {
        "model": f"{run.classifier_config.model} x{run.classifier_config.width}",
        "test_accuracy": model_accuracy(
            make_predict_fn(run.classifier.apply),
            variables,
            dataset.test_images,
            dataset.test_labels,
        ),
        "FD_real_test": classifier_frechet_distance(real_features, test_features),
    }
    _logger.info("classifier: %s", results["classifier"])
    return _Judge(predict_fn, variables, real_features)


def _train_ddpms(run: _Run) -> tuple:
    """The original DDPM and (if in `run_methods`) Retrain, on the train images as they are;
    returns the unlearning task and the trained models ({"Original": .., "Retrain": ..})."""
    config, dataset = run.config, run.dataset
    images, labels = dataset.train_images, dataset.train_labels
    task = DiffusionTask(run.model, images, labels, run.split, run.num_classes, run.schedule)
    checkpoint_every = config.checkpoint_every
    try:
        original = train_diffusion(
            images,
            labels,
            run.split.train,
            run.model,
            run.schedule,
            run.train_config,
            workdir=os.path.join(run.workdir, "original"),
            desc="original",
            checkpoint_every=checkpoint_every,
        )
        trained = {"Original": original}
        if "Retrain" in config.run_methods:
            trained["Retrain"] = get_method("Retrain", "diffusion")(
                None,
                task,
                run.retrain_config,
                None,
                workdir=os.path.join(run.workdir, "retrain"),
                checkpoint_every=checkpoint_every,
            )
    except TrainingDivergedError as error:
        raise UserError(str(error)) from error
    except ValueError as error:
        raise UserError(str(error)) from error
    return task, original, trained


def _evaluate_trained(run: _Run, results: dict, judge: _Judge, trained: dict) -> None:
    """Samples and evaluates Original and Retrain, unless results.json has them."""
    use_ema = run.config.sample.use_ema
    for name, out in trained.items():
        if name not in results["methods"]:
            params = (
                out.state.ema_params
                if use_ema and out.state.ema_params is not None
                else out.state.params
            )
            _evaluate(
                run, results, judge, name, params, out.run_seconds, out.compile_seconds, out.code
            )


def _evaluate(
    run: _Run,
    results: dict,
    judge: _Judge,
    name: str,
    params,
    run_time_s: float,
    compile_time_s: float,
    model_code: str = "",
) -> None:
    """Samples every class (the same noise for every model), classifies the samples, saves
    `grids/<name>.png` and the metrics as results["methods"][name]."""
    sample, num_classes = run.config.sample, run.num_classes
    sample_labels = samples_per_class_labels(num_classes, sample.num_per_class)
    start = time.perf_counter()
    samples = generate_samples(
        run.model.apply,
        params,
        run.schedule,
        sample_labels,
        jax.random.key(sample.seed),
        image_shape=run.image_shape,
        num_steps=sample.num_steps or None,
        eta=sample.eta,
        guidance_scale=sample.guidance_scale,
        batch_size=sample.batch_size,
    )
    sampling_seconds = time.perf_counter() - start
    metrics = evaluate_samples(
        judge.predict_fn,
        judge.variables,
        samples,
        sample_labels,
        run.forget_class,
        num_classes,
        judge.real_features,
    )
    metrics.update(
        code=code_version(),
        model_code=model_code,
        run_time_s=run_time_s,
        compile_time_s=compile_time_s,
        sampling_seconds=sampling_seconds,
        num_samples_per_class=int(sample.num_per_class),
    )
    save_sample_grid(
        samples,
        sample_labels,
        os.path.join(run.workdir, "grids", f"{name}.png"),
        num_classes=num_classes,
        per_class=sample.grid_per_class,
        scale=sample.grid_scale,
        row_labels=[
            f"{run.dataset.class_names[k]} (forgotten)"
            if k == run.forget_class
            else run.dataset.class_names[k]
            for k in range(num_classes)
        ],
        title=f"{name}, forget class {run.dataset.class_names[run.forget_class]}",
    )
    results["methods"][name] = metrics
    _save(run, results)
    _logger.info(
        "%s: UA %.2f, retained acc %.2f, FD %s, %.1f s",
        name,
        metrics["UA"],
        metrics["retain_accuracy"],
        metrics["FD"],
        run_time_s,
    )


def _unlearning_data(run: _Run, task: DiffusionTask) -> DiffusionTask:
    """D_f and D_r of upstream's runner are built once over a flipping data set, so with
    `frozen_flip` a random flip is applied and frozen."""
    if run.config.frozen_flip:
        return dataclasses.replace(task, images=frozen_random_flip(run.dataset.train_images))
    return task


def _saliency_mask(run: _Run, results: dict, original, task: DiffusionTask):
    """The saliency mask of the forget class if a run method uses one (else None), loaded from
    `masks/` or computed from the original's raw params (then results["mask"])."""
    if not any(m in MASKED_METHODS for m in run.config.run_methods):
        return None
    mask_config = run.config.mask
    mask_path = os.path.join(
        run.workdir, "masks", f"forget_{run.forget_class}_with_{mask_config.fraction:.2f}.npz"
    )
    mask = None
    if os.path.exists(mask_path):
        try:
            mask = saliency.load_mask(mask_path, original.state.params)
        except saliency.MaskMismatchError as error:  # a derived file: make it again
            _logger.warning("%s; computing the mask again", error)
            os.replace(mask_path, f"{mask_path}.unreadable")
    if mask is not None:
        return mask
    start = time.perf_counter()
    try:
        scores = diffusion_saliency_scores(
            original.state,
            task,
            batch_size=mask_config.batch_size,
            guidance_scale=mask_config.guidance_scale,
            clip_norm=mask_config.clip_norm or None,
            seed=mask_config.seed,
        )
    except ValueError as error:
        raise UserError(str(error)) from error
    mask = saliency.mask_from_scores(jax.device_get(scores), mask_config.fraction)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    if is_primary():
        saliency.save_mask(mask_path, mask)
    stats = saliency.mask_stats(mask)
    results["mask"] = {
        "fraction": stats["fraction"],
        "ones": stats["ones"],
        "size": stats["size"],
        "seconds": time.perf_counter() - start,
        "path": os.path.relpath(mask_path, run.workdir),
    }
    _save(run, results)
    return mask


def _unlearn(run: _Run, results: dict, judge: _Judge, original, task, mask) -> None:
    """Each unlearning method not yet in results.json, from the original's raw params
    (`unlearned/<method>/`), then sampled and evaluated."""
    config = run.config
    results["alpha"] = float(config.unlearn.alpha)
    results["effective_alpha_per_element"] = effective_alpha(config.unlearn.alpha, run.image_shape)
    for method in config.run_methods:
        if method == "Retrain" or method in results["methods"]:
            continue
        method_config = run.method_configs[method]
        try:
            output = get_method(method, "diffusion")(
                original.state,
                task,
                method_config,
                jax.random.key(method_config.seed),
                mask=mask if method in MASKED_METHODS else None,
                workdir=os.path.join(run.workdir, "unlearned", method),
            )
        except TrainingDivergedError as error:
            raise UserError(str(error)) from error
        except ValueError as error:
            raise UserError(f"{method}: {error}") from error
        _evaluate(
            run,
            results,
            judge,
            method,
            output.state.params,
            output.run_seconds,
            output.compile_seconds,
        )


def _report(run: _Run, results: dict) -> str:
    """results.json (with this invocation's wall time) and results.md; returns the tables."""
    _save(run, results)
    table = results_markdown(results)
    write_text(os.path.join(run.workdir, "results.md"), table)
    return table
