"""The SalUn classification pipeline: original model, Retrain, saliency masks, every unlearning
method and their evaluation, over one or several seeds, resumable from a work directory.

Per seed it writes `seed_<s>/` (split.npz, original/ and retrain/ checkpoints, masks/), and at the
top of the work directory config.json, results.json (schema in the README), results.md (the
paper-style table) and plots/. Re-running resumes: trained models come back from their
checkpoints and methods already in results.json with the same config are not run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import jax
import ml_collections

from salun_jax import report, saliency, tuning
from salun_jax.evaluation.classification import (
    evaluate_unlearning,
    make_predict_fn,
    model_accuracy,
)
from salun_jax.loop import TrainingDivergedError
from salun_jax.models import create_model
from salun_jax.pipeline.common import (
    UserError,
    build_split,
    check_config,
    config_hash,
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
from salun_jax.pipeline.tuning import chosen_table, tuning_grids, tuning_hash
from salun_jax.pipeline.workdir import locked
from salun_jax.provenance import code_version
from salun_jax.step import canonical_module
from salun_jax.train import TrainConfig, train_classifier
from salun_jax.unlearn import MASKED_METHODS, UnlearnConfig, UnlearnTask, get_method

FIXED_KEYS = ("dataset", "train_per_class", "test_per_class", "split", "train")
MIA_SHADOWS = ("stratified", "first_n")


def method_config(config: ml_collections.ConfigDict, method: str) -> UnlearnConfig:
    """`config.unlearn` with the method's overrides from `config.methods`."""
    values = {**config.unlearn.to_dict(), **config.methods.get(method, {})}
    return make_dataclass(UnlearnConfig, values, f"unlearning ({method})")


def _check(config: ml_collections.ConfigDict) -> None:
    for method in config.run_methods:
        try:
            get_method(method)
        except ValueError as error:
            raise UserError(str(error)) from error
    for fraction in (*config.sweep_fractions, config.mask.fraction):
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"mask fraction must be in (0, 1], got {fraction}")
    if config.get("mia_shadow", "stratified") not in MIA_SHADOWS:
        raise UserError(f"mia_shadow must be one of {MIA_SHADOWS}, got {config.mia_shadow!r}")
    tuning_grids(config)


