"""Fair tuning (`salun_jax.tuning`): grids and budget, the validation split, selection by gap to
Retrain, and that the epoch knob's snapshots are the shorter runs."""

import dataclasses
import importlib.util
import json
import os

import chex
import jax
import numpy as np
import pytest

from salun_jax import population, tuning
from salun_jax.data.splits import Split
from salun_jax.evaluation.classification import make_predict_fn
from salun_jax.models import create_model
from salun_jax.pipeline import classification
from salun_jax.pipeline.common import UserError
from salun_jax.pipeline.tuning import tuning_grids
from salun_jax.train import TrainConfig, train_classifier
from salun_jax.unlearn import UnlearnConfig, UnlearnTask, get_method

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs")


def _config(variant="tiny"):
    path = os.path.join(CONFIGS, "digits_unlearn.py")
    spec = importlib.util.spec_from_file_location("config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def test_grid_budget_and_errors():
    grid = tuning.make_grid("FT", (0.1, 0.2), (1, 2, 3))
    assert grid.knob == "epochs" and grid.size == 6
    assert tuning.make_grid("SalUn", (0.1,), (0.5,)).knob == "mask_fraction"
    assert tuning.check_budget({"FT": grid, "GA": tuning.make_grid("GA", (1, 2, 3), (1, 2))}) == 6
    with pytest.raises(ValueError, match="same size"):
        tuning.check_budget({"FT": grid, "GA": tuning.make_grid("GA", (1.0,), (1,))})
    assert tuning.make_grid("IU", (0.1,), (10,)).knob == "woodfisher_samples"
    assert tuning.make_grid("BE", (0.1,), (2,)).knob == "epochs"
    with pytest.raises(ValueError, match="no tuning protocol"):
        tuning.make_grid("Retrain", (0.1,), (1,))
    with pytest.raises(ValueError, match="positive integers"):
        tuning.make_grid("FT", (0.1,), (1.5,))
    with pytest.raises(ValueError, match="positive integers"):
        tuning.make_grid("IU", (0.1,), (0,))


def test_config_grids_share_one_budget():
    config = _config("tuned")
    grids = tuning_grids(config)
    # run_methods order: every unlearning method
    assert list(grids) == ["FT", "GA", "RL", "IU", "l1-sparse", "BS", "BE", "SalUn", "SalUn-soft"]
    assert {g.size for g in grids.values()} == {12}
    assert tuning_grids(_config("")) == {}  # off by default: the main job does not tune
    config.run_methods = ("FT", "GA")
    with pytest.raises(UserError, match="against Retrain"):
        tuning_grids(config)
    config.run_methods = ("Retrain", "FT", "GA")
    config.tuning.grids.FT.learning_rates = (0.01,)
    with pytest.raises(UserError, match="same size"):
        tuning_grids(config)


def test_validation_split_and_average_gap():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    test_labels = np.array([0, 1, 2, 0])  # class 3 dropped from the test split (class-wise)
    split = Split(
        train=np.arange(6),
        val=np.array([1, 3, 7]),
        forget=np.array([0]),
        retain=np.arange(1, 6),
        test=np.arange(4),
        description={},
    )
    val_split = tuning.validation_split(split, labels, test_labels)
    np.testing.assert_array_equal(val_split.test, [1, 3])  # index 7 is class 3: dropped
    np.testing.assert_array_equal(val_split.forget, split.forget)
    with pytest.raises(ValueError, match="validation"):
        tuning.validation_split(dataclasses.replace(split, val=np.zeros(0, int)), labels, labels)
    gap = tuning.average_gap(
        {"UA": 10.0, "RA": 90.0, "VA": 80.0, "MIA": 20.0},
        {"UA": 12.0, "RA": 95.0, "VA": 80.0, "MIA": 17.0},
    )
    assert gap == pytest.approx((2 + 5 + 0 + 3) / 4)


@pytest.fixture(scope="module")
def digits_setup():
    from salun_jax import load_dataset, make_split

    data = load_dataset("digits")
    images, labels = data.train_images, data.train_labels
    split = make_split(labels, data.test_labels, scenario="random", forget_fraction=0.1, seed=1)
    model = create_model("small_cnn", 10, data.mean, data.std, width=0.25)
    recipe = TrainConfig(epochs=2, batch_size=64, learning_rate=0.05, crop_padding=0, flip=False)
    original = train_classifier(images, labels, split.train, model, recipe).state
    retrained = train_classifier(
        images, labels, split.retain, model, dataclasses.replace(recipe, seed=7)
    ).state
    task = UnlearnTask(model, images, labels, split, 10)
    val_split = tuning.validation_split(split, labels, data.test_labels)
    predict_fn = make_predict_fn(model.apply)
    reference = tuning.validation_metrics(predict_fn, retrained.variables, task, val_split, 1)
    return task, original, val_split, predict_fn, reference


def test_tune_method_picks_the_smallest_gap_and_epoch_snapshots_are_shorter_runs(digits_setup):
    task, original, val_split, predict_fn, reference = digits_setup
    config = UnlearnConfig(epochs=9, learning_rate=0.01, batch_size=64, crop_padding=0, flip=False)
    grid = tuning.make_grid("FT", (0.005, 0.05), (1, 2))
    summary, variables = tuning.tune_method(
        "FT", original, task, config, grid, reference, predict_fn, val_split, seed=3
    )
    points = summary["points"]
    assert sorted((p["learning_rate"], p["epochs"]) for p in points) == [
        (0.005, 1),
        (0.005, 2),
        (0.05, 1),
        (0.05, 2),
    ]
    for point in points:
        assert point["gap"] == pytest.approx(tuning.average_gap(point["validation"], reference))
    chosen = summary["chosen"]
    assert chosen["gap"] == min(p["gap"] for p in points)
    assert summary["grid"]["size"] == 4
    chosen_metrics = tuning.validation_metrics(predict_fn, variables, task, val_split, 3)
    assert chosen_metrics == pytest.approx(chosen["validation"])
    # The 1-epoch snapshot of the 2-epoch population run is the 1-epoch single run.
    single = get_method("FT")(
        original,
        task,
        dataclasses.replace(config, epochs=1, learning_rate=0.05),
        jax.random.key(3),
        order_seed=population.unlearning_order_seed(3),
    )
    single_metrics = tuning.validation_metrics(
        predict_fn, jax.device_get(single.state.variables), task, val_split, 3
    )
    point = next(p for p in points if p["learning_rate"] == 0.05 and p["epochs"] == 1)
    for key in ("UA", "RA", "VA"):
        assert single_metrics[key] == pytest.approx(point["validation"][key], abs=1.0)


def test_tune_salun_masks_per_member(digits_setup):
    from salun_jax import saliency

    task, original, val_split, predict_fn, reference = digits_setup
    config = UnlearnConfig(epochs=1, learning_rate=0.01, batch_size=64, crop_padding=0, flip=False)
    scores = saliency.classification_scores(
        original, task.images, task.labels, task.forget, batch_size=64, crop_padding=0, flip=False
    )
    grid = tuning.make_grid("SalUn", (0.01,), (0.2, 0.8))
    summary, variables = tuning.tune_method(
        "SalUn",
        original,
        task,
        config,
        grid,
        reference,
        predict_fn,
        val_split,
        seed=1,
        mask_scores=scores,
    )
    assert [p["mask_fraction"] for p in summary["points"]] == [0.2, 0.8]
    assert summary["chosen"] in summary["points"]
    # Each member got its own fraction's hard mask: the chosen model's weights outside it are
    # bit-identical to the original's, and some inside changed.
    mask = saliency.mask_sweep(scores, [summary["chosen"]["mask_fraction"]])
    mask = next(iter(mask.values()))
    leaves = jax.tree.leaves(
        jax.tree.map(
            lambda new, old, m: np.all(np.asarray(new)[m == 0] == np.asarray(old)[m == 0]),
            variables["params"],
            jax.device_get(original.params),
            jax.device_get(mask),
        )
    )
    assert all(leaves)
    changed = jax.tree.leaves(
        jax.tree.map(
            lambda new, old: np.any(np.asarray(new) != np.asarray(old)),
            variables["params"],
            jax.device_get(original.params),
        )
    )
    assert any(changed)
    with pytest.raises(ValueError, match="saliency scores"):
        tuning.tune_method(
            "SalUn", original, task, config, grid, reference, predict_fn, val_split, seed=1
        )


@pytest.mark.xla_optimized  # trains for seconds in-process: optimised code pays off
def test_pipeline_writes_tuned_table_and_choices(tmp_path):
    config = _config()
    config.tuning.enabled = True
    config.run_methods = ("Retrain", "FT", "SalUn")
    config.sweep_fractions = ()
    table = classification.train_and_evaluate(config, str(tmp_path))
    assert "### Tuned: 2 settings per method" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["tuned_runs"]} == {"FT", "SalUn"}
    entry = results["tuning"]["1"]
    assert set(entry["Retrain"]) == {"UA", "RA", "VA", "MIA"}
    for method in ("FT", "SalUn"):
        assert entry[method]["grid"]["size"] == 2
        assert entry[method]["chosen"]["gap"] == min(p["gap"] for p in entry[method]["points"])
    assert set(results["tuned_summary"]) == {"Retrain", "FT", "SalUn"}
    # A rerun keeps the tuned rows (nothing is retuned).
    before = results["tuned_runs"]
    classification.train_and_evaluate(config, str(tmp_path))
    after = json.loads((tmp_path / "results.json").read_text())["tuned_runs"]
    assert after == before


