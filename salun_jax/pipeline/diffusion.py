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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from salun_jax import report, saliency
from salun_jax.data.augment import random_flip
from salun_jax.diffusion import linear_schedule
from salun_jax.diffusion.training import DiffusionTrainConfig, train_diffusion
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
from salun_jax.unlearn import MASKED_METHODS, METHODS, get_method
from salun_jax.unlearn.diffusion import (
    DiffusionTask,
    DiffusionUnlearnConfig,
    check_class,
    diffusion_saliency_scores,
    effective_alpha,
)

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
    # Everything that can be wrong with the config is checked before anything is written.
    wall_start = time.perf_counter()
    unknown = [m for m in config.run_methods if m not in METHODS["diffusion"]]
    if unknown:
        raise UserError(f"unknown methods {unknown}; known: {', '.join(METHODS['diffusion'])}")
    check_config(workdir, config, FIXED_KEYS)
    dataset = load_data(config)
    num_classes = dataset.num_classes
    try:
        forget_class = check_class(config.forget_class, num_classes)
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
    try:
        classifier = create_model(
            classifier_config.model, num_classes, dataset.mean, dataset.std, classifier_config.width
        )
        model = UNet(
            num_classes=num_classes,
            image_size=image_shape[0],
            out_channels=image_shape[2],
            **{k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()},
        )
        schedule = linear_schedule(**config.diffusion.to_dict())
    except (TypeError, ValueError) as error:
        raise UserError(f"bad model config: {error}") from error
    write_config(workdir, config)
    split = save_split_once(workdir, dataset, split)
    images, labels = dataset.train_images, dataset.train_labels
    test_images, test_labels = dataset.test_images, dataset.test_labels
    results_path = os.path.join(workdir, "results.json")
    results = load_results(results_path, {"methods": {}})
    results.update(
        dataset=dataset.name,
        forget_class=forget_class,
        num_classes=num_classes,
        image_shape=list(image_shape),
        split_hash=split.hash,
        config=config.to_dict(),
    )

    def save():
        results["wall_time_s"] = time.perf_counter() - wall_start
        write_results(results_path, results)

    def diverged(error):
        return UserError(str(error))

    # 1. The evaluation classifier, trained on the same (train) images.
    try:
        classifier_state = train_classifier(
            images,
            labels,
            split.train,
            classifier,
            classifier_config,
            workdir=os.path.join(workdir, "classifier"),
            desc="classifier",
        ).state
    except TrainingDivergedError as error:
        raise diverged(error) from error
    classifier_variables = classifier_state.variables
    predict_fn = make_predict_fn(classifier.apply, return_features=True)
    _, real_features = predict(predict_fn, classifier_variables, images[split.retain])
    _, test_features = predict(predict_fn, classifier_variables, test_images[split.test])
    results["classifier"] = {
        "model": f"{classifier_config.model} x{classifier_config.width}",
        "test_accuracy": model_accuracy(
            make_predict_fn(classifier.apply), classifier_variables, test_images, test_labels
        ),
        "FD_real_test": classifier_frechet_distance(real_features, test_features),
    }
    logging.info("classifier: %s", results["classifier"])

    # 2. The original DDPM and (optionally) Retrain, on the train images as they are.
    task = DiffusionTask(model, images, labels, split, num_classes, schedule)
    checkpoint_every = config.checkpoint_every
    try:
        original = train_diffusion(
            images,
            labels,
            split.train,
            model,
            schedule,
            train_config,
            workdir=os.path.join(workdir, "original"),
            desc="original",
            checkpoint_every=checkpoint_every,
        )
        trained = {"Original": original}
        if "Retrain" in config.run_methods:
            trained["Retrain"] = get_method("Retrain", "diffusion")(
                None,
                task,
                retrain_config,
                None,
                workdir=os.path.join(workdir, "retrain"),
                checkpoint_every=checkpoint_every,
            )
    except TrainingDivergedError as error:
        raise diverged(error) from error
    except ValueError as error:
        raise UserError(str(error)) from error

    sample = config.sample
    sample_labels = samples_per_class_labels(num_classes, sample.num_per_class)

    def evaluate(name: str, params, run_time_s: float, compile_time_s: float, model_code=""):
        start = time.perf_counter()
        samples = generate_samples(
            model.apply,
            params,
            schedule,
            sample_labels,
            jax.random.key(sample.seed),
            image_shape=image_shape,
            num_steps=sample.num_steps or None,
            eta=sample.eta,
            guidance_scale=sample.guidance_scale,
            batch_size=sample.batch_size,
        )
        sampling_seconds = time.perf_counter() - start
        metrics = evaluate_samples(
            predict_fn,
            classifier_variables,
            samples,
            sample_labels,
            forget_class,
            num_classes,
            real_features,
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
            os.path.join(workdir, "grids", f"{name}.png"),
            num_classes=num_classes,
            per_class=sample.grid_per_class,
            scale=sample.grid_scale,
        )
        results["methods"][name] = metrics
        save()
        logging.info(
            "%s: UA %.2f, retained acc %.2f, FD %s, %.1f s",
            name,
            metrics["UA"],
            metrics["retain_accuracy"],
            metrics["FD"],
            run_time_s,
        )

    for name, out in trained.items():
        if name not in results["methods"]:
            params = (
                out.state.ema_params
                if sample.use_ema and out.state.ema_params is not None
                else out.state.params
            )
            evaluate(name, params, out.run_seconds, out.compile_seconds, out.code)

    # 3. The saliency mask and the unlearning data: D_f and D_r of upstream's runner are built
    # once over a flipping data set, so with `frozen_flip` a random flip is applied and frozen.
    if config.frozen_flip:
        task = dataclasses.replace(task, images=frozen_random_flip(images))
    mask = None
    if any(m in MASKED_METHODS for m in config.run_methods):
        mask_config = config.mask
        mask_path = os.path.join(
            workdir, "masks", f"forget_{forget_class}_with_{mask_config.fraction:.2f}.npz"
        )
        if os.path.exists(mask_path):
            try:
                mask = saliency.load_mask(mask_path, original.state.params)
            except saliency.MaskMismatchError as error:  # a derived file: make it again
                logging.warning("%s; computing the mask again", error)
                os.replace(mask_path, f"{mask_path}.unreadable")
        if mask is None:
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
                "path": os.path.relpath(mask_path, workdir),
            }
            save()

    # 4. Unlearning, each method from the original's raw params.
    results["alpha"] = float(config.unlearn.alpha)
    results["effective_alpha_per_element"] = effective_alpha(config.unlearn.alpha, image_shape)
    for method in config.run_methods:
        if method == "Retrain" or method in results["methods"]:
            continue
        method_config = method_configs[method]
        try:
            output = get_method(method, "diffusion")(
                original.state,
                task,
                method_config,
                jax.random.key(method_config.seed),
                mask=mask if method in MASKED_METHODS else None,
                workdir=os.path.join(workdir, "unlearned", method),
            )
        except TrainingDivergedError as error:
            raise diverged(error) from error
        except ValueError as error:
            raise UserError(f"{method}: {error}") from error
        evaluate(method, output.state.params, output.run_seconds, output.compile_seconds)

    save()
    table = results_markdown(results)
    write_text(os.path.join(workdir, "results.md"), table)
    return table
