"""End-to-end tests of experiments/diffusion.py (tiny config), the paper config, and
experiments/bench_diffusion.py --quick."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "diffusion.py")
CONFIGS = os.path.join(REPO, "experiments", "configs")
TINY = os.path.join(CONFIGS, "digits_ddpm.py") + ":tiny"
METHOD_KEYS = {"UA", "forget_class_accuracy", "retain_accuracy", "per_class_accuracy", "FD",
               "run_time_s", "sampling_seconds", "num_samples_per_class"}


def _env():
    # One device (no forced host devices: their all-reduces can deadlock here, environment.md).
    # LLVM optimisation level 0 only shortens compilation, which is most of these tiny runs
    # (measured: 55 s -> 35 s for the tiny pipeline); the numerics are XLA's either way.
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")


def _run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, *args], env=_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _load_config(name, variant=""):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def test_pipeline_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "run"
    first = _run([SCRIPT, f"--config={TINY}", f"--workdir={workdir}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["forget_class"] == 0 and results["num_classes"] == 10
    assert results["image_shape"] == [8, 8, 1]
    assert 0 <= results["classifier"]["test_accuracy"] <= 100
    assert results["effective_alpha_per_element"] == pytest.approx(results["alpha"] * 64)
    assert results["mask"]["ones"] == int(0.5 * results["mask"]["size"])
    assert set(results["methods"]) == {"Original", "SalUn", "RL", "GA"}
    for method, metrics in results["methods"].items():
        assert METHOD_KEYS <= set(metrics), method
        assert 0 <= metrics["UA"] <= 100
        assert set(metrics["per_class_accuracy"]) == {str(k) for k in range(10)}
        assert metrics["UA"] == pytest.approx(100 - metrics["forget_class_accuracy"])
        assert metrics["FD"] is not None and metrics["FD"] >= 0
        assert (workdir / "grids" / f"{method}.png").stat().st_size > 0
    table = (workdir / "results.md").read_text()
    assert "| SalUn |" in table and "FD (classifier features)" in table
    assert (workdir / "masks" / "forget_0_with_0.50.npz").exists()

    # Re-running resumes: nothing is trained or evaluated again.
    metrics_lines = (workdir / "original" / "metrics.jsonl").read_text()
    second = _run([SCRIPT, f"--config={TINY}", f"--workdir={workdir}"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (workdir / "original" / "metrics.jsonl").read_text() == metrics_lines
    again = json.loads((workdir / "results.json").read_text())
    assert again["methods"] == results["methods"]
    assert "SalUn:" in first.stderr and "SalUn:" not in second.stderr  # its progress bar


def test_pipeline_rejects_unknown_forget_class(tmp_path):
    result = _run([SCRIPT, f"--config={TINY}", f"--workdir={tmp_path / 'bad'}",
                   "--config.forget_class=12"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert "forget_class 12 is not a class of this 10-class model" in result.stderr
    assert not (tmp_path / "bad" / "original").exists()


@pytest.mark.parametrize("variant", ["", "tiny"])
def test_paper_config_builds_the_paper_unet(variant):
    from salun_jax.diffusion.training import DiffusionTrainConfig
    from salun_jax.diffusion.unlearning import DiffusionUnlearnConfig
    from salun_jax.models.unet import UNet

    config = _load_config("cifar10_ddpm_paper", variant)
    train = DiffusionTrainConfig(**config.train.to_dict())
    unlearn = DiffusionUnlearnConfig(**config.unlearn.to_dict())
    if not variant:
        assert (train.num_iterations, train.batch_size, train.learning_rate) == (800_000, 128,
                                                                                  2e-4)
        assert train.ema_decay == 0.9999 and train.flip
        assert (unlearn.num_iterations, unlearn.learning_rate, unlearn.alpha) == (1000, 1e-4,
                                                                                  1e-3)
        assert config.mask.fraction == 0.5 and config.sample.num_per_class == 500
        assert (config.sample.num_steps, config.sample.eta,
                config.sample.guidance_scale) == (1000, 1.0, 2.0)
    model_args = dict(config.model.to_dict(), ch_mult=tuple(config.model.ch_mult),
                      attn_resolutions=tuple(config.model.attn_resolutions))
    model = UNet(num_classes=10, image_size=32, out_channels=3, **model_args)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros(1, jnp.int32),
        jnp.zeros(1, jnp.int32), train=False))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 38_632_323


def test_digits_config_is_the_documented_recipe():
    config = _load_config("digits_ddpm")
    assert config.unlearn.alpha * 64 == pytest.approx(3.072)  # upstream's per-element weight
    assert set(config.run_methods) == {"Retrain", "SalUn", "RL", "GA"}
    with pytest.raises(ValueError, match="unknown variant"):
        _load_config("digits_ddpm", "huge")


def test_bench_diffusion_quick(tmp_path):
    json_out = tmp_path / "bench.json"
    result = _run([os.path.join(REPO, "experiments", "bench_diffusion.py"), "--quick",
                   f"--json_out={json_out}"], tmp_path, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s" in result.stdout
    output = json.loads(json_out.read_text())
    assert output["reference"]["jax_matmul_gflops"] > 0
    (train,) = output["train"]
    (sampling,) = output["sampling"]
    assert train["images_per_s"] > 0 and sampling["images_per_s"] > 0
