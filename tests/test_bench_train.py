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


def test_bench_train_conv_impls_quick(tmp_path):
    json_out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", SALUN_JAX_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--quick",
            "--conv_impls=xla,flax",
            "--torch=false",
            "--rounds=2",
            f"--json_out={json_out}",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU options (salun_jax.cpu.enable)" in result.stdout
    (record,) = json.loads(json_out.read_text())["conv_results"]
    assert set(record["images_per_s"]) == {"jax xla", "jax flax"}
    assert "jax flax / jax xla" in record["ratios"]
    assert all(len(t) == 2 for t in record["step_s_per_round"].values())


def test_torch_twin_has_the_same_parameter_count():
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import torch_twin
    finally:
        sys.path.pop(0)
    from salun_jax.models import create_model

    net = torch_twin.resnet((2, 2, 2, 2), 0.25, 10, (0.5,) * 3, (0.25,) * 3)
    model = create_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3, 0.25)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert sum(p.numel() for p in net.parameters()) == sum(x.size for x in jax.tree.leaves(params))
    assert isinstance(net(torch.zeros(2, 3, 32, 32)), torch.Tensor)


def test_conv_settings_are_the_wings_modules():
    import flax.linen as nn

    from salun_jax.cpu import conv

    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    assert bench_train.conv_setting("xla") is conv.Conv
    assert bench_train.conv_setting("flax") is nn.Conv
    for bad in ("auto", "plain", "custom", "xla+ynn"):
        with pytest.raises(ValueError, match="unknown conv_impls setting"):
            bench_train.conv_setting(bad)
