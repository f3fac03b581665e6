"""End-to-end tests of experiments/diffusion.py (tiny config, resume), the pipeline's split and
input checks (salun_jax.pipeline.diffusion), the paper and digits configs, and
experiments/bench_diffusion.py --quick."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax.data import load_dataset, subset_per_class
from salun_jax.data.splits import load_split, make_split, save_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "diffusion.py")
CONFIGS = os.path.join(REPO, "experiments", "configs")
TINY = os.path.join(CONFIGS, "digits_ddpm.py") + ":tiny"
RESULT_KEYS = {
    "dataset",
    "forget_class",
    "num_classes",
    "image_shape",
    "split_hash",
    "config",
    "classifier",
    "alpha",
    "effective_alpha_per_element",
    "mask",
    "methods",
    "wall_time_s",
}
METHOD_KEYS = {
    "UA",
    "forget_class_accuracy",
    "retain_accuracy",
    "per_class_accuracy",
    "FD",
    "run_time_s",
    "compile_time_s",
    "sampling_seconds",
    "num_samples_per_class",
}


def _run(args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, *args],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),  # level 0: conftest
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _load_config(name, variant=""):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _tiny_dataset():
    config = _load_config("digits_ddpm", "tiny")
    return subset_per_class(load_dataset("digits"), config.train_per_class, config.test_per_class)


def _jsonl_files(workdir):
    """{relative path: content} of every metrics.jsonl under `workdir`."""
    paths = [
        os.path.join(root, "metrics.jsonl")
        for root, _, names in os.walk(workdir)
        if "metrics.jsonl" in names
    ]
    return {os.path.relpath(path, workdir): pathlib.Path(path).read_text() for path in paths}


def test_pipeline_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "run"
    first = _run([SCRIPT, f"--config={TINY}", f"--workdir={workdir}", "--progress=on"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert RESULT_KEYS <= set(results)  # the keys the pipeline documents
    assert results["forget_class"] == 0 and results["num_classes"] == 10
    assert results["image_shape"] == [8, 8, 1]
    assert results["config"]["train_per_class"] == 12
    assert set(results["classifier"]) == {"model", "test_accuracy", "FD_real_test"}
    assert 0 <= results["classifier"]["test_accuracy"] <= 100
    assert results["classifier"]["FD_real_test"] >= 0
    assert results["alpha"] == 0.048
    assert results["effective_alpha_per_element"] == pytest.approx(0.048 * 64)

    # The split: written once, hashed, and the class-wise split of the tiny data set.
    dataset = _tiny_dataset()
    split = load_split(str(workdir / "split.npz"), dataset.train_labels, dataset.test_labels)
    assert split.hash == results["split_hash"]
    labels = dataset.train_labels
    np.testing.assert_array_equal(split.forget, np.flatnonzero(labels == 0))
    np.testing.assert_array_equal(split.retain, np.flatnonzero(labels != 0))
    np.testing.assert_array_equal(split.train, np.arange(len(labels)))  # no validation images
    np.testing.assert_array_equal(split.test, np.flatnonzero(dataset.test_labels != 0))
    assert split.forget.size == 12 and split.description["scenario"] == "class"

    # The mask: half the UNet's weights, saved where results.json says.
    mask_info = results["mask"]
    assert set(mask_info) == {"fraction", "ones", "size", "seconds", "path"}
    assert mask_info["path"] == os.path.join("masks", "forget_0_with_0.50.npz")
    assert mask_info["ones"] == int(0.5 * mask_info["size"])
    with np.load(workdir / mask_info["path"]) as saved:
        assert sum(int(saved[name].sum()) for name in saved.files) == mask_info["ones"]

    assert set(results["methods"]) == {"Original", "SalUn", "RL", "GA"}
    for method, metrics in results["methods"].items():
        assert METHOD_KEYS <= set(metrics), method
        per_class = metrics["per_class_accuracy"]
        assert set(per_class) == {str(k) for k in range(10)}
        assert all(0 <= v <= 100 for v in per_class.values())
        assert metrics["forget_class_accuracy"] == per_class["0"]
        assert metrics["UA"] == pytest.approx(100 - metrics["forget_class_accuracy"])
        assert metrics["retain_accuracy"] == pytest.approx(
            np.mean([per_class[str(k)] for k in range(1, 10)])
        )
        assert metrics["FD"] is not None and metrics["FD"] >= 0
        assert metrics["num_samples_per_class"] == 2
        assert metrics["run_time_s"] >= 0 and metrics["compile_time_s"] > 0
        assert (workdir / "grids" / f"{method}.png").stat().st_size > 0
    for method in ("SalUn", "RL", "GA"):  # two unlearning steps each, logged by the loop
        (record,) = [
            json.loads(line)
            for line in (workdir / "unlearned" / method / "metrics.jsonl").read_text().splitlines()
        ]
        assert record["phase"] == method and record["num_examples"] == 16.0
    table = (workdir / "results.md").read_text()
    assert "| SalUn |" in table and "FD (classifier features)" in table

    # Re-running resumes: nothing is trained, unlearned or evaluated again.
    logs = _jsonl_files(workdir)
    assert {
        "original/metrics.jsonl",
        "classifier/metrics.jsonl",
        "unlearned/SalUn/metrics.jsonl",
    } <= set(logs)
    split_bytes = (workdir / "split.npz").read_bytes()
    second = _run([SCRIPT, f"--config={TINY}", f"--workdir={workdir}"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _jsonl_files(workdir) == logs
    assert (workdir / "split.npz").read_bytes() == split_bytes
    again = json.loads((workdir / "results.json").read_text())
    assert again["methods"] == results["methods"] and again["mask"] == results["mask"]
    assert again["split_hash"] == results["split_hash"]
    assert "SalUn 1/1" in first.stderr and "SalUn" not in second.stderr  # bar and log lines


# ------------------------------------------------------------------------------------------------
# Input checks, in process: each fails before anything is trained.


def _train_and_evaluate(workdir, **overrides):
    from salun_jax.pipeline.diffusion import train_and_evaluate

    config = _load_config("digits_ddpm", "tiny")
    config.update(overrides)
    return train_and_evaluate(config, str(workdir))


def test_pipeline_refuses_a_split_of_other_data(tmp_path):
    from salun_jax.pipeline.common import UserError

    dataset = _tiny_dataset()
    other = make_split(
        dataset.train_labels[::-1],
        dataset.test_labels,
        scenario="class",
        forget_class=0,
        val_fraction=0.0,
    )
    os.makedirs(tmp_path / "other")
    save_split(str(tmp_path / "other" / "split.npz"), other)
    with pytest.raises(UserError, match="does not match this data set"):
        _train_and_evaluate(tmp_path / "other")
    # A split whose content no longer matches its stored hash.
    ours = make_split(
        dataset.train_labels,
        dataset.test_labels,
        scenario="class",
        forget_class=0,
        val_fraction=0.0,
    )
    os.makedirs(tmp_path / "corrupt")
    path = str(tmp_path / "corrupt" / "split.npz")
    save_split(path, ours)
    with np.load(path) as f:
        arrays = {name: f[name] for name in f.files}
    arrays["forget"] = arrays["forget"][:-1]
    np.savez(path, **arrays)
    with pytest.raises(UserError, match="corrupt"):
        _train_and_evaluate(tmp_path / "corrupt")
    for workdir in ("other", "corrupt"):
        assert not (tmp_path / workdir / "classifier").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"forget_class": 12}, "forget_class 12 is not a class of this 10-class model"),
        ({"run_methods": ("SalUn", "FT")}, r"unknown methods \['FT'\]"),
    ],
)
def test_pipeline_rejects_bad_settings(tmp_path, overrides, match):
    from salun_jax.pipeline.common import UserError

    with pytest.raises(UserError, match=match):
        _train_and_evaluate(tmp_path / "bad", **overrides)
    assert not (tmp_path / "bad" / "split.npz").exists()
    assert not (tmp_path / "bad" / "classifier").exists()


def test_pipeline_refuses_a_workdir_of_another_config(tmp_path):
    from salun_jax.pipeline.common import UserError, write_config

    config = _load_config("digits_ddpm", "tiny")
    config.train.num_iterations = 5
    write_config(str(tmp_path), config)
    with pytest.raises(UserError, match="different train config"):
        _train_and_evaluate(tmp_path)


def test_script_reports_a_bad_setting_in_one_line(tmp_path):
    result = _run(
        [SCRIPT, f"--config={TINY}", f"--workdir={tmp_path / 'bad'}", "--config.forget_class=12"],
        tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("error: forget_class 12 is not a class of this 10-class model")
    assert not (tmp_path / "bad" / "split.npz").exists()


@pytest.mark.parametrize("variant", ["", "tiny"])
def test_paper_config_builds_the_paper_unet(variant):
    from salun_jax.models.unet import UNet
    from salun_jax.train_diffusion import DiffusionTrainConfig
    from salun_jax.unlearn.diffusion import DiffusionUnlearnConfig

    config = _load_config("cifar10_ddpm_paper", variant)
    train = DiffusionTrainConfig(**config.train.to_dict())
    unlearn = DiffusionUnlearnConfig(**config.unlearn.to_dict())
    if not variant:
        assert (train.num_iterations, train.batch_size, train.learning_rate) == (800_000, 128, 2e-4)
        assert train.ema_decay == 0.9999 and train.flip
        assert (unlearn.num_iterations, unlearn.learning_rate, unlearn.alpha) == (1000, 1e-4, 1e-3)
        assert config.mask.fraction == 0.5 and config.sample.num_per_class == 500
        assert (config.sample.num_steps, config.sample.eta, config.sample.guidance_scale) == (
            1000,
            1.0,
            2.0,
        )
    model_args = dict(
        config.model.to_dict(),
        ch_mult=tuple(config.model.ch_mult),
        attn_resolutions=tuple(config.model.attn_resolutions),
    )
    model = UNet(num_classes=10, image_size=32, out_channels=3, **model_args)
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            jnp.zeros((1, 32, 32, 3)),
            jnp.zeros(1, jnp.int32),
            jnp.zeros(1, jnp.int32),
            train=False,
        )
    )
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 38_632_323


def test_digits_config_is_the_documented_recipe():
    from salun_jax.train_diffusion import DiffusionTrainConfig
    from salun_jax.unlearn.diffusion import DiffusionUnlearnConfig

    config = _load_config("digits_ddpm")
    assert config.unlearn.alpha * 64 == pytest.approx(3.072)  # upstream's per-element weight
    assert set(config.run_methods) == {"Retrain", "SalUn", "RL", "GA"}
    assert config.train_per_class == 0 and config.test_per_class == 0  # the whole data set
    assert (config.train.num_iterations, config.unlearn.num_iterations) == (1000, 300)
    tiny = _load_config("digits_ddpm", "tiny")
    assert tiny.train_per_class == tiny.test_per_class == 12
    for variant in (config, tiny):  # every section builds its dataclass
        DiffusionTrainConfig(**variant.train.to_dict())
        DiffusionUnlearnConfig(**variant.unlearn.to_dict())
    with pytest.raises(ValueError, match="unknown variant"):
        _load_config("digits_ddpm", "huge")


def test_bench_diffusion_quick(tmp_path):
    json_out = tmp_path / "bench.json"
    result = _run(
        [
            os.path.join(REPO, "experiments", "bench_diffusion.py"),
            "--quick",
            f"--json_out={json_out}",
        ],
        tmp_path,
        timeout=200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s" in result.stdout
    output = json.loads(json_out.read_text())
    assert output["reference"]["jax_matmul_gflops"] > 0
    (train,) = output["train"]
    (sampling,) = output["sampling"]
    assert train["images_per_s"] > 0 and sampling["images_per_s"] > 0
