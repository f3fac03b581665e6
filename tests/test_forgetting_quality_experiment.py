"""End to end: experiments/forgetting_quality.py in its tiny configuration."""

import json


def test_forgetting_quality_tiny(experiment, tmp_path):
    workdir = tmp_path / "fq"
    result = experiment("forgetting_quality.py", "digits_forgetting_quality.py:tiny", workdir)
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
    again = experiment("forgetting_quality.py", "digits_forgetting_quality.py:tiny", workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads((workdir / "results.json").read_text())
    for method, row in results.items():  # the same models, the same numbers; only times differ
        assert {k: v for k, v in rerun[method].items() if k != "seconds"} == {
            k: v for k, v in row.items() if k != "seconds"
        }
    assert "resuming after epoch" in again.stderr
    assert len(list((workdir / "populations").iterdir())) == 2 + len(results) - 2
