"""The classification pipeline's ledger, through its public entry (`train_and_evaluate`, the
function `experiments/unlearn.py` runs): every stored model and row is keyed by a fingerprint of
what made it, so nothing made by other data or settings is reused, a row does not depend on which
other methods ran, and bad settings are refused before any work."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from salun_jax.pipeline import classification
from salun_jax.pipeline.common import UserError

# The classification pipeline in-process, several times a test: level 1 pays (conftest).
pytestmark = pytest.mark.xla_optimized

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs")


def _config(**changes):
    spec = importlib.util.spec_from_file_location(
        "config", os.path.join(CONFIGS, "digits_unlearn.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.sweep_fractions = ()
    config.train.epochs = 2
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def _rows(workdir):
    runs = json.loads((workdir / "results.json").read_text())["runs"]
    return {row["method"]: row for row in runs}


def _quality(row):
    """A row's metrics without its timings."""
    return {k: v for k, v in row["metrics"].items() if not k.endswith("_time_s")}


def _originals(workdir):
    return sorted(d for d in os.listdir(workdir / "seed_1") if d.startswith("original_"))


def test_rows_are_keyed_by_name_not_by_the_method_list(tmp_path):
    """A subset of methods with the default sweep completes (it ended in KeyError: 'SalUn'); a
    method's row is the same whatever ran beside it, in whatever order; a longer list runs only
    what is missing."""
    first = tmp_path / "first"
    classification.train_and_evaluate(
        _config(run_methods=("Retrain", "FT"), sweep_fractions=(0.5,)), str(first)
    )
    assert (first / "results.md").exists()
    assert json.loads((first / "results.json").read_text())["sweep"]["1"]["fractions"] == [0.5]
    classification.train_and_evaluate(_config(run_methods=("GA", "FT", "Retrain")), str(first))
    alone = tmp_path / "alone"
    classification.train_and_evaluate(_config(run_methods=("GA",)), str(alone))
    rows, rows_alone = _rows(first), _rows(alone)
    assert _quality(rows["GA"]) == _quality(rows_alone["GA"])
    assert rows["GA"]["fingerprint"] == rows_alone["GA"]["fingerprint"]
    assert set(rows) == {"Original", "Retrain", "FT", "GA"}


def test_deleting_config_json_cannot_bring_back_a_stale_model(tmp_path):
    """config.json deleted (as its old error message suggested) and the learning rate changed:
    the original model and every row are made anew, never taken from the old run."""
    config = _config(run_methods=("Retrain", "FT"))
    classification.train_and_evaluate(config, str(tmp_path))
    before = _rows(tmp_path)
    (tmp_path / "config.json").unlink()
    changed = _config(run_methods=("Retrain", "FT"), **{"train.learning_rate": 0.01})
    classification.train_and_evaluate(changed, str(tmp_path))
    after = _rows(tmp_path)
    assert len(_originals(tmp_path)) == 2
    assert _quality(after["Original"]) != _quality(before["Original"])
    assert _quality(after["FT"]) != _quality(before["FT"])
    for method in ("Original", "FT", "Retrain"):
        assert after[method]["fingerprint"] != before[method]["fingerprint"], method
    # Back to the first settings: its models are still there (no third original) and the rows
    # are the first run's.
    classification.train_and_evaluate(config, str(tmp_path))
    again = _rows(tmp_path)
    assert len(_originals(tmp_path)) == 2
    assert {m: _quality(r) for m, r in again.items()} == {m: _quality(r) for m, r in before.items()}


