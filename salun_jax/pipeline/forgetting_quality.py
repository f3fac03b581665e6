"""The many-model forgetting-quality run (NeurIPS 2023 unlearning challenge metric).

One split; populations trained in one compiled program each (`salun_jax.population`):
  * N original models (train split), seeds seed .. seed + N - 1;
  * 2N retrained models (retain split), seeds seed + 1000 ..; the first N ("half A") and the last
    N ("half B") are two disjoint halves of one population of independently seeded models;
  * per method, N unlearned models, member i from original i with key(seed + 2000 + i).

Every method's N models are compared with retrained half B, per forget example, through the
logit-scaled confidences (`evaluation.forgetting_quality`). The `Retrain` row is the sanity
check: retrained half A in the place of the unlearned models, against the same half B (so its
forgetting quality is what a perfect method would score with N models). `Original` is the
original population against half B.

Writes to the work directory: config.json, results.json (keyed by method name: forgetting
quality, final score, accuracies, epsilon summary, seconds), results.md (the table), run.json
(timings and what the Retrain row compares) and plots/epsilon_<method>.png. Each population
is checkpointed when it finishes, under populations/<name>-<hash of its settings>/, so a rerun on
the same work directory restores the finished populations instead of retraining them (saving
every epoch cost the N = 32 run about a fifth of its time); the evaluation is recomputed.

As functions, in order: `_prepare` (checks, config.json) -> `_train_populations` -> the
reference and the Retrain / Original rows (`_evaluate`) -> `_unlearn_populations` ->
`_write_results` -> `_write_run_info`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from salun_jax import population, report
from salun_jax.evaluation import forgetting_quality as fq
from salun_jax.pipeline.classification import method_config
from salun_jax.pipeline.common import (
    UserError,
    build_model,
    build_split,
    config_hash,
    load_data,
    make_dataclass,
    write_config,
)
from salun_jax.pipeline.workdir import locked
from salun_jax.train import TrainConfig
from salun_jax.unlearn import UnlearnTask

_logger = logging.getLogger(__name__)

SANITY = (
    "Retrain: two disjoint halves (N each) of one population of 2N independently seeded "
    "retrained models; half A plays the unlearned models, half B is the reference of every row"
)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-member accuracy in percent, [N]."""
    return 100.0 * np.mean(np.argmax(logits, -1) == labels[None], axis=-1)


def _evaluate(states, dataset, split, strategy: str) -> dict:
    """Forget confidences [N, n_f] and per-member forget / retain / test accuracies."""
    images, labels = dataset.train_images, dataset.train_labels
    forget_logits = population.population_logits(states, images[split.forget], strategy=strategy)
    retain_logits = population.population_logits(states, images[split.retain], strategy=strategy)
    test_logits = population.population_logits(states, dataset.test_images, strategy=strategy)
    return {
        "confidence": fq.logit_scaled_confidence(forget_logits, labels[split.forget]),
        "forget_accuracy": _accuracy(forget_logits, labels[split.forget]),
        "retain_accuracy": _accuracy(retain_logits, labels[split.retain]),
        "test_accuracy": _accuracy(test_logits, dataset.test_labels),
    }


def _row(evaluated: dict, reference: dict, seconds: float) -> tuple[dict, np.ndarray]:
    epsilons = fq.per_example_epsilon(evaluated["confidence"], reference["confidence"])
    num_models = evaluated["confidence"].shape[0]
    quality = float(np.mean(fq.epsilon_points(epsilons, num_models)))
    row = {
        "forgetting_quality": quality,
        "final_score": fq.final_score(
            quality,
            evaluated["retain_accuracy"],
            reference["retain_accuracy"],
            evaluated["test_accuracy"],
            reference["test_accuracy"],
        ),
        "num_models": num_models,
        "epsilon_median": float(np.median(epsilons)),
        "epsilon_inf_fraction": float(np.mean(np.isinf(epsilons))),
        "seconds": seconds,
    }
    for key in ("forget_accuracy", "retain_accuracy", "test_accuracy"):
        row[key] = float(np.mean(evaluated[key]))
        row[f"{key}_std"] = float(np.std(evaluated[key]))
    return row, epsilons


