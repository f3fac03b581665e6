"""The SalUn classification pipeline: original model, Retrain, saliency masks, every unlearning
method and their evaluation, over one or several seeds, as named stages over a ledger.

Stages, per seed: `split_stage` -> `original_stage` -> `retrain_stage` -> `mask_stage` ->
`method_stage` -> `tuning_stage` -> `sweep_stage`; then `report_stage` once. Every stored artefact
is keyed by a fingerprint (`salun_jax.provenance.fingerprint`) of what made it: the settings that
affect it, the content of the data, the split and the code version.

- Models: `seed_<s>/original_<fp>/` and `seed_<s>/retrain_<fp>/` (checkpoints, metrics.jsonl);
  the checkpoints carry the fingerprint too, so a directory is never resumed by another run.
- Masks: `seed_<s>/masks_<fp>/with_<fraction>.npz`.
- Rows: results.json's `runs`, each with the `fingerprint` of its model and evaluation.

A rerun reuses exactly what matches and recomputes the rest; deleting config.json or changing
the data, a setting or the code can never bring back a model or row made otherwise. Every random
key is derived from the seed and the method's name (`salun_jax.unlearn.method_key`), so a row does
not depend on which other methods ran or in what order.

Writes per scenario workdir: config.json (for the reader; nothing is keyed by it), results.json
(schema in the README), results.md (the paper-style table), plots/ and seed_<s>/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections

from salun_jax import loop, metric_writer, report, saliency, tuning
from salun_jax.checkpoint import save_model
from salun_jax.data.sources import Dataset
from salun_jax.data.splits import Split
from salun_jax.evaluation.classification import (
    NonFiniteOutputsError,
    evaluate_unlearning,
    make_predict_fn,
    model_accuracy,
)
from salun_jax.evaluation.mia import FEATURE_KINDS
from salun_jax.loop import StaleRunError, TrainingDivergedError
from salun_jax.models import create_model
from salun_jax.pipeline.common import (
    UserError,
    build_model,
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
from salun_jax.pipeline.tuning import chosen_table, tuning_grids
from salun_jax.pipeline.workdir import locked
from salun_jax.provenance import code_version, fingerprint
from salun_jax.step import TrainState, canonical_module
from salun_jax.train import TrainConfig, train_classifier
from salun_jax.unlearn import (
    MASKED_METHODS,
    METHODS,
    UPSTREAM_NAMES,
    UnlearnConfig,
    UnlearnTask,
    get_method,
    method_key,
)

_logger = logging.getLogger(__name__)
FIXED_KEYS = ("dataset", "train_per_class", "test_per_class", "split", "train")  # train.py
MIA_SHADOWS = ("stratified", "first_n")
RETRAIN_INITS = ("independent", "original")
SPLIT_SCENARIOS = ("random", "class")
SWEEP_METRICS = ("UA", "RA", "TA", "MIA")


def method_config(config: ml_collections.ConfigDict, method: str) -> UnlearnConfig:
    """`config.unlearn` with the method's overrides from `config.methods`."""
    values = {**config.unlearn.to_dict(), **config.methods.get(method, {})}
    return make_dataclass(UnlearnConfig, values, f"unlearning ({method})")


