"""A finished classification run, back from its work directory: the model of any row of
results.json (Original, Retrain or a method) with its metrics, config and mask, and its
evaluation again (with other MIA kinds if asked).

    run = load_run("runs/digits", "SalUn", seed=1, scenario="classwise")
    metrics = evaluate_run(run, mia_kinds=("confidence", "entropy"))
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import ml_collections

from salun_jax.checkpoint import Checkpointer, load_model
from salun_jax.data.splits import Split, load_split
from salun_jax.evaluation.classification import make_predict_fn
from salun_jax.evaluation.sd import load_classifier
from salun_jax.pipeline.classification import Setup, prepare, retrain_recipe
from salun_jax.pipeline.common import UserError
from salun_jax.saliency import load_mask
from salun_jax.step import canonical_module, init_variables
from salun_jax.types import PyTree


class SavedRun(NamedTuple):
    """One row of a finished run: its model's `variables` (`{"params", "batch_stats"}`) for
    `model`, the row (`metrics`, `fingerprint`, ...), the method's config and mask (None for
    Original, Retrain and unmasked methods), and what evaluating it again needs (`setup`,
    `split`)."""

    method: str
    seed: int
    model: nn.Module
    variables: PyTree
    row: dict
    config: dict
    mask: PyTree | None
    setup: Setup
    split: Split

    @property
    def metrics(self) -> dict:
        return self.row["metrics"]


def _scenario_dir(workdir: str, scenario: str | None) -> str:
    directory = os.path.join(workdir, scenario) if scenario else workdir
    if not os.path.exists(os.path.join(directory, "results.json")):
        scenarios = sorted(
            name
            for name in (os.listdir(workdir) if os.path.isdir(workdir) else [])
            if os.path.exists(os.path.join(workdir, name, "results.json"))
        )
        hint = f"; pass scenario= one of {scenarios}" if scenarios and not scenario else ""
        raise UserError(f"no finished classification run in {directory}{hint}")
    return directory


def load_run(workdir: str, method: str, seed: int, scenario: str | None = None) -> SavedRun:
    """The saved model of `method` (or "Original", "Retrain") and `seed` in a work directory of
    `experiments/unlearn.py`, with its row of results.json.

    Args:
      workdir: the pipeline's work directory.
      method, seed: the row.
      scenario: with several scenarios (the main job: "random", "classwise"), which one.

    Raises:
      UserError: no such run, row or saved model (one line naming it).
    """
    directory = _scenario_dir(workdir, scenario)
    with open(os.path.join(directory, "results.json")) as f:
        rows = json.load(f)["runs"]
    row = next((r for r in rows if r["method"] == method and r["seed"] == seed), None)
    if row is None or "model" not in row:
        have = sorted({(r["method"], r["seed"]) for r in rows if "model" in r})
        raise UserError(f"no saved {method} model of seed {seed} in {directory}; saved: {have}")
    with open(os.path.join(directory, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    setup = prepare(config, directory, os.path.dirname(directory) if scenario else directory)
    dataset = setup.dataset
    split = load_split(
        os.path.join(directory, f"seed_{seed}", "split.npz"),
        dataset.train_labels,
        dataset.test_labels,
    )
    model_dir = os.path.normpath(os.path.join(directory, row["model"]))
    if method in ("Original", "Retrain"):
        recipe = setup.train_config if method == "Original" else retrain_recipe(setup, seed)
        variables = load_classifier(model_dir, setup.model, dataset.image_shape, recipe)
        return SavedRun(method, seed, setup.model, variables, row, {}, None, setup, split)
    return _load_method(method, seed, row, model_dir, setup, split)


def _load_method(method, seed, row, model_dir, setup: Setup, split: Split) -> SavedRun:
    import jax

    if not os.path.isdir(model_dir):
        raise UserError(f"the saved model {model_dir} of {method} seed {seed} is missing")
    meta = Checkpointer(model_dir).newest_meta() or {}
    model = setup.model
    if meta.get("num_outputs", setup.dataset.num_classes) != setup.dataset.num_classes:
        model = canonical_module(model.clone(num_classes=meta["num_outputs"]))  # BE's wide head
    template = init_variables(model, jax.random.key(0), setup.dataset.image_shape)
    try:
        variables, meta = load_model(model_dir, template)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from error
    mask = None
    if meta.get("mask"):
        mask = load_mask(
            os.path.normpath(os.path.join(model_dir, meta["mask"])), template["params"]
        )
    return SavedRun(method, seed, model, variables, row, meta["config"], mask, setup, split)


def evaluate_run(run: SavedRun, mia_kinds: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The paper's metrics of a saved run's model, evaluated as the pipeline did (the same
    shadow sets and settings); `mia_kinds` replaces the config's MIA feature kinds."""
    setup = run.setup
    if mia_kinds is not None:
        config = ml_collections.ConfigDict(setup.config.to_dict())
        config.mia_kinds = tuple(mia_kinds)
        setup = dataclasses.replace(setup, config=config)
    return setup.evaluate(run.variables, run.split, run.seed, make_predict_fn(run.model.apply))
