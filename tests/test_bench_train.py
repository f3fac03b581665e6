"""End-to-end test of experiments/bench_train.py in its --quick configuration."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "bench_train.py")


def test_bench_train_quick(tmp_path):
    json_out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # One device: forced host devices can deadlock all-reduces here on 2-core XLA:CPU machines.
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, SCRIPT, "--quick", f"--json_out={json_out}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loop/bare" in result.stdout
    output = json.loads(json_out.read_text())
    assert output["reference"]["jax_matmul_gflops"] > 0
    (record,) = output["results"]
    assert record["model"] == "small_cnn"
    assert record["flops_source"].startswith("XLA cost analysis")
    # The printed rates follow from the measured step time and the compiled step's FLOPs.
    for phase in ("bare", "loop"):
        rates = record[phase]
        assert rates["images_per_s"] == pytest.approx(record["batch_size"] / rates["step_s"])
        assert rates["gflops"] == pytest.approx(record["flops_per_step"] / rates["step_s"] / 1e9)
        assert rates["pct_of_matmul"] == pytest.approx(
            100 * rates["gflops"] / output["reference"]["jax_matmul_gflops"]
        )
    assert len(record["bare_step_s_per_round"]) == len(record["loop_step_s_per_round"]) == 2
    # Trace and compile checks are exact, unlike the (noisy, dispatch-bound) tiny-model ratio:
    # after the warm-up call, each loop.run compiles its step once and nothing else.
    assert record["loop_compiles_after_warmup"] == 0
    assert record["passed"] == (record["loop_over_bare"] >= output["min_ratio"])
    assert output["passed"] == record["passed"]
    assert record["finite"]