def test_tune_iu_sweeps_the_step_size_on_one_direction(digits_setup):
    task, original, val_split, predict_fn, reference = digits_setup
    config = UnlearnConfig(batch_size=64, crop_padding=0, flip=False, iu_step_size=0.0)
    grid = tuning.make_grid("IU", (0.0, 0.3), (4, 8))
    summary, variables = tuning.tune_method(
        "IU", original, task, config, grid, reference, predict_fn, val_split, seed=2
    )
    assert [(p["learning_rate"], p["woodfisher_samples"]) for p in summary["points"]] == [
        (0.0, 4),
        (0.3, 4),
        (0.0, 8),
        (0.3, 8),
    ]
    # alpha = 0 leaves the original; alpha = 0.3 is IU's single run with that step size.
    untouched = tuning.validation_metrics(predict_fn, original.variables, task, val_split, 2)
    assert summary["points"][0]["validation"] == pytest.approx(untouched)
    chosen = summary["chosen"]
    single = get_method("IU")(
        original,
        task,
        dataclasses.replace(
            config,
            iu_step_size=chosen["learning_rate"],
            woodfisher_samples=chosen["woodfisher_samples"],
        ),
        jax.random.key(2),
    ).state
    chex.assert_trees_all_close(variables["params"], jax.device_get(single.params), atol=1e-5)


