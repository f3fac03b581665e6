"""End-to-end test of experiments/sd_unlearn.py: the tiny SD chain at seconds scale (`:test`),
its resume, and the one-line refusals of a missing model folder."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(config, workdir, *overrides, timeout=900):
    # Most of XLA's optimisation skipped, as conftest sets for every script the tests launch.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    cmd = [
        sys.executable,
        os.path.join(REPO, "experiments", "sd_unlearn.py"),
        "--config",
        os.path.join(REPO, "experiments", "configs", config),
        "--workdir",
        str(workdir),
        *overrides,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_tiny_sd_chain_end_to_end_and_resume(tmp_path):
    # SalUn here, FMN in the nudity chain below (each method's programs compile in one chain
    # only); ESD's steps and its results.json share are tested in-process (test_sd_unlearn).
    methods = "--config.run_methods=('SalUn',)"
    result = _run("sd_imagenette.py:test", tmp_path, methods)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"Original", "SalUn"}
    for name, row in results["methods"].items():
        assert 0.0 <= row["UA"] <= 100.0 and 0.0 <= row["retain_accuracy"] <= 100.0, name
        assert os.path.getsize(tmp_path / "grids" / f"{name}.png") > 0
    assert results["mask"]["ones"] == results["mask"]["size"] // 2
    assert results["data"]["num_forget"] == 4 and results["data"]["num_retain"] == 18
    mask = results["mask"]
    assert results["methods"]["SalUn"]["trainable_fraction"] == mask["ones"] / mask["size"]
    assert results["model"]["source"] == "tiny" and results["prompts"][0] == ""
    assert "| SalUn |" in (tmp_path / "results.md").read_text()
    for name in ("config.json", "data.npz", "masks/with_0.50.npz", "unlearned/SalUn"):
        assert os.path.exists(tmp_path / name), name

    again = _run("sd_imagenette.py:test", tmp_path, methods)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "SalUn 1/2" not in again.stderr  # nothing is run again
    rerun = json.loads((tmp_path / "results.json").read_text())
    assert rerun["methods"]["SalUn"]["UA"] == results["methods"]["SalUn"]["UA"]


def test_nudity_chain_counts_nudenet_classes(tmp_path):
    # The nudity code path on the tiny digits model, with FMN (the chain above runs SalUn):
    # NudeNet runs on every evaluated model's samples and the exposed-class counts land in
    # results.json and results.md.
    result = _run("sd_nudity.py:test", tmp_path, "--config.run_methods=('FMN',)")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"Original", "FMN"}
    assert results["methods"]["FMN"]["trainable_fraction"] == 1.0  # the whole UNet (FMN's)
    assert "| FMN |" in (tmp_path / "results.md").read_text()
    assert results["nudenet"]["threshold"] == 0.6
    assert "NudeNet v3" in results["nudenet"]["detector"]
    for name in ("Original", "FMN"):
        row = results["methods"][name]["nudenet"]
        assert row["num_images"] == results["config"]["sample"]["num_per_prompt"] * 2, name
        assert set(row["counts"]) == set(results["nudenet"]["classes"])
        assert row["total"] == sum(row["counts"].values())
    assert (
        "NudeNet counts (images with each class, score >= 0.6)"
        in (tmp_path / "results.md").read_text()
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ((), "model_dir is empty: give a diffusers-format Stable Diffusion v1.x folder"),
        (("--config.model_dir=/nonexistent/sd-v1-4",), "model_dir /nonexistent/sd-v1-4 is not"),
    ],
)
def test_paper_config_without_weights_fails_with_one_line(tmp_path, overrides, message):
    result = _run("sd_nudity.py", tmp_path, *overrides, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "config.json")