def scenario_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """{name: the config of one forgetting scenario}, in `config.scenarios` order; each replaces
    the keys in `config.scenario_settings[name]` (e.g. `split`, `sweep_fractions`), a name
    without settings is `config` as it is. No `scenarios` (or an empty tuple) is one unnamed
    scenario, `config` itself."""
    names = tuple(config.get("scenarios") or ())
    if not names:
        return {"": config}
    settings = config.get("scenario_settings") or {}
    out = {}
    for name in names:
        values = {
            k: v for k, v in config.to_dict().items() if k not in ("scenarios", "scenario_settings")
        }
        if name in settings:
            values.update(settings[name].to_dict())
        out[name] = ml_collections.ConfigDict(values)
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs the pipeline; returns the markdown table (also in `workdir/results.md`).

    With several `config.scenarios` (e.g. 10% random and class-wise forgetting) each runs in
    `workdir/<name>/` (its own results.json and results.md); the original models, trained on the
    same train indices, are shared (`workdir/seed_<s>/original_<hash>`), and the top-level
    results.json / results.md hold every scenario's summary / table.

    Raises:
      UserError: a bad setting, data or split file, or a diverged run (the message says which).
    """
    with locked(workdir):
        scenarios = scenario_configs(config)
        if len(scenarios) == 1:
            return _train_and_evaluate(next(iter(scenarios.values())), workdir)
        for scenario in scenarios.values():
            _check(scenario)
        check_config(workdir, config, (*FIXED_KEYS, "scenarios", "scenario_settings"))
        write_config(workdir, config)
        tables, summary = [], {}
        for name, scenario in scenarios.items():
            subdir = os.path.join(workdir, name)
            tables.append(f"## {name}\n\n" + _train_and_evaluate(scenario, subdir, workdir))
            with open(os.path.join(subdir, "results.json")) as f:
                summary[name] = {
                    "results": os.path.join(name, "results.json"),
                    "summary": json.load(f)["summary"],
                }
        report.write_results(
            os.path.join(workdir, "results.json"),
            {"config": config.to_dict(), "scenarios": summary},
        )
        text = "\n\n".join(tables)
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(text + "\n")
        return text


def _model(config: TrainConfig, dataset):
    try:
        # One module object for equal models: both scenarios' runs share compiled programs.
        return canonical_module(
            create_model(config.model, dataset.num_classes, dataset.mean, dataset.std, config.width)
        )
    except ValueError as error:
        raise UserError(f"bad train config: {error}") from error


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, original_root: str | None = None
) -> str:
    """One scenario in `workdir`; `original_root`: where the original models are shared."""
    # Everything that can be wrong with the config is checked before anything is written.
    _check(config)
    check_config(workdir, config, FIXED_KEYS)
    dataset = load_data(config)
    splits = {
        seed: build_split(dataset, {**config.split.to_dict(), "seed": seed})
        for seed in config.seeds
    }
    train_config = make_dataclass(TrainConfig, config.train.to_dict(), "train")
    retrain_config = make_dataclass(
        TrainConfig, {**config.train.to_dict(), **overrides(config.retrain)}, "retrain"
    )
    method_configs = {m: method_config(config, m) for m in config.run_methods if m != "Retrain"}
    model = _model(train_config, dataset)
    write_config(workdir, config)
    predict_fn = make_predict_fn(model.apply)
    images, labels = dataset.train_images, dataset.train_labels
    results_path = os.path.join(workdir, "results.json")
    results = load_results(results_path, {"runs": [], "sweep": {}, "masks": {}})
    grids = tuning_grids(config)
    strategy = config.tuning.get("strategy", "auto") if grids else "auto"
    results["config"] = config.to_dict()
    hashes = {
        m: config_hash(c, config.mask.fraction if m in MASKED_METHODS else None)
        for m, c in method_configs.items()
    }
    hashes["Retrain"] = config_hash(retrain_config)
    hashes["Original"] = config_hash(train_config)
    # A row is redone only if its method runs now with another config; other rows are kept.
    results["runs"] = [
        r
        for r in results["runs"]
        if r.get("config_hash") == hashes.get(r["method"], r.get("config_hash"))
    ]
    sweep_hash = config_hash(method_config(config, "SalUn"), list(config.sweep_fractions))
    results["sweep"] = {
        k: v for k, v in results["sweep"].items() if v.get("config_hash") == sweep_hash
    }
    # "stratified": class-stratified random MIA shadow sets drawn from the split seed (the same
    # for every method of a seed); "first_n": upstream's first n retain / test samples.
    stratified = config.get("mia_shadow", "stratified") == "stratified"

    def shadow_seed(seed):
        return seed if stratified else None

    # Rows evaluated with other shadow sets are redone.
    results["runs"] = [
        r for r in results["runs"] if r["metrics"].get("shadow_seed") == shadow_seed(r["seed"])
    ]
    done = {(r["method"], r["seed"]) for r in results["runs"]}
    # Tuned rows: kept only if their grid, method config and split are unchanged.
    tuned_hashes = {m: tuning_hash(grid, method_configs[m], strategy) for m, grid in grids.items()}
    results["tuned_runs"] = [
        r
        for r in results.get("tuned_runs", [])
        if r["method"] in grids and r.get("config_hash") == tuned_hashes[r["method"]]
    ]
    tuned_done = {(r["method"], r["seed"]) for r in results["tuned_runs"]}
    results["tuning"] = {
        seed: {m: v for m, v in entry.items() if m == "Retrain" or (m, int(seed)) in tuned_done}
        for seed, entry in results.get("tuning", {}).items()
    }

    def evaluate(variables, split, seed, fn=predict_fn):
        return evaluate_unlearning(
            fn,
            variables,
            images,
            labels,
            dataset.test_images,
            dataset.test_labels,
            split,
            mia_kinds=tuple(config.mia_kinds),
            shadow_seed=shadow_seed(seed),
            loss_mia=True,
            also_first_n=config.get("mia_report_first_n", False),
        )

    def record(method, seed, metrics, split, **extra):
        results["runs"].append(
            {
                "method": method,
                "seed": seed,
                "split_hash": split.hash,
                "config_hash": hashes[method],
                "code": code_version(),
                "metrics": metrics,
                **extra,
            }
        )
        write_results(results_path, results)  # after every method: nothing lost
        logging.info(
            "seed %d %s: %s",
            seed,
            method,
            {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)},
        )

    def run_method(method, seed, task, original, mask, rng, **run_options):
        method_fn = get_method(method)
        cfg = (
            dataclasses.replace(retrain_config, seed=seed + 1000)
            if method == "Retrain"
            else method_configs[method]
        )
        try:
            return method_fn(original, task, cfg, rng, mask=mask, **run_options)
        except TrainingDivergedError as error:
            raise UserError(f"seed {seed}: {error}") from error

    for seed in config.seeds:
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        split = save_split_once(seed_dir, dataset, splits[seed])
        logging.info("seed %d: split %s %s", seed, split.hash, split.sizes())
        original_dir = os.path.join(seed_dir, "original")
        if original_root is not None:
            # Shared across scenarios: keyed by the train indices it is trained on.
            train_key = hashlib.sha256(split.train.astype("int64").tobytes()).hexdigest()[:12]
            original_dir = os.path.join(original_root, f"seed_{seed}", f"original_{train_key}")
        try:
            original_run = train_classifier(
                images,
                labels,
                split.train,
                model,
                dataclasses.replace(train_config, seed=seed),
                workdir=original_dir,
                desc=f"original s{seed}",
            )
            original = original_run.state
        except TrainingDivergedError as error:
            raise UserError(str(error)) from error
        if ("Original", seed) not in done:
            record(
                "Original",
                seed,
                evaluate(original.variables, split, seed),
                split,
                model_code=original_run.code,
            )
        task = UnlearnTask(model, images, labels, split, dataset.num_classes)
        retrain_dir = os.path.join(seed_dir, f"retrain_{hashes['Retrain']}")
        if "Retrain" in config.run_methods and ("Retrain", seed) not in done:
            output = run_method("Retrain", seed, task, None, None, None, workdir=retrain_dir)
            metrics = evaluate(output.state.variables, split, seed)
            metrics.update(run_time_s=output.run_seconds, compile_time_s=output.compile_seconds)
            record("Retrain", seed, metrics, split, model_code=output.code, history=output.history)

        # Saliency scores once per seed; masks for every fraction from one ranking.
        start = time.perf_counter()
        scores = jax.block_until_ready(
            saliency.classification_scores(
                original,
                images,
                labels,
                split.forget,
                batch_size=config.unlearn.batch_size,
                crop_padding=config.unlearn.crop_padding,
                flip=config.unlearn.flip,
                seed=seed,
            )
        )
        scores_seconds = time.perf_counter() - start
        fractions = sorted({float(f) for f in (*config.sweep_fractions, config.mask.fraction)})
        start = time.perf_counter()
        masks = saliency.mask_sweep(scores, fractions)
        ranking_seconds = time.perf_counter() - start
        mask_dir = os.path.join(seed_dir, "masks")
        os.makedirs(mask_dir, exist_ok=True)
        for fraction, mask in masks.items():
            if is_primary():
                saliency.save_mask(os.path.join(mask_dir, f"with_{fraction:.2f}.npz"), mask)
        chosen = masks[float(config.mask.fraction)]
        stats = saliency.mask_stats(chosen)
        results["masks"][str(seed)] = {
            "fraction": stats["fraction"],
            "ones": stats["ones"],
            "size": stats["size"],
            "scores_seconds": scores_seconds,
            "ranking_seconds": ranking_seconds,
            "per_leaf": stats["per_leaf"],
        }
        if seed == config.seeds[0]:
            report.plot_layer_saliency(
                list(stats["per_leaf"]),
                list(stats["per_leaf"].values()),
                os.path.join(workdir, "plots", "layer_saliency.png"),
                title=f"salient share per layer (mask {config.mask.fraction})",
            )

        for index, method in enumerate(config.run_methods):
            if method == "Retrain" or (method, seed) in done:
                continue
            output = run_method(
                method,
                seed,
                task,
                original,
                chosen if method in MASKED_METHODS else None,
                jax.random.key(seed * 100 + index),
            )
            fn = predict_fn if output.model is None else make_predict_fn(output.model.apply)
            metrics = evaluate(output.state.variables, split, seed, fn)
            metrics.update(run_time_s=output.run_seconds, compile_time_s=output.compile_seconds)
            record(method, seed, metrics, split, history=output.history)

        # Fair tuning: every tunable method's grid as one population, selected on validation
        # against this seed's Retrain (salun_jax.tuning), then evaluated on the test set.
        pending = [m for m in grids if (m, seed) not in tuned_done]
        if pending:
            # Restored from its checkpoint when it already ran.
            retrain_state = run_method(
                "Retrain", seed, task, None, None, None, workdir=retrain_dir
            ).state
            val_split = tuning.validation_split(split, labels, dataset.test_labels)
            reference = tuning.validation_metrics(
                predict_fn, retrain_state.variables, task, val_split, seed
            )
            seed_tuning = results["tuning"].setdefault(str(seed), {})
            seed_tuning["Retrain"] = reference
            for method in pending:
                start = time.perf_counter()  # the whole grid: the tuned row's run time
                summary, variables = tuning.tune_method(
                    method,
                    original,
                    task,
                    method_configs[method],
                    grids[method],
                    reference,
                    predict_fn,
                    val_split,
                    seed=seed,
                    mask_scores=scores,
                    strategy=strategy,
                )
                seconds = time.perf_counter() - start
                seed_tuning[method] = {**summary, "seconds": seconds}
                results["tuned_runs"].append(
                    {
                        "method": method,
                        "seed": seed,
                        "split_hash": split.hash,
                        "config_hash": tuned_hashes[method],
                        "code": code_version(),
                        "metrics": {**evaluate(variables, split, seed), "run_time_s": seconds},
                        "chosen": summary["chosen"],
                    }
                )
                write_results(results_path, results)
                logging.info("seed %d %s tuned: %s", seed, method, summary["chosen"])

        # Mask-fraction sweep of SalUn (first seed only).
        key = str(seed)
        if config.sweep_fractions and seed == config.seeds[0] and key not in results["sweep"]:
            sweep = {
                "fractions": [],
                "UA": [],
                "RA": [],
                "TA": [],
                "MIA": [],
                "config_hash": sweep_hash,
            }
            for fraction in sorted(config.sweep_fractions):
                output = run_method(
                    "SalUn", seed, task, original, masks[fraction], jax.random.key(seed * 100 + 99)
                )
                metrics = evaluate(output.state.variables, split, seed)
                sweep["fractions"].append(fraction)
                for name in ("UA", "RA", "TA", "MIA"):
                    sweep[name].append(metrics[name])
            results["sweep"][key] = sweep
            write_results(results_path, results)
        if key in results["sweep"]:
            sweep = results["sweep"][key]
            report.plot_sweep(
                sweep["fractions"],
                {k: sweep[k] for k in ("UA", "RA", "TA", "MIA")},
                os.path.join(workdir, "plots", "salun_mask_sweep.png"),
                title=f"SalUn vs mask fraction (seed {seed})",
            )

    runs = [r for r in results["runs"] if r["seed"] in config.seeds]
    reference = "Retrain" if any(r["method"] == "Retrain" for r in runs) else None
    results["summary"] = report.summarize(runs, reference_method=reference)
    table = report.markdown_table(results["summary"], reference_method=reference)
    write_results(results_path, results)
    header = (
        f"{dataset.name}, {config.split.scenario} forgetting, {len(split.forget)} of "
        f"{len(split.train)} train images, {train_config.model} x{train_config.width}, "
        f"seeds {list(config.seeds)}; mean±std (|gap| to Retrain); RTE in seconds\n\n"
        + report.code_versions_note(runs)
    )
    text = header + table
    tuned = [r for r in results["tuned_runs"] if r["seed"] in config.seeds]
    if tuned and reference is not None:
        size = next(iter(grids.values())).size
        retrain_runs = [r for r in runs if r["method"] == "Retrain"]
        results["tuned_summary"] = report.summarize(
            retrain_runs + tuned, reference_method=reference
        )
        text += (
            f"\n\n### Tuned: {size} settings per method (learning rate x one knob), one "
            "population each, selected on the validation split by Avg. Gap to Retrain (UA, RA, "
            "validation accuracy, MIA); test metrics of the chosen models\n\n"
            + report.markdown_table(results["tuned_summary"], reference_method=reference)
            + "\n\nChosen settings:\n\n"
            + chosen_table(results["tuning"])
        )
        write_results(results_path, results)
    write_text(os.path.join(workdir, "results.md"), text + "\n")
    return text


def train_original(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the original classifier of `config` in `workdir` (split.npz, checkpoints/,
    metrics.jsonl with validation accuracy, results.json); returns the results.

    Raises:
      UserError: a bad setting, data or split file, or a diverged run.
    """
    with locked(workdir):
        check_config(workdir, config, FIXED_KEYS)
        dataset = load_data(config)
        split = build_split(dataset, config.split.to_dict())
        train_config = make_dataclass(TrainConfig, config.train.to_dict(), "train")
        model = _model(train_config, dataset)
        write_config(workdir, config)
        split = save_split_once(workdir, dataset, split)
        return _train_original(config, workdir, dataset, split, train_config, model)


