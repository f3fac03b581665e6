"""The SalUn generation pipeline: make a class-conditional DDPM forget one class.

    python experiments/diffusion.py --config experiments/configs/digits_ddpm.py --workdir runs/ddpm

Steps, each resumable from the work directory:
  1. train the evaluation classifier on the same data (`classifier/`), report its test accuracy;
  2. train the original DDPM (`original/`), and Retrain on the retained classes if "Retrain" is in
     `run_methods` (`retrain/`);
  3. the saliency mask of the forget class (`masks/forget_<c>_with_<f>.npz`);
  4. unlearn with each method of `run_methods` (SalUn, RL, GA; `unlearned/<method>/`);
  5. sample every class with DDIM + CFG from every model (Original, Retrain, the methods) with the
     same noise, classify the samples and compute UA, per-class accuracy and FD (classifier
     features); grids of samples per class in `grids/<method>.png`;
  6. `results.json` (schema below) and `results.md` (the table), after every model.

results.json:
    {"dataset", "forget_class", "num_classes", "image_shape", "config",
     "classifier": {"model", "test_accuracy", "FD_real_test"},
     "alpha", "effective_alpha_per_element",          # alpha * C*H*W (reference §6.4)
     "mask": {"fraction", "ones", "size", "seconds"},
     "methods": {name: {"UA", "forget_class_accuracy", "retain_accuracy",
                        "per_class_accuracy": {class: %}, "FD", "run_time_s",
                        "compile_time_s", "sampling_seconds", "num_samples_per_class"}},
     "wall_time_s"}                                   # of the last invocation
Percentages are in [0, 100]. `run_time_s` is the unlearning time (Original/Retrain: training
time). FD is a Frechet distance in the classifier's penultimate features between real train images
of the retained classes and the samples of the retained classes; it is not FID.
Re-running the same command resumes: models come back from their checkpoints, and models already
in results.json are not evaluated again.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import _common
from salun_jax import report, saliency
from salun_jax.checkpoint import Checkpointer
from salun_jax.diffusion import linear_schedule
from salun_jax.diffusion.evaluation import (
    classifier_frechet_distance,
    evaluate_samples,
    generate_samples,
    samples_per_class_labels,
    save_sample_grid,
)
from salun_jax.diffusion.training import DiffusionTrainConfig, train_diffusion
from salun_jax.diffusion.unlearning import (
    DiffusionUnlearnConfig,
    check_class,
    diffusion_forget_retain,
    diffusion_saliency_scores,
    effective_alpha,
    unlearn_diffusion,
)
from salun_jax.models import create_model
from salun_jax.models.unet import UNet
from salun_jax.train import (
    TrainingDivergedError,
    accuracy,
    make_predict_fn,
    predict,
    train_classifier,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])

# method -> (objective, uses the saliency mask); reference-salun.md §6.4.
UNLEARN_METHODS = {"SalUn": ("rl", True), "RL": ("rl", False), "GA": ("ga", False)}
KNOWN_METHODS = ("Retrain", *UNLEARN_METHODS)


def subset_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` examples of each class (all when per_class <= 0)."""
    labels = np.asarray(labels)
    if per_class <= 0:
        return np.arange(labels.size)
    return np.sort(np.concatenate([np.flatnonzero(labels == k)[:per_class]
                                   for k in np.unique(labels)]))


