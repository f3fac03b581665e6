"""The audit run: U-LiRA, KLoM, the population SVC MIA, relearning, weight space and sequential
requests for every method, from populations (`salun_jax.auditing`: the shadow design).

Stages, in order, each stored under stages/<name>-<fingerprint>.json and reused only where its
fingerprint (data content, split, recipes, method settings, members, seeds, code version) is the
one asked for:
  * populations (checkpointed under populations/<name>-<fingerprint>/, restored when finished):
    per group g, G originals on D_r + In(g); N Retrain models seeded as the originals ("paired")
    and N independent ones (seeds + 1000);
  * one row per method (and Original, Retrain): its N unlearned models (member i of group g from
    original i with key(seed + 2000 + i)), their margins on the pool, accuracies, per-member MIA,
    L2 distances and loss barriers, and the relearning curves of group 0's members;
  * per method, K sequential requests on original 0 (`unlearn.sequential`);
  * the report, always recomputed from the stored rows (numpy only): results.json, results.md,
    plots/roc.png and plots/relearning.png; run.json says which stages ran and which were reused.

The Retrain row: its attack columns (U-LiRA, KLoM, MIA) play the independent Retrain population
as the unlearned models against the paired one (the sanity row: chance); its relearning and
weight-space columns are the paired Retrain models themselves (the same initial weights as
Original), the exact method's reference. IU runs member by member (its WoodFisher recursion is a
Python loop of per-sample steps; there is no vmapped version).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from salun_jax import auditing, population, report
from salun_jax.evaluation import audit
from salun_jax.pipeline.classification import method_config
from salun_jax.pipeline.common import (
    UserError,
    build_model,
    build_split,
    is_primary,
    load_data,
    make_dataclass,
    write_config,
    write_results,
    write_text,
)
from salun_jax.pipeline.workdir import locked
from salun_jax.provenance import code_version, fingerprint
from salun_jax.train import TrainConfig
from salun_jax.unlearn import MASKED_METHODS, METHODS, UnlearnTask, get_method
from salun_jax.unlearn.sequential import sequential_unlearn

_logger = logging.getLogger(__name__)

REFERENCE_ROWS = ("Original", "Retrain")
SANITY = (
    "Retrain (sanity row): an independent Retrain population (other seeds) in the place of the "
    "unlearned models, against the paired one: U-LiRA must sit at chance (AUC 0.5, TPR = FPR) "
    "and KLoM at its sampling floor"
)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs the audit; returns the markdown tables (also results.md).

    Raises:
      UserError: a bad setting (odd or too few groups, unknown method, bad config values).
    """
    with locked(workdir):
        return _run(config, workdir)