def _train_original(config, workdir, dataset, split, train_config, model) -> dict:
    predict_fn = make_predict_fn(model.apply)
    images, labels = dataset.train_images, dataset.train_labels

    def eval_fn(state):
        if split.val.size == 0:
            return {}
        return {
            "val_accuracy": model_accuracy(
                predict_fn, state.variables, images[split.val], labels[split.val]
            )
        }

    try:
        out = train_classifier(
            images, labels, split.train, model, train_config, workdir=workdir, eval_fn=eval_fn
        )
    except TrainingDivergedError as error:
        raise UserError(str(error)) from error
    results = {
        "dataset": dataset.name,
        "split_hash": split.hash,
        "epochs": len(out.history),
        "train_accuracy": model_accuracy(
            predict_fn, out.state.variables, images[split.train], labels[split.train]
        ),
        "test_accuracy": model_accuracy(
            predict_fn,
            out.state.variables,
            dataset.test_images[split.test],
            dataset.test_labels[split.test],
        ),
        "run_time_s": out.run_seconds,
        "compile_time_s": out.compile_seconds,
        "history": out.history,
    }
    write_results(os.path.join(workdir, "results.json"), results)
    logging.info(
        "train accuracy %.2f%%, test accuracy %.2f%%",
        results["train_accuracy"],
        results["test_accuracy"],
    )
    return results