def _no_duplicates(name: str, values) -> tuple:
    values = tuple(values)
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise UserError(f"{name} lists {', '.join(repeated)} more than once: {values}")
    return values


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every setting of one scenario before any work, one line naming the bad one.

    Raises:
      UserError: a bad, unknown or repeated value.
    """
    seeds = _no_duplicates("seeds", config.seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"seeds must be a non-empty tuple of integers, got {seeds}")
    methods = _no_duplicates("run_methods", config.run_methods)
    for method in (*methods, *config.methods):
        if method in UPSTREAM_NAMES:
            raise UserError(
                f"method {method!r} is upstream's name: write {UPSTREAM_NAMES[method]!r}"
            )
        try:
            get_method(method)
        except ValueError as error:
            raise UserError(str(error)) from error
    for fraction in (
        *_no_duplicates("sweep_fractions", config.sweep_fractions),
        config.mask.fraction,
    ):
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"mask fraction must be in (0, 1], got {fraction}")
    if config.get("mia_shadow", "stratified") not in MIA_SHADOWS:
        raise UserError(f"mia_shadow must be one of {MIA_SHADOWS}, got {config.mia_shadow!r}")
    kinds = _no_duplicates("mia_kinds", config.mia_kinds)
    unknown = [k for k in kinds if k not in FEATURE_KINDS]
    if not kinds or unknown:
        raise UserError(f"mia_kinds must be a non-empty subset of {FEATURE_KINDS}, got {kinds}")
    if config.get("retrain_init", "independent") not in RETRAIN_INITS:
        raise UserError(f"retrain_init must be one of {RETRAIN_INITS}, got {config.retrain_init!r}")
    if config.split.get("scenario", "random") not in SPLIT_SCENARIOS:
        raise UserError(
            f"split.scenario must be one of {SPLIT_SCENARIOS}, got {config.split.scenario!r}"
        )
    recipes(config)
    for method in {*methods, *config.methods} - {"Retrain"}:
        method_config(config, method)
    tuning_grids(config)


def recipes(config: ml_collections.ConfigDict) -> tuple[TrainConfig, TrainConfig]:
    """The original model's and Retrain's training recipes (Retrain's overrides applied)."""
    train = make_dataclass(TrainConfig, config.train.to_dict(), "train")
    retrain = make_dataclass(
        TrainConfig, {**config.train.to_dict(), **overrides(config.retrain)}, "retrain"
    )
    return train, retrain


def scenario_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """{name: the config of one forgetting scenario}, in `config.scenarios` order; each replaces
    the keys in `config.scenario_settings[name]` (e.g. `split`, `sweep_fractions`), a name
    without settings is `config` as it is. No `scenarios` (or an empty tuple) is one unnamed
    scenario, `config` itself."""
    names = _no_duplicates("scenarios", config.get("scenarios") or ())
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
    same train indices, are shared (`workdir/seed_<s>/original_<fp>`), and the top-level
    results.json / results.md hold every scenario's summary / table.

    Raises:
      UserError: a bad setting, data or split file, or a diverged run (the message says which).
    """
    scenarios = scenario_configs(config)
    for scenario in scenarios.values():
        validate(scenario)  # every scenario, before any work
    with locked(workdir):
        if len(scenarios) == 1:
            return run_scenario(next(iter(scenarios.values())), workdir, workdir)
        write_config(workdir, config)
        tables, summary = [], {}
        for name, scenario in scenarios.items():
            subdir = os.path.join(workdir, name)
            tables.append(f"## {name}\n\n" + run_scenario(scenario, subdir, workdir))
            with open(os.path.join(subdir, "results.json")) as f:
                summary[name] = {
                    "results": os.path.join(name, "results.json"),
                    "summary": json.load(f)["summary"],
                }
        write_results(
            os.path.join(workdir, "results.json"),
            {"config": config.to_dict(), "scenarios": summary},
        )
        text = "\n\n".join(tables)
        write_text(os.path.join(workdir, "results.md"), text + "\n")
        return text


# ------------------------------------------------------------------------------------------------
# What the stages share.


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every stage of one scenario reads: its config, data, recipes, model, evaluation."""

    config: ml_collections.ConfigDict
    workdir: str
    original_root: str  # where the original models live (shared by the scenarios)
    dataset: Dataset
    data_fingerprint: str
    train_config: TrainConfig
    retrain_config: TrainConfig
    model: nn.Module
    predict_fn: Callable
    grids: dict
    strategy: str

    @property
    def results_path(self) -> str:
        return os.path.join(self.workdir, "results.json")

    def evaluation(self) -> dict:
        """The evaluation settings (part of every row's fingerprint)."""
        return {
            "mia_kinds": tuple(self.config.mia_kinds),
            "mia_shadow": self.config.get("mia_shadow", "stratified"),
            "first_n": bool(self.config.get("mia_report_first_n", False)),
            "loss_mia": True,
        }

    def evaluate(
        self, variables, split: Split, seed: int, predict_fn=None, name: str = "model"
    ) -> dict:
        """The paper's metrics of a model (`evaluate_unlearning`) with this scenario's settings:
        "stratified" shadow sets are drawn from the split seed, "first_n" are upstream's. A model
        with non-finite outputs is a `UserError` naming the seed and `name`."""
        settings = self.evaluation()
        try:
            return evaluate_unlearning(
                predict_fn or self.predict_fn,
                variables,
                self.dataset.train_images,
                self.dataset.train_labels,
                self.dataset.test_images,
                self.dataset.test_labels,
                split,
                mia_kinds=settings["mia_kinds"],
                mia_shadow=settings["mia_shadow"],
                shadow_seed=seed,
                loss_mia=settings["loss_mia"],
                also_first_n=settings["first_n"],
            )
        except NonFiniteOutputsError as error:
            raise UserError(f"seed {seed}: {name}: {error}") from error


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """One seed's split, its unlearning task and original model, and their fingerprints."""

    seed: int
    split: Split
    directory: str  # workdir/seed_<s>
    task: UnlearnTask
    original: TrainState
    original_fingerprint: str


def prepare(config: ml_collections.ConfigDict, workdir: str, original_root: str) -> Setup:
    """Data, recipes and model of a (validated) scenario; nothing is written."""
    dataset = load_data(config)
    train_config, retrain_config = recipes(config)
    model = build_model(dataset, train_config)  # one module object: scenarios share programs
    grids = tuning_grids(config)
    return Setup(
        config=config,
        workdir=workdir,
        original_root=original_root,
        dataset=dataset,
        data_fingerprint=dataset.fingerprint(),
        train_config=train_config,
        retrain_config=retrain_config,
        model=model,
        predict_fn=make_predict_fn(model.apply),
        grids=grids,
        strategy=config.tuning.get("strategy", "auto") if grids else "auto",
    )


def _model_fingerprint(setup: Setup, **parts) -> str:
    return fingerprint(
        data=setup.data_fingerprint, model=repr(setup.model), code=code_version(), **parts
    )


def _row_fingerprint(setup: Setup, model_fingerprint: str, split: Split) -> str:
    return fingerprint(model=model_fingerprint, split=split.hash, evaluation=setup.evaluation())


def _row(ledger: dict, key: str, row_fingerprint: str) -> dict | None:
    return next((r for r in ledger[key] if r.get("fingerprint") == row_fingerprint), None)


def _record(setup: Setup, ledger: dict, row: dict, key: str = "runs") -> None:
    """Adds a row to the ledger and writes results.json at once (nothing lost)."""
    ledger[key].append({**row, "code": code_version()})
    write_results(setup.results_path, ledger)
    metrics = {k: round(v, 2) for k, v in row["metrics"].items() if isinstance(v, float)}
    _logger.info("seed %d %s: %s", row["seed"], row["method"], metrics)


def run_scenario(config: ml_collections.ConfigDict, workdir: str, original_root: str) -> str:
    """One scenario in `workdir`: the stages in order; returns its table."""
    setup = prepare(config, workdir, original_root)
    splits = split_stage(setup)
    write_config(workdir, config)
    ledger = load_results(
        setup.results_path, {"runs": [], "tuned_runs": [], "sweep": {}, "masks": {}, "tuning": {}}
    )
    ledger["config"] = config.to_dict()
    current: set[str] = set()  # fingerprints of the rows this config asks for
    for seed in config.seeds:
        run = original_stage(setup, ledger, seed, splits[seed], current)
        retrain_stage(setup, ledger, run, current)
        scores, masks, saliency_fingerprint = mask_stage(setup, ledger, run)
        method_stage(setup, ledger, run, masks, saliency_fingerprint, current)
        tuning_stage(setup, ledger, run, scores, saliency_fingerprint, current)
        sweep_stage(setup, ledger, run, masks, saliency_fingerprint)
    return report_stage(setup, ledger, current, splits[config.seeds[-1]])


# ------------------------------------------------------------------------------------------------
# The stages.


def split_stage(setup: Setup) -> dict[int, Split]:
    """Every seed's split, all built (and so checked) before any is checked against or saved as
    `seed_<s>/split.npz`."""
    splits = {
        seed: build_split(setup.dataset, {**setup.config.split.to_dict(), "seed": seed})
        for seed in setup.config.seeds
    }
    for seed, split in splits.items():
        directory = os.path.join(setup.workdir, f"seed_{seed}")
        splits[seed] = save_split_once(directory, setup.dataset, split)
        _logger.info("seed %d: split %s %s", seed, split.hash, split.sizes())
    return splits


def original_stage(setup: Setup, ledger: dict, seed: int, split: Split, current: set) -> SeedRun:
    """Trains (or restores) the original model of a seed and records its row."""
    recipe = dataclasses.replace(setup.train_config, seed=seed)
    model_fingerprint = _model_fingerprint(setup, recipe=recipe, indices=split.train)
    directory = os.path.join(setup.original_root, f"seed_{seed}", f"original_{model_fingerprint}")
    try:
        out = train_classifier(
            setup.dataset.train_images,
            setup.dataset.train_labels,
            split.train,
            setup.model,
            recipe,
            workdir=directory,
            desc=f"original s{seed}",
        )
    except (TrainingDivergedError, StaleRunError) as error:
        raise UserError(str(error)) from error
    run = SeedRun(
        seed=seed,
        split=split,
        directory=os.path.join(setup.workdir, f"seed_{seed}"),
        task=UnlearnTask(
            setup.model,
            setup.dataset.train_images,
            setup.dataset.train_labels,
            split,
            setup.dataset.num_classes,
        ),
        original=out.state,
        original_fingerprint=model_fingerprint,
    )
    row_fingerprint = _row_fingerprint(setup, model_fingerprint, split)
    current.add(row_fingerprint)
    if _row(ledger, "runs", row_fingerprint) is None:
        metrics = setup.evaluate(out.state.variables, split, seed, name="Original")
        row = {"method": "Original", "seed": seed, "split_hash": split.hash, "metrics": metrics}
        row.update(fingerprint=row_fingerprint, model_code=out.code)
        _record(setup, ledger, {**row, "model": os.path.relpath(directory, setup.workdir)})
    return run


def retrain_recipe(setup: Setup, seed: int) -> TrainConfig:
    """Retrain's recipe for a seed. `retrain_init`: "independent" initialisation (and batch
    order) from seed + 1000, or "original": the original model's initial weights, as upstream's
    `main_forget.py` builds Retrain."""
    independent = setup.config.get("retrain_init", "independent") == "independent"
    return dataclasses.replace(setup.retrain_config, seed=seed + 1000 if independent else seed)


def retrain_model(setup: Setup, run: SeedRun) -> tuple[TrainConfig, str, str]:
    """Retrain's recipe, model fingerprint and directory for a seed."""
    recipe = retrain_recipe(setup, run.seed)
    model_fingerprint = _model_fingerprint(setup, recipe=recipe, indices=run.split.retain)
    return recipe, model_fingerprint, os.path.join(run.directory, f"retrain_{model_fingerprint}")


def retrain_stage(setup: Setup, ledger: dict, run: SeedRun, current: set) -> None:
    """Retrain on D_r when `run_methods` asks for it (a current row is kept either way)."""
    recipe, model_fingerprint, directory = retrain_model(setup, run)
    row_fingerprint = _row_fingerprint(setup, model_fingerprint, run.split)
    asked = "Retrain" in setup.config.run_methods
    if asked or _row(ledger, "runs", row_fingerprint) is not None:
        current.add(row_fingerprint)
    if asked and _row(ledger, "runs", row_fingerprint) is None:
        output = _run_method(setup, run, "Retrain", recipe, None, workdir=directory)
        metrics = setup.evaluate(output.state.variables, run.split, run.seed, name="Retrain")
        metrics.update(run_time_s=output.run_seconds, compile_time_s=output.compile_seconds)
        row = {"method": "Retrain", "seed": run.seed, "split_hash": run.split.hash}
        row.update(metrics=metrics, fingerprint=row_fingerprint, model_code=output.code)
        row.update(model=os.path.relpath(directory, setup.workdir))
        _record(setup, ledger, {**row, "history": output.history})


def _run_method(setup: Setup, run: SeedRun, method: str, config, mask, **run_options):
    try:
        return get_method(method)(
            run.original, run.task, config, method_key(run.seed, method), mask=mask, **run_options
        )
    except (TrainingDivergedError, StaleRunError) as error:
        raise UserError(f"seed {run.seed}: {error}") from error


def mask_stage(setup: Setup, ledger: dict, run: SeedRun) -> tuple:
    """Saliency scores at the original model, once per seed, and a mask for every fraction from
    one ranking; the chosen fraction's stats go to the ledger. Returns (scores, {fraction:
    mask}, the scores' fingerprint)."""
    config = setup.config
    options = dict(
        batch_size=config.unlearn.batch_size,
        crop_padding=config.unlearn.crop_padding,
        flip=config.unlearn.flip,
        seed=run.seed,
    )
    saliency_fingerprint = fingerprint(
        original=run.original_fingerprint, forget=run.split.forget, **options
    )
    start = time.perf_counter()
    scores = jax.block_until_ready(
        saliency.classification_scores(
            run.original, run.task.images, run.task.labels, run.split.forget, **options
        )
    )
    scores_seconds = time.perf_counter() - start
    fractions = sorted({float(f) for f in (*config.sweep_fractions, config.mask.fraction)})
    start = time.perf_counter()
    masks = saliency.mask_sweep(scores, fractions)
    ranking_seconds = time.perf_counter() - start
    mask_dir = os.path.dirname(_mask_file(run, saliency_fingerprint, fractions[0]))
    if is_primary():
        os.makedirs(mask_dir, exist_ok=True)
        for fraction, mask in masks.items():
            saliency.save_mask(_mask_file(run, saliency_fingerprint, fraction), mask)
    stats = saliency.mask_stats(masks[float(config.mask.fraction)])
    ledger["masks"][str(run.seed)] = {
        "fraction": stats["fraction"],
        "ones": stats["ones"],
        "size": stats["size"],
        "directory": os.path.relpath(mask_dir, setup.workdir),
        "fingerprint": saliency_fingerprint,
        "scores_seconds": scores_seconds,
        "ranking_seconds": ranking_seconds,
        "per_leaf": stats["per_leaf"],
    }
    if run.seed == config.seeds[0]:
        report.plot_layer_saliency(
            list(stats["per_leaf"]),
            list(stats["per_leaf"].values()),
            os.path.join(setup.workdir, "plots", "layer_saliency.png"),
            title=f"salient share per layer (mask {config.mask.fraction})",
        )
    return scores, masks, saliency_fingerprint


def _method_fingerprint(setup, run, method, config, saliency_fingerprint, fraction) -> str:
    masked = method in MASKED_METHODS
    return _model_fingerprint(
        setup,
        method=method,
        recipe=config,
        original=run.original_fingerprint,
        split=run.split.hash,
        mask=[saliency_fingerprint, fraction] if masked else None,
    )


def method_stage(setup, ledger, run, masks, saliency_fingerprint, current) -> None:
    """Runs every method of `run_methods` that has no current row; keeps the current rows of
    methods that ran before (a shorter `run_methods` drops nothing that is still valid)."""
    config = setup.config
    fraction = float(config.mask.fraction)
    for method in METHODS["classification"]:
        if method == "Retrain":
            continue
        method_config_ = method_config(config, method)
        model_fingerprint = _method_fingerprint(
            setup, run, method, method_config_, saliency_fingerprint, fraction
        )
        row_fingerprint = _row_fingerprint(setup, model_fingerprint, run.split)
        if _row(ledger, "runs", row_fingerprint) is not None:
            current.add(row_fingerprint)
            continue
        if method not in config.run_methods:
            continue
        mask = masks[fraction] if method in MASKED_METHODS else None
        output = _run_method(setup, run, method, method_config_, mask)
        predict_fn = None if output.model is None else make_predict_fn(output.model.apply)
        metrics = setup.evaluate(output.state.variables, run.split, run.seed, predict_fn, method)
        metrics.update(run_time_s=output.run_seconds, compile_time_s=output.compile_seconds)
        model_dir = os.path.join(run.directory, f"{method}_{model_fingerprint}")
        mask_file = _mask_file(run, saliency_fingerprint, fraction) if mask is not None else None
        _save_model(setup, model_dir, output, method_config_, mask_file, metrics)
        row = {"method": method, "seed": run.seed, "split_hash": run.split.hash}
        row.update(metrics=metrics, fingerprint=row_fingerprint, history=output.history)
        _record(setup, ledger, {**row, "model": os.path.relpath(model_dir, setup.workdir)})
        current.add(row_fingerprint)


def _mask_file(run: SeedRun, saliency_fingerprint: str, fraction: float) -> str:
    return os.path.join(run.directory, f"masks_{saliency_fingerprint}", f"with_{fraction:.2f}.npz")


def _save_model(setup, directory, output, config, mask_file, metrics) -> None:
    """A method's final model beside its config, its mask file and its head (BE's K+1-way head
    when it keeps the shadow logit): what `salun_jax.pipeline.runs.load_run` reads back; and its
    TensorBoard run (`tensorboard/`)."""
    if not is_primary():
        return
    meta = {
        "config": dataclasses.asdict(config),
        "mask": None if mask_file is None else os.path.relpath(mask_file, directory),
        "num_outputs": setup.dataset.num_classes + (output.model is not None),
        "code": code_version(),
    }
    if os.path.isdir(directory):  # a row made again (e.g. its evaluation changed): a new save
        shutil.rmtree(directory)
    save_model(directory, output.state.variables, meta)
    # TensorBoard: the run's epochs, and the evaluation's accuracies at its last epoch.
    writer = metric_writer.open_writer(os.path.join(directory, "tensorboard"), fresh=True)
    try:
        for record in output.history:
            metric_writer.write_scalars(writer, record["epoch"], loop.epoch_scalars(record))
        final = {
            "forget_accuracy": 100.0 - metrics["UA"],
            "retain_accuracy": metrics["RA"],
            "test_accuracy": metrics["TA"],
            "mia_efficacy": metrics["MIA"],
        }
        metric_writer.write_scalars(writer, len(output.history), final)
    finally:
        metric_writer.close(writer)


def tuning_stage(setup, ledger, run, scores, saliency_fingerprint, current) -> None:
    """Fair tuning: every tunable method's grid as one population, selected on validation
    against this seed's Retrain (salun_jax.tuning), then evaluated on the test set."""
    if not setup.grids:
        return
    recipe, retrain_fingerprint, retrain_dir = retrain_model(setup, run)
    pending = {}
    for method, grid in setup.grids.items():
        row_fingerprint = fingerprint(
            tuned=method,
            grid=[grid.learning_rates, grid.knob, grid.values, setup.strategy],
            recipe=method_config(setup.config, method),
            retrain=retrain_fingerprint,
            saliency=saliency_fingerprint,
            evaluation=setup.evaluation(),
            code=code_version(),
        )
        current.add(row_fingerprint)
        if _row(ledger, "tuned_runs", row_fingerprint) is None:
            pending[method] = row_fingerprint
    if not pending:
        return
    # Restored from its checkpoint (it ran in `retrain_stage`).
    retrain_state = _run_method(setup, run, "Retrain", recipe, None, workdir=retrain_dir).state
    val_split = tuning.validation_split(run.split, run.task.labels, setup.dataset.test_labels)
    reference = tuning.validation_metrics(
        setup.predict_fn, retrain_state.variables, run.task, val_split, run.seed
    )
    for method, row_fingerprint in pending.items():
        start = time.perf_counter()  # the whole grid: the tuned row's run time
        summary, variables = tuning.tune_method(
            method,
            run.original,
            run.task,
            method_config(setup.config, method),
            setup.grids[method],
            reference,
            setup.predict_fn,
            val_split,
            seed=run.seed,
            mask_scores=scores,
            strategy=setup.strategy,
        )
        seconds = time.perf_counter() - start
        metrics = setup.evaluate(variables, run.split, run.seed, name=f"tuned {method}")
        metrics["run_time_s"] = seconds
        row = {"method": method, "seed": run.seed, "split_hash": run.split.hash}
        row.update(metrics=metrics, fingerprint=row_fingerprint, chosen=summary["chosen"])
        row.update(tuning={**summary, "seconds": seconds}, retrain_validation=reference)
        _record(setup, ledger, row, key="tuned_runs")


def sweep_stage(setup: Setup, ledger: dict, run: SeedRun, masks, saliency_fingerprint) -> None:
    """SalUn over the mask fractions (first seed only), and its plot."""
    config, key = setup.config, str(run.seed)
    if not config.sweep_fractions or run.seed != config.seeds[0]:
        return
    fractions = sorted(float(f) for f in config.sweep_fractions)
    salun_config = method_config(config, "SalUn")
    sweep_fingerprint = fingerprint(
        points=[
            _method_fingerprint(setup, run, "SalUn", salun_config, saliency_fingerprint, f)
            for f in fractions
        ],
        evaluation=setup.evaluation(),
    )
    if ledger["sweep"].get(key, {}).get("fingerprint") != sweep_fingerprint:
        sweep = {"fractions": [], **{name: [] for name in SWEEP_METRICS}}
        for fraction in fractions:
            output = _run_method(setup, run, "SalUn", salun_config, masks[fraction])
            metrics = setup.evaluate(
                output.state.variables, run.split, run.seed, name=f"SalUn at {fraction:g}"
            )
            sweep["fractions"].append(fraction)
            for name in SWEEP_METRICS:
                sweep[name].append(metrics[name])
        ledger["sweep"][key] = {**sweep, "fingerprint": sweep_fingerprint}
        write_results(setup.results_path, ledger)
    sweep = ledger["sweep"][key]
    report.plot_sweep(
        sweep["fractions"],
        {k: sweep[k] for k in SWEEP_METRICS},
        os.path.join(setup.workdir, "plots", "salun_mask_sweep.png"),
        title=f"SalUn vs mask fraction (seed {run.seed})",
    )


def _row_order(config: ml_collections.ConfigDict) -> Callable[[dict], tuple]:
    """Rows by seed, then Original, Retrain, `run_methods` and the registry's order."""
    names = ["Original", "Retrain", *config.run_methods, *METHODS["classification"]]
    return lambda row: (row["seed"], names.index(row["method"]))


def report_stage(setup: Setup, ledger: dict, current: set, split: Split) -> str:
    """Keeps exactly the current rows, summarizes them and writes results.json / results.md."""
    config = setup.config
    order = _row_order(config)
    ledger["runs"] = sorted((r for r in ledger["runs"] if r["fingerprint"] in current), key=order)
    ledger["tuned_runs"] = sorted(
        (r for r in ledger["tuned_runs"] if r["fingerprint"] in current), key=order
    )
    ledger["tuning"] = {}
    for row in ledger["tuned_runs"]:
        entry = ledger["tuning"].setdefault(str(row["seed"]), {})
        entry["Retrain"] = row["retrain_validation"]
        entry[row["method"]] = row["tuning"]
    kept = {str(s) for s in config.seeds[:1]} if config.sweep_fractions else set()
    ledger["sweep"] = {k: v for k, v in ledger["sweep"].items() if k in kept}
    runs = ledger["runs"]
    reference = "Retrain" if any(r["method"] == "Retrain" for r in runs) else None
    ledger["summary"] = report.summarize(runs, reference_method=reference)
    header = (
        f"{setup.dataset.name}, {config.split.scenario} forgetting, {len(split.forget)} of "
        f"{len(split.train)} train images, {setup.train_config.model} "
        f"x{setup.train_config.width}, seeds {list(config.seeds)}; mean±std (|gap| to Retrain); "
        "RTE in seconds\n\n" + report.code_versions_note(runs)
    )
    text = header + report.markdown_table(ledger["summary"], reference_method=reference)
    tuned = ledger["tuned_runs"]
    if tuned and reference is not None:
        size = next(iter(setup.grids.values())).size
        retrain_runs = [r for r in runs if r["method"] == "Retrain"]
        ledger["tuned_summary"] = report.summarize(retrain_runs + tuned, reference_method=reference)
        text += (
            f"\n\n### Tuned: {size} settings per method (learning rate x one knob), one "
            "population each, selected on the validation split by Avg. Gap to Retrain (UA, RA, "
            "validation accuracy, MIA); test metrics of the chosen models\n\n"
            + report.markdown_table(ledger["tuned_summary"], reference_method=reference)
            + "\n\nChosen settings:\n\n"
            + chosen_table(ledger["tuning"])
        )
    write_results(setup.results_path, ledger)
    write_text(os.path.join(setup.workdir, "results.md"), text + "\n")
    if is_primary() and reference is not None and len(ledger["summary"]) > 1:
        report.plot_gaps(
            ledger["summary"],
            os.path.join(setup.workdir, "plots", "gaps.png"),
            title=f"{setup.dataset.name}, {config.split.scenario} forgetting: |gap| to Retrain, "
            f"mean over seeds {list(config.seeds)}",
        )
    return text


# ------------------------------------------------------------------------------------------------
# The original model alone (experiments/train.py).


def train_original(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the original classifier of `config` in `workdir` (split.npz, checkpoints/,
    metrics.jsonl with validation accuracy, results.json); returns the results.

    Raises:
      UserError: a bad setting, data or split file, a work directory of another run, or a
        diverged run.
    """
    with locked(workdir):
        check_config(workdir, config, FIXED_KEYS)
        dataset = load_data(config)
        split = build_split(dataset, config.split.to_dict())
        train_config = make_dataclass(TrainConfig, config.train.to_dict(), "train")
        setup_model = canonical_module(
            create_model(
                train_config.model,
                dataset.num_classes,
                dataset.mean,
                dataset.std,
                train_config.width,
            )
        )
        write_config(workdir, config)
        split = save_split_once(workdir, dataset, split)
        return _train_original(workdir, dataset, split, train_config, setup_model)


def _train_original(workdir, dataset, split, train_config, model) -> dict:
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
    except (TrainingDivergedError, StaleRunError) as error:
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
    _logger.info(
        "train accuracy %.2f%%, test accuracy %.2f%%",
        results["train_accuracy"],
        results["test_accuracy"],
    )
    return results


def tiny_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The seconds-scale variant (`:tiny`) of a classification config: the same pipeline with
    one seed, the first scenario, a few epochs, every method for one epoch, two sweep fractions,
    the confidence MIA; digits cut to 60 train / 30 test images per class, other image data
    sets to 20 / 10 and a ResNet-8 x0.25."""
    config.seeds = tuple(config.seeds)[:1]
    if config.get("scenarios"):
        config.scenarios = tuple(config.scenarios)[:1]
    if config.dataset == "digits":
        config.train_per_class, config.test_per_class = 60, 30
    else:
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