def test_tune_ssd_sweeps_alpha_and_lambda_on_one_pair_of_importances(digits_setup):
    task, original, val_split, predict_fn, reference = digits_setup
    config = UnlearnConfig(batch_size=64, crop_padding=0, flip=False)
    grid = tuning.make_grid("SSD", (0.5, 1.0), (1.0, 10.0))
    summary, variables = tuning.tune_method(
        "SSD", original, task, config, grid, reference, predict_fn, val_split, seed=5
    )
    assert [(p["learning_rate"], p["ssd_alpha"]) for p in summary["points"]] == [
        (0.5, 1.0),
        (1.0, 1.0),
        (0.5, 10.0),
        (1.0, 10.0),
    ]
    chosen = summary["chosen"]
    single = get_method("SSD")(
        original,
        task,
        dataclasses.replace(
            config, ssd_lambda=chosen["learning_rate"], ssd_alpha=chosen["ssd_alpha"]
        ),
        jax.random.key(5),
    ).state
    chex.assert_trees_all_close(variables["params"], jax.device_get(single.params), atol=1e-6)


def test_tune_be_scores_the_k_way_model(digits_setup):
    task, original, val_split, predict_fn, reference = digits_setup
    config = UnlearnConfig(epochs=1, learning_rate=0.01, batch_size=64, crop_padding=0, flip=False)
    grid = tuning.make_grid("BE", (1e-3, 1e-2), (1, 2))
    summary, variables = tuning.tune_method(
        "BE", original, task, config, grid, reference, predict_fn, val_split, seed=4
    )
    assert sorted((p["learning_rate"], p["epochs"]) for p in summary["points"]) == [
        (1e-3, 1),
        (1e-3, 2),
        (1e-2, 1),
        (1e-2, 2),
    ]
    chex.assert_trees_all_equal_shapes(variables["params"], jax.device_get(original.params))
    chosen = summary["chosen"]
    single = get_method("BE")(
        original,
        task,
        dataclasses.replace(config, epochs=chosen["epochs"], learning_rate=chosen["learning_rate"]),
        jax.random.key(4),
        progress=False,
    ).state
    single_metrics = tuning.validation_metrics(
        predict_fn, jax.device_get(single.variables), task, val_split, 4
    )
    for key in ("UA", "RA", "VA"):
        assert single_metrics[key] == pytest.approx(chosen["validation"][key], abs=1.0)
    with pytest.raises(ValueError, match="remove_shadow_logit"):
        tuning.tune_method(
            "BE",
            original,
            task,
            dataclasses.replace(config, remove_shadow_logit=False),
            grid,
            reference,
            predict_fn,
            val_split,
            seed=4,
        )
