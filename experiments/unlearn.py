"""The SalUn classification pipeline: original model, Retrain, saliency masks, every unlearning
method, evaluation, over one or several seeds.

    python experiments/unlearn.py --config experiments/configs/digits_unlearn.py --workdir runs/u

Per seed it writes `seed_<s>/` (split.npz, original/ and retrain/ checkpoints, masks/), and at the
top of the work directory config.json, results.json (schema in the README), results.md (the
paper-style table) and plots/. Re-running the same command resumes: trained models come back from
their checkpoints and methods already in results.json are not run again.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

import _common
from salun_jax import report, saliency
from salun_jax.data.batches import gather_batches
from salun_jax.evaluation.classification import evaluate_unlearning
from salun_jax.models import create_model
from salun_jax.train import TrainingDivergedError, make_predict_fn, train_classifier
from salun_jax.unlearn import MASKED_METHODS, UnlearnConfig, UnlearnTask, get_method

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def unlearn_config(config: ml_collections.ConfigDict, method: str) -> UnlearnConfig:
    values = dict(config.unlearn.to_dict())
    values.update(config.methods.get(method, ml_collections.ConfigDict()).to_dict())
    values.pop("mask_fraction", None)
    if "milestones" in values:
        values["milestones"] = tuple(values["milestones"])
    try:
        return UnlearnConfig(**values)
    except (TypeError, ValueError) as error:
        _common.fail(f"bad unlearning config for {method}: {error}")


def load_results(path: str) -> dict:
    if os.path.exists(path):
        try:
            return report.read_results(path)
        except ValueError:
            logging.warning("results file %s is unreadable; starting a new one", path)
    return {"runs": [], "sweep": {}, "masks": {}}


def main(argv):
    del argv
    config, workdir = _CONFIG.value, _WORKDIR.value
    for method in config.run_methods:
        if method != "Retrain":
            try:
                get_method(method)
            except ValueError as error:
                _common.fail(str(error))
    if "SalUn" in config.run_methods or config.sweep_fractions:
        for fraction in (*config.sweep_fractions, config.methods.SalUn.mask_fraction):
            if not 0.0 < fraction <= 1.0:
                _common.fail(f"mask fraction must be in (0, 1], got {fraction}")
    _common.write_config(workdir, config)
    dataset = _common.load_data(config)
    train_config = _common.train_config(config.train)
    retrain_config = dataclasses.replace(train_config, **config.get("retrain", {}))
    model = create_model(train_config.model, dataset.num_classes, dataset.mean, dataset.std,
                         train_config.width)
    predict_fn = make_predict_fn(model.apply)
    images, labels = dataset.train_images, dataset.train_labels
    results_path = os.path.join(workdir, "results.json")
    results = load_results(results_path)
    results["config"] = config.to_dict()
    method_configs = {m: unlearn_config(config, m) for m in config.run_methods if m != "Retrain"}
    hashes = {m: _common.config_hash(c, config.methods.get(m, {}).get("mask_fraction"))
              for m, c in method_configs.items()}
    hashes["Retrain"] = _common.config_hash(retrain_config)
    hashes["Original"] = _common.config_hash(train_config)
    # A method counts as done only if it ran with the same config; stale results are redone.
    results["runs"] = [r for r in results["runs"]
                       if r.get("config_hash") == hashes.get(r["method"])]
    sweep_hash = _common.config_hash(unlearn_config(config, "SalUn"), list(config.sweep_fractions))
    results["sweep"] = {k: v for k, v in results["sweep"].items()
                        if v.get("config_hash") == sweep_hash}
    done = {(r["method"], r["seed"]) for r in results["runs"]}

    def evaluate(variables, split, fn=predict_fn):
        return evaluate_unlearning(fn, variables, images, labels, dataset.test_images,
                                   dataset.test_labels, split, mia_kinds=tuple(config.mia_kinds))

    def record(method, seed, metrics, split, **extra):
        results["runs"].append({"method": method, "seed": seed, "split_hash": split.hash,
                                "config_hash": hashes[method], "metrics": metrics, **extra})
        report.write_results(results_path, results)  # after every method: nothing lost
        logging.info("seed %d %s: %s", seed, method,
                     {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)})

    for seed in config.seeds:
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        split = _common.get_split(seed_dir, dataset, ml_collections.ConfigDict(
            {**config.split.to_dict(), "seed": seed}))
        logging.info("seed %d: split %s %s", seed, split.hash, split.sizes())
        try:
            original, _ = train_classifier(
                images, labels, split.train, model,
                dataclasses.replace(train_config, seed=seed),
                workdir=os.path.join(seed_dir, "original"), desc=f"original s{seed}")
            if ("Original", seed) not in done:
                record("Original", seed, evaluate(original.variables, split), split)
            if "Retrain" in config.run_methods and ("Retrain", seed) not in done:
                start = time.perf_counter()
                retrained, _ = train_classifier(
                    images, labels, split.retain, model,
                    dataclasses.replace(retrain_config, seed=seed + 1000),
                    workdir=os.path.join(seed_dir, "retrain"), desc=f"retrain s{seed}")
                seconds = time.perf_counter() - start
                metrics = evaluate(retrained.variables, split)
                metrics["run_time_s"] = seconds
                record("Retrain", seed, metrics, split)
        except TrainingDivergedError as error:
            _common.fail(str(error))

        # Saliency scores once per seed; masks for every fraction from one ranking.
        loss_fn = saliency.classification_forget_loss(
            model.apply, original.batch_stats, augment=config.unlearn.crop_padding > 0,
            crop_padding=config.unlearn.crop_padding, flip=config.unlearn.flip)
        batches = gather_batches({"image": images, "label": labels}, split.forget,
                                 config.unlearn.batch_size, np.random.default_rng(seed))
        start = time.perf_counter()
        scores = jax.block_until_ready(saliency.gradient_saliency(
            loss_fn, original.params, batches, jax.random.key(seed)))
        first_call = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(saliency.gradient_saliency(
            loss_fn, original.params, batches, jax.random.key(seed)))
        scores_seconds = time.perf_counter() - start
        fractions = sorted({float(f) for f in (*config.sweep_fractions,
                                               config.methods.SalUn.mask_fraction)})
        start = time.perf_counter()
        masks = saliency.mask_sweep(scores, fractions)
        ranking_seconds = time.perf_counter() - start
        mask_dir = os.path.join(seed_dir, "masks")
        os.makedirs(mask_dir, exist_ok=True)
        for fraction, mask in masks.items():
            saliency.save_mask(os.path.join(mask_dir, f"with_{fraction:.2f}.npz"), mask)
        chosen = masks[float(config.methods.SalUn.mask_fraction)]
        stats = saliency.mask_stats(chosen)
        results["masks"][str(seed)] = {
            "fraction": stats["fraction"], "ones": stats["ones"], "size": stats["size"],
            "scores_seconds": scores_seconds, "scores_compile_seconds": first_call - scores_seconds,
            "ranking_seconds": ranking_seconds, "per_leaf": stats["per_leaf"]}
        if seed == config.seeds[0]:
            report.plot_layer_saliency(list(stats["per_leaf"]), list(stats["per_leaf"].values()),
                                       os.path.join(workdir, "plots", "layer_saliency.png"),
                                       title=f"salient share per layer (mask "
                                             f"{config.methods.SalUn.mask_fraction})")

        task = UnlearnTask(model, images, labels, split, dataset.num_classes)
        for index, method in enumerate(config.run_methods):
            if method == "Retrain" or (method, seed) in done:
                continue
            output = get_method(method)(original, task, method_configs[method],
                                        jax.random.key(seed * 100 + index),
                                        mask=chosen if method in MASKED_METHODS else None)
            fn = predict_fn if output.model is None else make_predict_fn(output.model.apply)
            metrics = evaluate(output.state.variables, split, fn)
            metrics["run_time_s"] = output.run_seconds
            metrics["compile_time_s"] = output.compile_seconds
            record(method, seed, metrics, split, history=output.history)

        # Mask-fraction sweep of SalUn (first seed only).
        key = str(seed)
        if config.sweep_fractions and seed == config.seeds[0] and key not in results["sweep"]:
            sweep = {"fractions": [], "UA": [], "RA": [], "TA": [], "MIA": [],
                     "config_hash": sweep_hash}
            salun_config = unlearn_config(config, "SalUn")
            for fraction in sorted(config.sweep_fractions):
                output = get_method("SalUn")(original, task, salun_config,
                                             jax.random.key(seed * 100 + 99), mask=masks[fraction])
                metrics = evaluate(output.state.variables, split)
                sweep["fractions"].append(fraction)
                for name in ("UA", "RA", "TA", "MIA"):
                    sweep[name].append(metrics[name])
            results["sweep"][key] = sweep
            report.write_results(results_path, results)
        if key in results["sweep"]:
            sweep = results["sweep"][key]
            report.plot_sweep(sweep["fractions"], {k: sweep[k] for k in ("UA", "RA", "TA", "MIA")},
                              os.path.join(workdir, "plots", "salun_mask_sweep.png"),
                              title=f"SalUn vs mask fraction (seed {seed})")

    runs = [r for r in results["runs"] if r["seed"] in config.seeds]
    reference = "Retrain" if any(r["method"] == "Retrain" for r in runs) else None
    summary = report.summarize(runs, reference_method=reference)
    results["summary"] = summary
    table = report.markdown_table(summary, reference_method=reference)
    report.write_results(results_path, results)
    header = (f"{dataset.name}, {config.split.scenario} forgetting, {len(split.forget)} of "
              f"{len(split.train)} train images, {train_config.model} x{train_config.width}, "
              f"seeds {list(config.seeds)}; mean±std (|gap| to Retrain); RTE in seconds\n\n")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    _common.run(main, _CONFIG)
