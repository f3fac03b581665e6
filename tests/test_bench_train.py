"""End-to-end test of experiments/bench_train.py in its --quick configuration."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "bench_train.py")


def test_bench_train_quick(tmp_path):
    json_out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # One device: forced host devices can deadlock all-reduces here (docs/environment.md).
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, SCRIPT, "--quick", f"--json_out={json_out}"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loop/bare" in result.stdout
    output = json.loads(json_out.read_text())
    assert output["reference"]["jax_matmul_gflops"] > 0
    (record,) = output["results"]
    assert record["model"] == "small_cnn"
    assert record["flops_per_step"] > 0
    assert record["flops_source"].startswith("XLA cost analysis")
    for phase in ("bare", "loop"):
        assert record[phase]["images_per_s"] > 0
        assert record[phase]["gflops"] > 0
    assert record["loop_over_bare"] > 0
    # Trace and compile checks are exact, unlike the (noisy, dispatch-bound) tiny-model ratio.
    assert record["loop_compiles_after_warmup"] == 0
    assert isinstance(record["passed"], bool)