def tiny_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The seconds-scale variant (`:tiny`) of a classification config: the same pipeline with
    one seed, the first scenario, a few epochs, every method for one epoch, two sweep fractions,
    the confidence MIA; image data sets cut to 20 train / 10 test images per class and a
    ResNet-8 x0.25."""
    config.seeds = tuple(config.seeds)[:1]
    if config.get("scenarios"):
        config.scenarios = tuple(config.scenarios)[:1]
    if config.dataset != "digits":
        config.train_per_class, config.test_per_class = 20, 10
        config.train.update(model="resnet8", width=0.25, batch_size=32)
        config.unlearn.batch_size = 32
    config.train.update(epochs=3, milestones=())
    config.unlearn.epochs = 1
    for method in config.methods.values():
        if "epochs" in method:
            method.epochs = 1
    config.methods.IU.woodfisher_samples = 20
    config.sweep_fractions = (0.2, 0.5) if config.sweep_fractions else ()
    config.mia_kinds = ("confidence",)
    if config.get("tuning"):
        # 2 learning rates x 1 knob value (epochs: 1), still the same budget for every method.
        for grid in config.tuning.grids.values():
            grid.learning_rates = tuple(grid.learning_rates)[:2]
            grid.knob_values = tuple(min(v, 1) for v in grid.knob_values[:1])
    return config
