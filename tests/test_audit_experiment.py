"""End to end: experiments/audit.py in its tiny configuration (results, the sanity row, resume),
and the GPU config's method settings."""

import importlib.util
import json
import os

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs")


def test_audit_tiny_writes_its_tables_and_resumes_without_work(experiment, tmp_path):
    workdir = tmp_path / "audit"
    # Level 0: the population programs compile for longer than they run (conftest).
    result = experiment("audit.py", "audit_digits.py:tiny", workdir, optimized=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["audit"]) == {"Original", "Retrain", "SalUn"}
    assert set(results["sequential"]) == {"Retrain", "SalUn"}
    for row in results["audit"].values():
        for key in ("ulira_auc", "ulira_tpr_at_1pct_fpr", "ulira_tpr_at_0.1pct_fpr"):
            assert 0.0 <= row[key] <= 1.0
        for key in ("mia", "klom_mean", "l2_original", "l2_retrain", "loss_barrier"):
            assert key in row
        assert 0.0 <= row["tug_of_war"] <= 1.0
        assert len(row["relearn_retain_curve"]) == 3  # before and after each of 2 steps
    # Retrain against Retrain: chance, within the tiny run's sampling error (60 positives).
    assert abs(results["audit"]["Retrain"]["ulira_auc"] - 0.5) < 0.15
    assert results["audit"]["Retrain"]["l2_retrain"] == 0.0
    assert results["audit"]["Retrain"]["tug_of_war"] > 0.8  # two Retrain populations agree
    assert results["audit"]["Original"]["l2_original"] == 0.0
    requests = results["sequential"]["SalUn"]["requests"]
    assert [r["request"] for r in requests] == [0, 1] and requests[1]["UA_earlier"] is not None
    text = (workdir / "results.md").read_text()
    assert "| Retrain |" in text and "Sequential requests" in text
    for plot in ("roc.png", "relearning.png"):
        assert (workdir / "plots" / plot).exists()
    first = json.loads((workdir / "run.json").read_text())
    assert len(first["computed"]) == 3 + 2 and first["reused"] == []
    # A rerun reuses every stage: nothing trained, the same numbers.
    again = experiment("audit.py", "audit_digits.py:tiny", workdir, optimized=False)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((workdir / "run.json").read_text())
    assert rerun["computed"] == [] and len(rerun["reused"]) == 5
    assert json.loads((workdir / "results.json").read_text())["audit"] == results["audit"]
    assert "epoch" not in again.stderr  # no training loop ran


def test_gpu_config_builds_its_method_configs():
    from salun_jax.pipeline.classification import method_config
    from salun_jax.train import TrainConfig

    spec = importlib.util.spec_from_file_location(
        "config", os.path.join(CONFIGS, "audit_cifar10_gpu.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in ("", "tiny"):
        config = module.get_config(variant)
        TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.train.items()})
        for method in config.run_methods:
            method_config(config, method)
    assert module.get_config("").groups * module.get_config("").group_size == 32