def _write_images(root, shift):
    """A 3-class folder of 8x8 RGB PNGs, 40 train / 6 test per class; `shift` moves the pixels
    but keeps every name."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 6)):
        for label in range(3):
            directory = root / split / f"class{label}"
            directory.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (rng.integers(0, 64, (8, 8, 3)) + 60 * label + shift) % 256
                Image.fromarray(pixels.astype(np.uint8)).save(directory / f"{i:02d}.png")


def test_reexported_images_with_the_same_names_train_a_new_model(tmp_path):
    data = tmp_path / "images"
    _write_images(data, shift=0)
    config = _config(
        dataset=str(data),
        cache_dir=str(tmp_path / "cache"),
        run_methods=("Retrain",),
        **{"train.model": "small_cnn", "train.batch_size": 32, "split.forget_fraction": 0.2},
    )
    workdir = tmp_path / "run"
    classification.train_and_evaluate(config, str(workdir))
    before = _rows(workdir)
    _write_images(data, shift=128)
    for path in data.rglob("*.png"):  # a later export: newer files
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    classification.train_and_evaluate(config, str(workdir))
    after = _rows(workdir)
    assert len(_originals(workdir)) == 2
    assert after["Original"]["fingerprint"] != before["Original"]["fingerprint"]
    assert after["Retrain"]["fingerprint"] != before["Retrain"]["fingerprint"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seeds": (1, 1)}, "seeds lists 1 more than once"),
        ({"seeds": ()}, "seeds must be a non-empty tuple"),
        ({"mia_kinds": ("confidence", "entropyy")}, "mia_kinds must be a non-empty subset"),
        ({"run_methods": ("FT", "FT")}, "run_methods lists FT more than once"),
        ({"sweep_fractions": (0.5, 0.5)}, "sweep_fractions lists 0.5 more than once"),
        ({"split.scenario": "classs"}, "split.scenario must be one of"),
        ({"retrain_init": "shared"}, "retrain_init must be one of"),
        ({"train.milestones": (-1,)}, "milestones"),
        ({"methods.GA.epochs": -2}, "epochs"),
        ({"scenarios": ("random", "random")}, "scenarios lists random more than once"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, changes, message):
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        classification.train_and_evaluate(_config(**changes), str(workdir))
    assert not workdir.exists()  # nothing written: the corrected rerun starts clean


def test_duplicate_seeds_give_one_line_and_do_not_poison_the_workdir(experiment, tmp_path):
    bad = experiment("unlearn.py", "digits_unlearn.py:tiny", tmp_path, "--config.seeds=(1,1)")
    assert bad.returncode == 2
    line = bad.stderr.strip().splitlines()[-1]
    assert line == "error: seeds lists 1 more than once: (1, 1)", bad.stderr[-2000:]
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_train_classifier_workdir_refuses_another_recipe_or_data(digits, tmp_path):
    """`train_classifier(workdir=D)` called again with another recipe (or other data) used to
    return the first model; now it resumes only the same run and names what differs."""
    import salun_jax as sj

    model = sj.create_model("small_cnn", 10, digits.mean, digits.std, width=0.25)
    x, y = digits.train_images, digits.train_labels
    indices = np.arange(200)
    recipe = sj.TrainConfig(epochs=1, batch_size=100, crop_padding=1, flip=False)
    first = sj.train_classifier(x, y, indices, model, recipe, workdir=str(tmp_path), progress=False)
    same = sj.train_classifier(x, y, indices, model, recipe, workdir=str(tmp_path), progress=False)
    assert same.history == first.history  # the same run resumes (nothing to train)
    other = dataclasses.replace(recipe, learning_rate=0.05)
    with pytest.raises(sj.StaleRunError, match="holds a run made with other settings"):
        sj.train_classifier(x, y, indices, model, other, workdir=str(tmp_path), progress=False)
    flipped = np.ascontiguousarray(x[:, :, ::-1])
    with pytest.raises(sj.StaleRunError, match="other data"):
        sj.train_classifier(flipped, y, indices, model, recipe, workdir=str(tmp_path))
    with pytest.raises(sj.StaleRunError, match="other indices"):
        sj.train_classifier(x, y, indices[1:], model, recipe, workdir=str(tmp_path))


def test_retrain_init_shares_the_original_models_initial_weights_or_not(tmp_path):
    """With no training (0 epochs) each model is its initialisation: "original" gives Retrain the
    original model's initial weights (the same predictions, so the same row), "independent" its
    own. Both settings as two scenarios of one run."""
    import ml_collections

    config = _config(run_methods=("Retrain",), **{"train.epochs": 0, "train.milestones": ()})
    config.scenarios = ("independent", "original")
    config.scenario_settings = ml_collections.ConfigDict(
        {name: {"retrain_init": name} for name in config.scenarios}
    )
    classification.train_and_evaluate(config, str(tmp_path))
    for init in config.scenarios:
        rows = _rows(tmp_path / init)
        same = _quality(rows["Retrain"]) == _quality(rows["Original"])
        assert same == (init == "original"), init
