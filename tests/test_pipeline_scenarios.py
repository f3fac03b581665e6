"""The classification pipeline's evaluation settings end to end (in-process, digits, tiny):
both forgetting scenarios of the main job, class-stratified MIA shadow sets and the loss MIA."""

import importlib.util
import json
import os

import numpy as np
import pytest

from salun_jax.data.splits import load_split
from salun_jax.evaluation.mia import stratified_shadow_indices
from salun_jax.pipeline import classification
from salun_jax.pipeline.common import UserError, load_data

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs")


def _config(name="digits_unlearn.py", variant="tiny"):
    spec = importlib.util.spec_from_file_location("config", os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def test_every_classification_config_sets_mia_shadow():
    for name in (
        "digits_unlearn.py",
        "digits_classwise.py",
        "cifar10_cpu.py",
        "cifar10_paper.py",
        "cifar10_classwise_paper.py",
    ):
        assert _config(name, "").mia_shadow == "stratified", name


def test_bad_mia_shadow_is_refused(tmp_path):
    config = _config()
    config.mia_shadow = "first"
    with pytest.raises(UserError, match="mia_shadow"):
        classification.train_and_evaluate(config, str(tmp_path))


@pytest.mark.xla_optimized  # trains for seconds in-process: optimised code pays off
def test_both_scenarios_stratified_shadow_sets_and_loss_mia(tmp_path):
    config = _config()
    assert config.scenarios == ("random",)  # the tiny variant: one scenario
    config.scenarios = ("random", "classwise")
    config.run_methods = ("Retrain", "FT")
    config.sweep_fractions = ()
    table = classification.train_and_evaluate(config, str(tmp_path))
    assert "## random" in table and "## classwise" in table
    assert (tmp_path / "results.md").read_text().count("| Retrain |") == 2

    top = json.loads((tmp_path / "results.json").read_text())
    assert list(top["scenarios"]) == ["random", "classwise"]
    # One original model per seed, shared by both scenarios (same train indices).
    assert len([d for d in os.listdir(tmp_path / "seed_1") if d.startswith("original_")]) == 1

    dataset = load_data(config)
    for name, forget in (("random", None), ("classwise", 3)):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert {r["method"] for r in results["runs"]} == {"Original", "Retrain", "FT"}
        for row in results["runs"]:
            assert row["metrics"]["shadow_seed"] == row["seed"] == 1
            assert 0.0 <= row["metrics"]["MIA_loss"] <= 100.0
        assert top["scenarios"][name]["summary"] == results["summary"]
        split = load_split(str(tmp_path / name / "seed_1" / "split.npz"))
        if forget is not None:
            assert set(dataset.train_labels[split.forget]) == {forget}
        # The shadow sets drawn from that seed have the same class histogram on both sides.
        retain_y = dataset.train_labels[split.retain]
        test_y = dataset.test_labels[split.test]
        member, nonmember = stratified_shadow_indices(retain_y, test_y, 1)
        np.testing.assert_array_equal(
            np.bincount(retain_y[member], minlength=10),
            np.bincount(test_y[nonmember], minlength=10),
        )
