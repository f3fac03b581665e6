"""End-to-end tests of the experiment scripts in tiny configurations (subprocesses, temp dirs)."""

import json
import os

import numpy as np
import pytest


@pytest.fixture
def run(experiment):
    return experiment


def _tiny(run, script, workdir, *overrides):
    return run(script, "digits_unlearn.py:tiny", workdir, *overrides)


def test_train_script_end_to_end_and_resume(run, tmp_path):
    result = run("train.py", "digits.py", tmp_path, "--config.train.epochs=2")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("config.json", "split.npz", "metrics.jsonl", "results.json", "checkpoints"):
        assert os.path.exists(tmp_path / name), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs"] == 2 and results["test_accuracy"] > 20.0
    again = run("train.py", "digits.py", tmp_path, "--config.train.epochs=2")
    assert again.returncode == 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # nothing retrained


def test_unlearn_pipeline_end_to_end(run, tmp_path):
    result = _tiny(run, "unlearn.py", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {r["method"] for r in results["runs"]}
    assert methods == {
        "Original",
        "Retrain",
        "FT",
        "GA",
        "RL",
        "IU",
        "l1-sparse",
        "BS",
        "BE",
        "SalUn",
        "SalUn-soft",
    }
    for row in results["runs"]:
        for key in ("UA", "RA", "TA", "MIA"):
            assert 0.0 <= row["metrics"][key] <= 100.0
        assert row["split_hash"] and row["fingerprint"] and row["code"]
    assert results["summary"]["Retrain"]["avg_gap"] == 0.0
    assert results["masks"]["1"]["ones"] == int(0.5 * results["masks"]["1"]["size"])
    assert results["sweep"]["1"]["fractions"] == [0.2, 0.5]
    table = (tmp_path / "results.md").read_text()
    assert "| Retrain |" in table and "| SalUn |" in table
    assert os.path.getsize(tmp_path / "plots" / "salun_mask_sweep.png") > 0
    assert os.path.getsize(tmp_path / "plots" / "layer_saliency.png") > 0
    masks = tmp_path / results["masks"]["1"]["directory"]
    assert masks.parent == tmp_path / "seed_1" and (masks / "with_0.50.npz").exists()

    # Re-running resumes: no training, no method run again, same results.
    again = _tiny(run, "unlearn.py", tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads((tmp_path / "results.json").read_text())
    assert [r["metrics"]["UA"] for r in rerun["runs"]] == [
        r["metrics"]["UA"] for r in results["runs"]
    ]
    assert "FT 1/1" not in again.stderr

    # Changing one method's config reruns that method only.
    changed = _tiny(run, "unlearn.py", tmp_path, "--config.methods.FT.learning_rate=0.001")
    assert changed.returncode == 0
    assert "FT 1/1" in changed.stderr and "GA 1/1" not in changed.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.run_methods=('FT','Forget-Me-Not')",
            "unknown classification unlearning method 'Forget-Me-Not'",
        ),
        ("--config.mask.fraction=1.5", "mask fraction must be in (0, 1]"),
        ("--config.mask.fractoin=0.5", 'Did you mean "fraction"'),
        ("--config.unlearn.mask_mode=soft", "unknown mask_mode 'soft'"),
        ("--config.dataset=cifar11", "unknown data set 'cifar11'"),
        ("--config.train.epochz=2", 'Did you mean "epochs"'),
    ],
)
def test_bad_inputs_give_one_clear_line(run, tmp_path, override, message):
    result = _tiny(run, "unlearn.py", tmp_path, override)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]


def test_split_from_another_data_set_refused(run, tmp_path):
    from salun_jax.data.splits import make_split, save_split

    rng = np.random.default_rng(0)
    other = make_split(
        rng.integers(0, 10, 500),
        rng.integers(0, 10, 100),
        scenario="random",
        num_forget=10,
        dataset="other",
    )
    os.makedirs(tmp_path / "seed_1")
    save_split(str(tmp_path / "seed_1" / "split.npz"), other)
    result = _tiny(run, "unlearn.py", tmp_path)
    assert result.returncode == 2
    assert "does not match this data set: train size 500 in split vs" in result.stderr


def test_changed_training_config_refused_in_same_workdir(run, tmp_path):
    assert run("train.py", "digits.py", tmp_path, "--config.train.epochs=1").returncode == 0
    result = run("train.py", "digits.py", tmp_path, "--config.train.width=0.25")
    assert result.returncode == 2 and "different train config" in result.stderr


def test_compilation_cache_goes_to_the_data_cache_directory(tmp_path):
    import jax

    from salun_jax.pipeline.cli import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        directory = enable_compilation_cache(cache_dir=str(tmp_path))
        assert directory == os.path.join(str(tmp_path), "jax_compilation")
        assert jax.config.jax_compilation_cache_dir == directory
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