@dataclasses.dataclass(frozen=True)
class _Run:
    config: ml_collections.ConfigDict
    workdir: str
    dataset: object
    split: object
    model: object
    train_config: TrainConfig
    methods: tuple[str, ...]
    method_configs: dict
    groups: int
    group_size: int
    seed: int
    strategy: str
    masks: np.ndarray  # [groups, pool] bool
    base: str  # fingerprint of everything every stage shares

    @property
    def members(self) -> int:
        return self.groups * self.group_size

    def seeds(self, group: int) -> list[int]:
        first = self.seed + group * self.group_size
        return list(range(first, first + self.group_size))

    def all_seeds(self) -> list[int]:
        return [s for g in range(self.groups) for s in self.seeds(g)]

    def task(self, group: int) -> UnlearnTask:
        split = auditing.group_split(self.split, self.masks[group], group)
        data = self.dataset
        return UnlearnTask(
            self.model, data.train_images, data.train_labels, split, data.num_classes
        )


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> _Run:
    groups, group_size = int(config.groups), int(config.group_size)
    if groups < 2 or groups % 2:
        raise UserError(f"groups must be even and >= 2, got {groups}")
    if group_size < 2:
        raise UserError(f"group_size must be >= 2 (shadow and target members), got {group_size}")
    if (groups // 2) * (group_size // 2) < 2:
        raise UserError(
            "U-LiRA fits each example's Gaussians to >= 2 shadow models that held it: "
            f"(groups / 2) * (group_size // 2) must be >= 2, got {groups} groups of {group_size}"
        )
    known = [m for m in METHODS["classification"] if m != "Retrain"]
    methods = tuple(m for m in config.run_methods if m not in REFERENCE_ROWS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    dataset = load_data(config)
    split = build_split(dataset, config.split.to_dict())
    train_config = make_dataclass(TrainConfig, config.train.to_dict(), "train")
    method_configs = {m: method_config(config, m) for m in methods}
    model = build_model(dataset, train_config)
    if len(split.forget) < 4:
        raise UserError(f"the pool (forget set) has {len(split.forget)} examples; need >= 4")
    masks = auditing.in_masks(len(split.forget), groups, int(config.mask_seed))
    base = fingerprint(
        data=dataset.fingerprint(),
        split=split.hash,
        train=train_config,
        model=repr(model),
        groups=groups,
        group_size=group_size,
        seed=int(config.seed),
        mask_seed=int(config.mask_seed),
        strategy=config.strategy,
        code=code_version(),
    )
    write_config(workdir, config)
    return _Run(
        config=config,
        workdir=workdir,
        dataset=dataset,
        split=split,
        model=model,
        train_config=train_config,
        methods=methods,
        method_configs=method_configs,
        groups=groups,
        group_size=group_size,
        seed=int(config.seed),
        strategy=config.strategy,
        masks=masks,
        base=base,
    )


class _Stages:
    """Stored stages: `get(name, parts, compute)` returns the stored value of (name, parts) or
    computes, stores and returns it; remembers which ran and which were reused."""

    def __init__(self, run: _Run):
        self.run, self.computed, self.reused, self.seconds = run, [], [], {}

    def get(self, name: str, parts: dict, compute: Callable[[], dict]) -> dict:
        digest = fingerprint(base=self.run.base, **parts)
        path = os.path.join(self.run.workdir, "stages", f"{name}-{digest}.json")
        if os.path.exists(path):
            try:
                value = report.read_results(path)
            except ValueError:  # damaged: made again
                _logger.warning("stage file %s is unreadable; computing it again", path)
            else:
                self.reused.append(name)
                return value
        start = time.perf_counter()
        value = compute()
        self.seconds[name] = time.perf_counter() - start
        _logger.info("%s: %.1f s", name, self.seconds[name])
        self.computed.append(name)
        write_results(path, value)
        return report.read_results(path) if is_primary() else value


class _Populations:
    """The trained populations, made (or restored from their checkpoints) on first use only."""

    def __init__(self, run: _Run):
        self.run, self._cache = run, {}

    def _directory(self, name: str, *settings) -> str:
        digest = fingerprint(base=self.run.base, settings=list(settings))
        return os.path.join(self.run.workdir, "populations", f"{name}-{digest}")

    def _train(self, name: str, indices, seeds):
        run = self.run
        return population.population_train_classifier(
            run.dataset.train_images,
            run.dataset.train_labels,
            indices,
            run.model,
            run.train_config,
            seeds,
            strategy=run.strategy,
            desc=name,
            workdir=self._directory(name, list(seeds)),
            checkpoint_every=max(run.train_config.epochs, 1),
        ).state

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def original(self, group: int):
        run = self.run
        return self._cached(
            ("original", group),
            lambda: self._train(
                f"original-g{group}", run.task(group).split.train, run.seeds(group)
            ),
        )

    def retrain(self, independent: bool = False):
        run = self.run
        offset = 1000 if independent else 0
        seeds = [s + offset for s in run.all_seeds()]
        name = "retrain-independent" if independent else "retrain"
        return self._cached(name, lambda: self._train(name, run.split.retain, seeds))

    def originals(self):
        return auditing.concat_members([self.original(g) for g in range(self.run.groups)])

    def unlearned(self, method: str):
        return self._cached(method, lambda: self._unlearn(method))

    def _unlearn(self, method: str):
        run = self.run
        cfg = run.method_configs[method]
        states = []
        for group in range(run.groups):
            originals, task = self.original(group), run.task(group)
            seeds = [s + 2000 for s in run.seeds(group)]
            if method == "IU":  # member by member: no population version (module docstring)
                states.append(_unlearn_members(method, originals, task, cfg, seeds))
                continue
            masks = None
            if method in MASKED_METHODS:
                masks = population.population_salun_masks(
                    originals,
                    task,
                    float(run.config.mask.fraction),
                    batch_size=cfg.batch_size,
                    crop_padding=cfg.crop_padding,
                    flip=cfg.flip,
                    strategy=run.strategy,
                )
            out = population.population_unlearn(
                method,
                originals,
                task,
                cfg,
                seeds,
                masks,
                strategy=run.strategy,
                workdir=None
                if method in population.ONE_SHOT_POPULATION_METHODS
                else self._directory(f"{method}-g{group}", cfg, float(run.config.mask.fraction)),
                checkpoint_every=max(cfg.epochs, 1),
            )
            states.append(out.state.replace(extra=None))
        return auditing.concat_members(states)


def _unlearn_members(method, originals, task, cfg, seeds):
    outs = [
        get_method(method)(population.member(originals, i), task, cfg, jax.random.key(s)).state
        for i, s in enumerate(seeds)
    ]
    return population.stack([o.replace(opt_state=None) for o in outs])


def _run(config: ml_collections.ConfigDict, workdir: str) -> str:
    start = time.perf_counter()
    run = _prepare(config, workdir)
    stages, models = _Stages(run), _Populations(run)
    rows = {
        name: stages.get(f"row-{name}", _row_parts(run, name), lambda n=name: _row(run, models, n))
        for name in (*REFERENCE_ROWS, *run.methods)
    }
    sequential = {}
    if int(config.sequential.requests) > 0:
        for name in ("Retrain", *run.methods):
            sequential[name] = stages.get(
                f"sequential-{name}",
                {**_row_parts(run, name), "sequential": config.sequential.to_dict()},
                lambda n=name: _sequential(run, models, n),
            )
    tables = _write_report(run, rows, sequential)
    total = time.perf_counter() - start
    _write_run_info(run, stages, total)
    done = f"{len(stages.computed)} stages computed, {len(stages.reused)} reused; {total:.0f} s."
    return f"{tables}\n\n{done}"


def _row_parts(run: _Run, name: str) -> dict:
    """What a row depends on beyond the base: its method's settings and the audit's."""
    config = run.config
    parts = {
        "row": name,
        "relearn": config.relearn.to_dict(),
        "barrier": config.barrier.to_dict(),
        "mia_seed": int(config.mia_seed),
    }
    if name not in REFERENCE_ROWS:
        parts["method"] = run.method_configs[name]
        if name in MASKED_METHODS:
            parts["mask_fraction"] = float(config.mask.fraction)
    return parts


def _row(run: _Run, models: _Populations, name: str) -> dict:
    """One row's stored values: margins on the pool, accuracies, MIA, weight space, relearning."""
    data, split, strategy = run.dataset, run.split, run.strategy
    images, labels = data.train_images, data.train_labels
    pool = np.asarray(split.forget)
    held = auditing.member_in(run.masks, run.group_size)
    paired = models.retrain()
    if name == "Original":
        attacked = audited = models.originals()
    elif name == "Retrain":
        attacked, audited = models.retrain(independent=True), paired
    else:
        attacked = audited = models.unlearned(name)
    forget_sets = [pool[row] for row in held]
    retain = np.asarray(split.retain)
    test_images, test_labels = data.test_images[split.test], data.test_labels[split.test]

    def pool_margins_and_accuracies(states) -> tuple[np.ndarray, dict]:
        """Margins on the pool and per-member forget (held examples), retain and test accuracy,
        from one pass over the pool."""
        logits = population.population_logits(states, images[pool], strategy=strategy)
        correct = np.argmax(logits, -1) == labels[pool][None]
        return audit.margins(logits, labels[pool]), {
            "forget_accuracy": 100.0 * np.sum(correct & held, 1) / np.sum(held, 1),
            "retain_accuracy": auditing.member_accuracy(
                states, images[retain], labels[retain], strategy
            ),
            "test_accuracy": auditing.member_accuracy(states, test_images, test_labels, strategy),
        }

    margins, accuracies = pool_margins_and_accuracies(attacked)
    values = {
        "margins": margins,
        **accuracies,
        "mia": auditing.population_mia(
            attacked,
            images,
            labels,
            retain,
            test_images,
            test_labels,
            forget_sets,
            int(run.config.mia_seed),
            strategy,
        ),
    }
    if name == "Retrain":  # the paired Retrain: U-LiRA's reference and Tug of War's
        reference, paired_accuracies = pool_margins_and_accuracies(paired)
        values["reference_margins"] = reference
        values["reference_accuracies"] = [
            float(np.mean(paired_accuracies[k]))
            for k in ("forget_accuracy", "retain_accuracy", "test_accuracy")
        ]
    originals = models.originals()
    barrier_idx = _subset(retain, int(run.config.barrier.examples), run.seed + 7)
    values.update(
        auditing.weight_space(
            audited,
            originals,
            paired,
            images[barrier_idx],
            labels[barrier_idx],
            tuple(run.config.barrier.alphas),
            strategy,
        )
    )
    values["relearning"] = _relearning(run, population.member(audited, slice(0, run.group_size)))
    return values


def _subset(indices: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` of `indices` drawn from `seed` (all when there are fewer), in index order."""
    indices = np.asarray(indices)
    if count >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, count, replace=False))


def _relearning(run: _Run, states) -> dict:
    """Group 0's members under the relearning attack: fine-tuned on a few retain examples (and,
    second, on those plus a few of group 0's forget examples), the forget accuracy on group 0's
    other forget examples after each step; [steps + 1, G] each."""
    config = run.config.relearn
    task = run.task(0)
    forget = np.asarray(task.forget)
    relearn_forget = _subset(forget, int(config.forget_examples), run.seed + 11)
    evaluated = np.setdiff1d(forget, relearn_forget)
    retain = _subset(task.retain, int(config.retain_examples), run.seed + 13)
    cfg = dataclasses.replace(
        method_config(run.config, "FT"),
        learning_rate=float(config.learning_rate),
    )
    seeds = [s + 3000 for s in run.seeds(0)]
    curves = {}
    for kind, train in (
        ("retain", retain),
        ("retain+forget", np.concatenate([retain, relearn_forget])),
    ):
        curves[kind] = auditing.relearning_curve(
            states, task, train, evaluated, cfg, int(config.steps), seeds, run.strategy
        )
    return curves


def _sequential(run: _Run, models: _Populations, name: str) -> dict:
    """K requests on original 0 of group 0 (forget set In(0))."""
    config = run.config
    task = run.task(0)
    state = population.member(models.original(0), 0)
    if name == "Retrain":
        method_cfg = dataclasses.replace(run.train_config, seed=run.seeds(0)[0])
    else:
        method_cfg = run.method_configs[name]
    out = sequential_unlearn(
        name,
        state,
        task,
        method_cfg,
        int(config.sequential.requests),
        jax.random.key(run.seed + 4000),
        run.dataset.test_images,
        run.dataset.test_labels,
        mask_fraction=float(config.mask.fraction),
        evaluation={"shadow_seed": int(config.mia_seed)},
    )
    return {"requests": out.requests}


# ------------------------------------------------------------------------------------------------
# The report.


def _summaries(run: _Run, rows: dict) -> tuple[dict, dict]:
    """Per row, the table's numbers, and the ROC curves."""
    held = auditing.member_in(run.masks, run.group_size)
    shadow = auditing.shadow_members(run.members, run.group_size)
    reference = np.asarray(rows["Retrain"]["reference_margins"], np.float64)
    results, rocs = {}, {}
    for name, values in rows.items():
        attack = auditing.ulira_and_klom(
            np.asarray(values["margins"], np.float64), held, reference, shadow, shadow
        )
        rocs[name] = attack
        ulira = attack["ulira"]
        relearning = {k: np.asarray(v) for k, v in values["relearning"].items()}
        entry = {
            "ulira_auc": ulira["auc"],
            "ulira_tpr_at_1pct_fpr": ulira["tpr_at_0.01_fpr"],
            "ulira_tpr_at_0.1pct_fpr": ulira["tpr_at_0.001_fpr"],
            "ulira_num_positive": ulira["num_positive"],
            "ulira_num_negative": ulira["num_negative"],
            "klom_mean": float(np.mean(attack["klom"])),
            "klom_median": float(np.median(attack["klom"])),
        }
        for key in ("forget_accuracy", "retain_accuracy", "test_accuracy", "mia"):
            entry[key] = float(np.mean(values[key]))
            entry[f"{key}_std"] = float(np.std(values[key]))
        entry["UA"] = 100.0 - entry["forget_accuracy"]
        entry["tug_of_war"] = audit.tug_of_war(
            [entry[k] for k in ("forget_accuracy", "retain_accuracy", "test_accuracy")],
            rows["Retrain"]["reference_accuracies"],
        )
        for key in ("l2_original", "l2_retrain", "loss_barrier"):
            entry[key] = float(np.mean(values[key]))
        for kind, curve in relearning.items():
            entry[f"relearn_{kind}_curve"] = np.mean(curve, axis=1).tolist()
            entry[f"relearned_forget_accuracy_{kind}"] = float(np.mean(curve[-1]))
            entry[f"forget_accuracy_before_relearning_{kind}"] = float(np.mean(curve[0]))
        results[name] = entry
    return results, rocs


def audit_table(results: dict) -> str:
    """The audit table, one row per method."""
    f = report.format_number
    header = [
        "Method",
        "U-LiRA AUC",
        "TPR@1%FPR",
        "TPR@0.1%FPR",
        "pop. SVC MIA %",
        "KLoM",
        "ToW",
        "UA %",
        "relearned FA % (retain / +forget)",
        "L2 to Original",
        "L2 to Retrain",
        "loss barrier",
    ]
    rows = [
        [
            name,
            f"{r['ulira_auc']:.3f}",
            f"{r['ulira_tpr_at_1pct_fpr']:.3f}",
            f"{r['ulira_tpr_at_0.1pct_fpr']:.3f}",
            f(r["mia"]),
            f"{r['klom_mean']:.3f}",
            f"{r['tug_of_war']:.3f}",
            f(r["UA"]),
            f"{f(r['relearned_forget_accuracy_retain'])} / "
            f"{f(r['relearned_forget_accuracy_retain+forget'])}",
            f(r["l2_original"]),
            f(r["l2_retrain"]),
            f"{r['loss_barrier']:.3f}",
        ]
        for name, r in results.items()
    ]
    return report.markdown(header, rows)


def sequential_table(sequential: dict) -> str:
    """Per method and request: UA (this request), UA on the earlier requests' data, RA, TA, MIA."""
    f = report.format_number
    header = [
        "Method",
        "request",
        "UA %",
        "UA earlier %",
        "UA all forgotten %",
        "RA %",
        "TA %",
        "MIA %",
    ]
    rows = []
    for name, entry in sequential.items():
        for r in entry["requests"]:
            earlier = "-" if r["UA_earlier"] is None else f(r["UA_earlier"])
            rows.append(
                [
                    name,
                    str(r["request"] + 1),
                    f(r["UA"]),
                    earlier,
                    f(r["UA_forgotten"]),
                    f(r["RA"]),
                    f(r["TA"]),
                    f(r["MIA"]),
                ]
            )
    return report.markdown(header, rows)


def _write_report(run: _Run, rows: dict, sequential: dict) -> str:
    results, rocs = _summaries(run, rows)
    config = run.config
    notes = [
        SANITY,
        f"N = {run.members} members per population ({run.groups} groups of {run.group_size}); "
        f"pool = the {len(run.split.forget)}-example forget set, each example held by half the "
        "members; U-LiRA: shadow members = even positions in each group, targets = odd.",
        f"Relearning: {config.relearn.steps} SGD steps (lr {config.relearn.learning_rate}) on "
        f"{config.relearn.retain_examples} retain examples (+ {config.relearn.forget_examples} "
        "forget examples), forget accuracy of group 0 on its other forget examples; Retrain's "
        "relearning and weight-space columns are the Retrain models seeded as the originals.",
        "Loss barrier: max over the line from each model to its Original of the retain CE above "
        "the straight line (weights and BatchNorm statistics interpolated).",
    ]
    tables = f"## Audit\n\n{audit_table(results)}"
    if sequential:
        tables += (
            f"\n\n## Sequential requests ({config.sequential.requests} requests, original 0)\n\n"
            f"{sequential_table(sequential)}"
        )
    left_out = [m for m in METHODS["classification"] if m != "Retrain" and m not in run.methods]
    if left_out:
        notes.append(f"Not run in this config: {', '.join(left_out)}.")
    text = tables + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text(os.path.join(run.workdir, "results.md"), text)
    write_results(
        os.path.join(run.workdir, "results.json"),
        {
            "audit": results,
            "sequential": sequential,
            "notes": notes,
            "members": run.members,
            "pool_size": int(len(run.split.forget)),
            "config": config.to_dict(),
            "code": code_version(),
        },
    )
    if is_primary():
        _plots(run, results, rocs)
    return tables


def _plots(run: _Run, results: dict, rocs: dict) -> None:
    try:
        report.plot_roc_curves(
            {n: (a["positive"], a["negative"]) for n, a in rocs.items()},
            os.path.join(run.workdir, "plots", "roc.png"),
            title=f"U-LiRA, N = {run.members}",
        )
        report.plot_relearning_curves(
            {
                n: {k.split("_")[1]: r[k] for k in r if k.startswith("relearn_")}
                for n, r in results.items()
            },
            os.path.join(run.workdir, "plots", "relearning.png"),
        )
    except ImportError:  # matplotlib is optional
        _logger.warning("matplotlib is not installed: no plots")


def _write_run_info(run: _Run, stages: _Stages, total: float) -> None:
    info = {
        "computed": stages.computed,
        "reused": stages.reused,
        "seconds": {**stages.seconds, "total": total},
        "members": run.members,
        "strategy": population.resolve_strategy(run.strategy),
        "backend": jax.default_backend(),
        "load_average": list(os.getloadavg()),
        "code": code_version(),
    }
    if is_primary():
        with open(os.path.join(run.workdir, "run.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True, default=str)