def markdown_table(results: dict) -> str:
    """The results as a markdown table, one row per method."""
    header = ["Method", "F (forgetting quality)", "final score", "FA %", "RA %", "TA %", "eps med"]
    rows = [
        [
            method,
            f"{r['forgetting_quality']:.4f}",
            f"{r['final_score']:.4f}",
            report.format_number(r["forget_accuracy"]),
            report.format_number(r["retain_accuracy"]),
            report.format_number(r["test_accuracy"]),
            report.format_number(r["epsilon_median"]),
        ]
        for method, r in results.items()
    ]
    return report.markdown(header, rows)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs the forgetting-quality experiment; returns the markdown table (also results.md).

    Raises:
      UserError: a bad setting (fewer than 2 members, unknown method, bad config values).
    """
    with locked(workdir):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> str:
    start_all = time.perf_counter()
    run = _prepare(config, workdir)
    timings = {}
    originals, retrained = _train_populations(run, timings)
    half_a = jax.tree.map(lambda x: x[: run.members], retrained)
    half_b = jax.tree.map(lambda x: x[run.members :], retrained)
    reference = _evaluate(half_b, run.dataset, run.split, run.strategy)
    evaluated = {
        "Retrain": _evaluate(half_a, run.dataset, run.split, run.strategy),
        "Original": _evaluate(originals, run.dataset, run.split, run.strategy),
    }
    seconds = {"Retrain": timings["Retrain (2N)"] / 2, "Original": timings["Original"]}
    _unlearn_populations(run, originals, evaluated, seconds, timings)
    table = _write_results(run, evaluated, reference, seconds)
    total = time.perf_counter() - start_all
    _write_run_info(run, timings, total)
    return f"{table}\n\n{SANITY}.\nN = {run.members}, {total:.0f} s in all."


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every stage reads: the config, the work directory, the data, the split, the model
    and the settings, fixed once `_prepare` has checked them."""

    config: ml_collections.ConfigDict
    workdir: str
    dataset: object
    split: object
    model: object  # the classifier's module, shared by every population
    train_config: TrainConfig
    method_configs: dict  # {method: UnlearnConfig}
    members: int  # N
    strategy: str
    seed: int


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> _Run:
    """Checks the settings, loads the data, makes the split and the model; writes config.json."""
    members = int(config.members)
    if members < 2:
        raise UserError(f"members must be >= 2 (the metric needs 2 models a side), got {members}")
    unknown = [m for m in config.run_methods if m not in population.POPULATION_METHODS]
    if unknown:
        raise UserError(
            f"no population version of {', '.join(unknown)}; known: "
            f"{', '.join(population.POPULATION_METHODS)}"
        )
    dataset = load_data(config)
    split = build_split(dataset, config.split.to_dict())
    train_config = make_dataclass(TrainConfig, config.train.to_dict(), "train")
    method_configs = {m: method_config(config, m) for m in config.run_methods}
    model = build_model(dataset, train_config)
    write_config(workdir, config)
    return _Run(
        config=config,
        workdir=workdir,
        dataset=dataset,
        split=split,
        model=model,
        train_config=train_config,
        method_configs=method_configs,
        members=members,
        strategy=config.strategy,
        seed=int(config.seed),
    )


def _timed(timings: dict, name: str, fn):
    """fn(), its time (until its result is ready) in timings[name] and the log."""
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree.leaves(out))
    timings[name] = time.perf_counter() - start
    _logger.info("%s: %.1f s", name, timings[name])
    return out


def _population_dir(run: _Run, name: str, *settings) -> str:
    # Checkpoints per population: an interrupted run resumes; changed settings start anew.
    digest = config_hash(run.split.hash, run.members, run.seed, run.strategy, *settings)
    return os.path.join(run.workdir, "populations", f"{name}-{digest}")


