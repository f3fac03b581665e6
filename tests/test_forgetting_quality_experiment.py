"""End to end: experiments/forgetting_quality.py in its tiny configuration."""

import json


def test_forgetting_quality_tiny(experiment, tmp_path):
    workdir = tmp_path / "fq"
    # Level 0: the population programs compile for longer than they run (conftest).
    fq = ("forgetting_quality.py", "digits_forgetting_quality.py:tiny", workdir)
    result = experiment(*fq, optimized=False)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) == {"Retrain", "Original", "GA", "SalUn"}
    for row in results.values():
        assert 0.0 <= row["forgetting_quality"] <= 1.0
        assert row["final_score"] >= 0.0
        assert row["num_models"] == 4
    assert (workdir / "plots" / "epsilon_SalUn.png").exists()
    assert "| Retrain |" in (workdir / "results.md").read_text()
    run_info = json.loads((workdir / "run.json").read_text())
    assert "halves" in run_info["sanity_row"]
    # A rerun on the same work directory restores every population from its checkpoints.
    again = experiment(*fq, "--verbosity=1", optimized=False)
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads((workdir / "results.json").read_text())
    for method, row in results.items():  # the same models, the same numbers; only times differ
        assert {k: v for k, v in rerun[method].items() if k != "seconds"} == {
            k: v for k, v in row.items() if k != "seconds"
        }
    assert "resuming after epoch" in again.stderr
    assert len(list((workdir / "populations").iterdir())) == 2 + len(results) - 2


def test_cifar_gpu_config_builds_its_method_configs():
    # The GPU config is not run here (no GPU); its methods must be population methods and its
    # method settings must make valid UnlearnConfigs, in both variants.
    import importlib.util
    import os

    from salun_jax import population
    from salun_jax.pipeline.classification import method_config
    from salun_jax.train import TrainConfig

    path = os.path.join(
        os.path.dirname(__file__),
        os.pardir,
        "experiments",
        "configs",
        "cifar10_forgetting_quality.py",
    )
    spec = importlib.util.spec_from_file_location("config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in ("", "tiny"):
        config = module.get_config(variant)
        assert set(config.run_methods) <= set(population.POPULATION_METHODS)
        TrainConfig(**config.train.to_dict())
        for method in config.run_methods:
            assert method_config(config, method).learning_rate > 0
    assert module.get_config("").members == 32