def frozen_random_flip(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each image flipped left-right with probability 1/2, once: upstream builds D_f and D_r for
    the mask and unlearning with list comprehensions over a flipping dataset, so one random flip
    is applied and then frozen (reference-salun.md §6.2)."""
    flip = np.random.default_rng(seed).random(len(images)) < 0.5
    out = np.array(images, copy=True)
    out[flip] = out[flip][:, :, ::-1]
    return out


def build_unet(config: ml_collections.ConfigDict, num_classes: int,
               image_shape: tuple[int, ...]) -> UNet:
    values = config.model.to_dict()
    for key in ("ch_mult", "attn_resolutions"):
        values[key] = tuple(values[key])
    return UNet(num_classes=num_classes, image_size=image_shape[0], out_channels=image_shape[2],
                **values)


def diffusion_train_config(values: dict) -> DiffusionTrainConfig:
    try:
        return DiffusionTrainConfig(**values)
    except TypeError as error:
        _common.fail(f"bad diffusion train config: {error}")


def unlearn_config(config: ml_collections.ConfigDict, method: str) -> DiffusionUnlearnConfig:
    values = dict(config.unlearn.to_dict())
    values.update(config.methods.get(method, ml_collections.ConfigDict()).to_dict())
    values["objective"] = UNLEARN_METHODS[method][0]
    try:
        return DiffusionUnlearnConfig(**values)
    except (TypeError, ValueError) as error:
        _common.fail(f"bad unlearning config for {method}: {error}")


def load_results(path: str) -> dict:
    if os.path.exists(path):
        try:
            results = report.read_results(path)
            results.setdefault("methods", {})
            return results
        except ValueError:
            logging.warning("results file %s is unreadable; starting a new one", path)
    return {"methods": {}}


def _fmt(value, precision: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{precision}f}"


def results_markdown(results: dict, order: list[str]) -> str:
    """The main table (UA, retained-class accuracy, FD, time) and the per-class accuracy table."""
    methods = [m for m in order if m in results["methods"]]
    num_classes, forget = results["num_classes"], results["forget_class"]
    classifier = results["classifier"]
    lines = [
        f"{results['dataset']}: class {forget} forgotten. Evaluation classifier "
        f"{classifier['model']}, test accuracy {classifier['test_accuracy']:.2f}%; FD = Frechet "
        f"distance in its penultimate features (not FID), real test vs real train images: "
        f"{_fmt(classifier['FD_real_test'], 3)}. alpha = {results['alpha']:g} (effective "
        f"per-element weight alpha*C*H*W = {results['effective_alpha_per_element']:.3g}).",
        "",
        "| Method | UA (%) | Forget-class acc. (%) | Retained-class acc. (%) | "
        "FD (classifier features) | Run time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        r = results["methods"][m]
        lines.append(f"| {m} | {_fmt(r['UA'])} | {_fmt(r['forget_class_accuracy'])} | "
                     f"{_fmt(r['retain_accuracy'])} | {_fmt(r['FD'], 3)} | "
                     f"{_fmt(r['run_time_s'], 1)} |")
    lines += ["", "Per-class accuracy of the classifier on samples generated for each class (%):",
              "", "| Method | " + " | ".join(
                  f"{k}{' (forgotten)' if k == forget else ''}" for k in range(num_classes))
              + " |", "|---|" + "---|" * num_classes]
    for m in methods:
        per_class = results["methods"][m]["per_class_accuracy"]
        lines.append(f"| {m} | " + " | ".join(_fmt(per_class[str(k)], 1)
                                               for k in range(num_classes)) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    wall_start = time.perf_counter()
    config, workdir = _CONFIG.value, _WORKDIR.value
    unknown = [m for m in config.run_methods if m not in KNOWN_METHODS]
    if unknown:
        _common.fail(f"unknown methods {unknown}; known: {', '.join(KNOWN_METHODS)}")
    _common.write_config(workdir, config)
    dataset = _common.load_data(config)
    num_classes = dataset.num_classes
    try:
        forget_class = check_class(config.forget_class, num_classes)
    except ValueError as error:
        _common.fail(str(error))
    train_idx = subset_per_class(dataset.train_labels, config.max_per_class)
    test_idx = subset_per_class(dataset.test_labels, config.max_per_class)
    images, labels = dataset.train_images[train_idx], dataset.train_labels[train_idx]
    test_images, test_labels = dataset.test_images[test_idx], dataset.test_labels[test_idx]
    image_shape = tuple(int(d) for d in images.shape[1:])
    forget_idx, retain_idx = diffusion_forget_retain(labels, forget_class, num_classes)
    # D_f and D_r of the mask and of unlearning (upstream: a random flip, frozen, for CIFAR-10).
    unlearn_images = frozen_random_flip(images) if config.frozen_flip else images
    results_path = os.path.join(workdir, "results.json")
    results = load_results(results_path)
    results.update(dataset=dataset.name, forget_class=forget_class, num_classes=num_classes,
                   image_shape=list(image_shape), config=config.to_dict())

    def save():
        results["wall_time_s"] = time.perf_counter() - wall_start
        report.write_results(results_path, results)

    # 1. The evaluation classifier, trained on the same (train) images.
    classifier_config = _common.train_config(config.classifier)
    classifier = create_model(classifier_config.model, num_classes, dataset.mean, dataset.std,
                              classifier_config.width)
    try:
        classifier_state, _ = train_classifier(
            images, labels, np.arange(labels.size), classifier, classifier_config,
            workdir=os.path.join(workdir, "classifier"), desc="classifier")
    except TrainingDivergedError as error:
        _common.fail(str(error))
    classifier_variables = classifier_state.variables
    predict_fn = make_predict_fn(classifier.apply, return_features=True)
    _, real_features = predict(predict_fn, classifier_variables, images[retain_idx])
    _, test_features = predict(predict_fn, classifier_variables,
                               test_images[test_labels != forget_class])
    results["classifier"] = {
        "model": f"{classifier_config.model} x{classifier_config.width}",
        "test_accuracy": accuracy(make_predict_fn(classifier.apply), classifier_variables,
                                  test_images, test_labels),
        "FD_real_test": classifier_frechet_distance(real_features, test_features),
    }
    logging.info("classifier: %s", results["classifier"])

    # 2. The original DDPM and (optionally) Retrain.
    model = build_unet(config, num_classes, image_shape)
    apply_fn = model.apply  # one object: the samplers' jit cache is keyed by it
    schedule = linear_schedule(**config.diffusion.to_dict())
    train_config = diffusion_train_config(config.train.to_dict())
    checkpoint_every = config.get("checkpoint_every", 1)  # configs written before it: each epoch
    try:
        original, original_history = train_diffusion(
            images, labels, np.arange(labels.size), model, schedule, train_config,
            workdir=os.path.join(workdir, "original"), desc="original",
            checkpoint_every=checkpoint_every)
        trained = {"Original": (original, original_history)}
        if "Retrain" in config.run_methods:
            retrain_config = dataclasses.replace(
                train_config, **{"seed": train_config.seed + 1000, **config.retrain.to_dict()})
            trained["Retrain"] = train_diffusion(
                images, labels, retain_idx, model, schedule, retrain_config,
                workdir=os.path.join(workdir, "retrain"), desc="retrain",
                checkpoint_every=checkpoint_every)
    except (TrainingDivergedError, ValueError) as error:
        _common.fail(str(error))

    sample = config.sample
    sample_labels = samples_per_class_labels(num_classes, sample.num_per_class)

    def evaluate(name: str, params, run_time_s: float, compile_time_s: float = 0.0):
        start = time.perf_counter()
        samples = generate_samples(
            apply_fn, params, schedule, sample_labels, jax.random.key(sample.seed),
            image_shape=image_shape, num_steps=sample.num_steps or None, eta=sample.eta,
            guidance_scale=sample.guidance_scale, batch_size=sample.batch_size)
        sampling_seconds = time.perf_counter() - start
        metrics = evaluate_samples(predict_fn, classifier_variables, samples, sample_labels,
                                   forget_class, num_classes, real_features)
        metrics.update(run_time_s=run_time_s, compile_time_s=compile_time_s,
                       sampling_seconds=sampling_seconds,
                       num_samples_per_class=int(sample.num_per_class))
        save_sample_grid(samples, sample_labels, os.path.join(workdir, "grids", f"{name}.png"),
                         num_classes=num_classes, per_class=sample.grid_per_class,
                         scale=sample.grid_scale)
        results["methods"][name] = metrics
        save()
        logging.info("%s: UA %.2f, retained acc %.2f, FD %s, %.1f s", name, metrics["UA"],
                     metrics["retain_accuracy"], metrics["FD"], run_time_s)

    def sampled_params(state):
        return state.ema_params if sample.use_ema and state.ema_params is not None else (
            state.params)

    for name, (state, history) in trained.items():
        if name not in results["methods"]:
            evaluate(name, sampled_params(state), float(sum(r["seconds"] for r in history)))

    # 3. The saliency mask of the forget class, at the original's raw weights (as upstream).
    original_params = original.params
    mask_config = config.mask
    mask_path = os.path.join(workdir, "masks",
                             f"forget_{forget_class}_with_{mask_config.fraction:.2f}.npz")
    needs_mask = any(UNLEARN_METHODS[m][1] for m in config.run_methods if m in UNLEARN_METHODS)
    mask = None
    if needs_mask:
        if os.path.exists(mask_path):
            mask = saliency.load_mask(mask_path, original_params)
        else:
            start = time.perf_counter()
            try:
                scores = diffusion_saliency_scores(
                    apply_fn, original_params, schedule, unlearn_images[forget_idx],
                    labels[forget_idx],
                    jax.random.key(mask_config.seed), batch_size=mask_config.batch_size,
                    guidance_scale=mask_config.guidance_scale,
                    clip_norm=mask_config.clip_norm or None, shuffle_seed=mask_config.seed)
            except ValueError as error:
                _common.fail(str(error))
            mask = saliency.mask_from_scores(jax.device_get(scores), mask_config.fraction)
            os.makedirs(os.path.dirname(mask_path), exist_ok=True)
            saliency.save_mask(mask_path, mask)
            stats = saliency.mask_stats(mask)
            results["mask"] = {"fraction": stats["fraction"], "ones": stats["ones"],
                               "size": stats["size"], "seconds": time.perf_counter() - start,
                               "path": os.path.relpath(mask_path, workdir)}
            save()

    # 4. Unlearning, each method from the original's raw params.
    results["alpha"] = float(config.unlearn.alpha)
    results["effective_alpha_per_element"] = effective_alpha(config.unlearn.alpha, image_shape)
    for method in config.run_methods:
        if method == "Retrain" or method in results["methods"]:
            continue
        objective, masked = UNLEARN_METHODS[method]
        method_config = unlearn_config(config, method)
        checkpointer = Checkpointer(os.path.join(workdir, "unlearned", method))
        try:
            restored = checkpointer.restore_latest(original_params)
            if restored is not None:
                params, meta, _ = restored
                run_seconds, compile_seconds = meta["run_time_s"], meta["compile_time_s"]
            else:
                output = unlearn_diffusion(
                    apply_fn, original_params, schedule,
                    forget_images=unlearn_images[forget_idx], forget_labels=labels[forget_idx],
                    retain_images=unlearn_images[retain_idx], retain_labels=labels[retain_idx],
                    num_classes=num_classes, config=method_config,
                    mask=mask if masked else None, desc=method)
                params, run_seconds = output.params, output.run_seconds
                compile_seconds = output.compile_seconds
                checkpointer.save(0, params, {"run_time_s": run_seconds,
                                              "compile_time_s": compile_seconds,
                                              "history": output.history})
        except (ValueError, FloatingPointError) as error:
            _common.fail(f"{method}: {error}")
        finally:
            checkpointer.close()
        evaluate(method, params, run_seconds, compile_seconds)

    order = ["Original", "Retrain", *UNLEARN_METHODS]
    save()
    table = results_markdown(results, order)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    app.run(main)