def _train_population(run: _Run, name: str, indices, seeds: list[int]):
    """A population of classifiers trained on `indices`, one member per seed (restored from
    `populations/<name>-<hash>/` when it finished before); returns its stacked state."""
    train_config = run.train_config
    return population.population_train_classifier(
        run.dataset.train_images,
        run.dataset.train_labels,
        indices,
        run.model,
        train_config,
        seeds,
        strategy=run.strategy,
        desc=name,
        workdir=_population_dir(run, name, train_config),
        checkpoint_every=max(train_config.epochs, 1),
    ).state


def _train_populations(run: _Run, timings: dict) -> tuple:
    """The N originals (train split) and the 2N retrained models (retain split)."""
    seed, members = run.seed, run.members
    originals = _timed(
        timings,
        "Original",
        lambda: _train_population(
            run, "original", run.split.train, [seed + i for i in range(members)]
        ),
    )
    retrained = _timed(
        timings,
        "Retrain (2N)",
        lambda: _train_population(
            run, "retrain", run.split.retain, [seed + 1000 + i for i in range(2 * members)]
        ),
    )
    return originals, retrained


def _unlearn_populations(
    run: _Run, originals, evaluated: dict, seconds: dict, timings: dict
) -> None:
    """Per method, N unlearned models (member i from original i with key(seed + 2000 + i)),
    timed and evaluated into `evaluated`, `seconds` and `timings`."""
    config, strategy = run.config, run.strategy
    task = UnlearnTask(
        run.model,
        run.dataset.train_images,
        run.dataset.train_labels,
        run.split,
        run.dataset.num_classes,
    )
    unlearn_seeds = [run.seed + 2000 + i for i in range(run.members)]
    for method in config.run_methods:
        cfg = run.method_configs[method]
        start = time.perf_counter()
        masks = None
        if method == "SalUn":
            masks = population.population_salun_masks(
                originals,
                task,
                config.mask.fraction,
                batch_size=cfg.batch_size,
                crop_padding=cfg.crop_padding,
                flip=cfg.flip,
                strategy=strategy,
            )
        states = population.population_unlearn(
            method,
            originals,
            task,
            cfg,
            unlearn_seeds,
            masks,
            strategy=strategy,
            workdir=_population_dir(run, method, run.train_config, cfg, config.mask.fraction),
            checkpoint_every=max(cfg.epochs, 1),
        ).state
        jax.block_until_ready(jax.tree.leaves(states.params))
        seconds[method] = timings[method] = time.perf_counter() - start
        evaluated[method] = _evaluate(states, run.dataset, run.split, strategy)
        _logger.info("%s: %.1f s", method, seconds[method])


def _write_results(run: _Run, evaluated: dict, reference: dict, seconds: dict) -> str:
    """Every row against retrained half B: results.json, results.md and the epsilon plots;
    returns the table."""
    results, plots = {}, os.path.join(run.workdir, "plots")
    for method, values in evaluated.items():
        results[method], epsilons = _row(values, reference, seconds[method])
        report.plot_epsilon_histogram(
            epsilons,
            os.path.join(plots, f"epsilon_{method}.png"),
            title=f"{method}: F = {results[method]['forgetting_quality']:.3f}, N = {run.members}",
        )
    table = markdown_table(results)
    report.write_results(os.path.join(run.workdir, "results.json"), results)
    with open(os.path.join(run.workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    return table


def _write_run_info(run: _Run, timings: dict, total: float) -> None:
    """run.json: timings, what the Retrain row compares, the machine and the method configs."""
    run_info = {
        "sanity_row": SANITY,
        "members": run.members,
        "num_forget": int(len(run.split.forget)),
        "strategy": population.resolve_strategy(run.strategy),
        "backend": jax.default_backend(),
        "seconds": {**timings, "total": total},
        "load_average": list(os.getloadavg()),
        "method_configs": {m: dataclasses.asdict(c) for m, c in run.method_configs.items()},
    }
    with open(os.path.join(run.workdir, "run.json"), "w") as f:
        json.dump(run_info, f, indent=2, sort_keys=True, default=str)
