"""Every model of a finished classification run comes back from its work directory
(`sj.load_run`) and reproduces its row (`sj.evaluate_run`), also through
`experiments/evaluate.py`."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import salun_jax as sj
from salun_jax.pipeline import classification
from salun_jax.pipeline.common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("UA", "RA", "TA", "MIA")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    path = os.path.join(REPO, "experiments", "configs", "digits_unlearn.py")
    spec = importlib.util.spec_from_file_location("c", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.train.epochs = 2
    config.sweep_fractions = ()
    config.run_methods = ("Retrain", "SalUn", "BE")
    config.methods.BE.remove_shadow_logit = False  # a K+1-way head comes back as it was saved
    workdir = tmp_path_factory.mktemp("run")
    classification.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.mark.parametrize("method", ["SalUn", "Original", "Retrain", "BE"])
def test_a_saved_model_reproduces_its_row(finished, method):
    run = sj.load_run(str(finished), method, seed=1)
    metrics = sj.evaluate_run(run)
    assert {k: metrics[k] for k in KEYS} == {k: run.metrics[k] for k in KEYS}
    if method == "SalUn":
        assert run.config["learning_rate"] == 0.005 and run.mask is not None
        ones = sum(int(np.sum(m)) for m in jax.tree.leaves(run.mask))
        size = sum(m.size for m in jax.tree.leaves(run.mask))
        assert ones == int(0.5 * size)
    if method == "BE":
        assert run.model.num_classes == 11


def test_missing_rows_and_other_mia_kinds(finished):
    with pytest.raises(UserError, match="no saved FT model of seed 1"):
        sj.load_run(str(finished), "FT", seed=1)
    run = sj.load_run(str(finished), "SalUn", seed=1)
    metrics = sj.evaluate_run(run, mia_kinds=("entropy",))
    assert set(metrics["MIA_all"]) == {"confidence", "entropy"}


def test_evaluate_script_reevaluates_a_saved_model(finished):
    script = os.path.join(REPO, "experiments", "evaluate.py")
    args = [f"--workdir={finished}", "--method=SalUn", "--seed=1", "--mia_kinds=entropy"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout)
    rows = json.loads((finished / "results.json").read_text())["runs"]
    salun = next(r for r in rows if r["method"] == "SalUn")
    assert {k: printed["metrics"][k] for k in KEYS} == {k: salun["metrics"][k] for k in KEYS}
    assert "entropy" in printed["metrics"]["MIA_all"]


def test_every_run_of_the_pipeline_has_its_tensorboard_scalars(finished):
    """`tensorboard --logdir <workdir>` finds one run per model: the originals and Retrain
    (written by the loop as they train) and every method (its epochs and its evaluation)."""
    from salun_jax import metric_writer

    runs = {
        os.path.relpath(os.path.dirname(path), finished)
        for path in (str(p) for p in finished.rglob("events.out.tfevents.*"))
    }
    rows = json.loads((finished / "results.json").read_text())["runs"]
    assert runs == {os.path.join(r["model"], "tensorboard") for r in rows}
    salun = next(r for r in rows if r["method"] == "SalUn")
    scalars = metric_writer.read_scalars(str(finished / salun["model"] / "tensorboard"))
    assert [v for _, v in scalars["loss"]] == pytest.approx([h["loss"] for h in salun["history"]])
    forget = scalars["forget_accuracy"]
    assert forget == [(len(salun["history"]), pytest.approx(100.0 - salun["metrics"]["UA"]))]
