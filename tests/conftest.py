"""Shared fixtures: small in-memory data, run on CPU."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, in-process tests and the scripts they
# launch alike: the same small programs (tiny models, the digits pipeline) compile once. The
# first process that loads this file makes it (pytest, or xdist's controller, whose workers and
# their scripts inherit the variable) and removes it when the run ends (about 60 MB a run); a
# directory the user set is kept.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="salun_jax_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import salun_jax.cpu  # noqa: E402
from salun_jax.cpu.conv import xla_knows  # noqa: E402

# The programs the tests compile are small and compile for longer than they run. XLA:CPU's
# older (non-MLIR) fusion emitters compile them about 3x faster (the unlearning methods' steps
# and the diffusion losses: 38.5 s -> 12.0 s of backend compilation), with the same numerics
# up to float rounding. Set here for the whole run, in-process and, through the environment,
# for the scripts the tests launch; with one device only (forced host devices' all-reduces can
# deadlock on 2-core XLA:CPU machines).
FAST_COMPILE_XLA_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false" if xla_knows("xla_cpu_use_fusion_emitters") else ""
)
_FLAGS = os.environ.get("XLA_FLAGS", "").split()
_FLAGS = [f for f in _FLAGS if not f.startswith("--xla_force_host_platform_device_count")]
# "Optimised" in this suite is XLA:CPU's backend level 1 without LLVM's expensive passes, not
# XLA's default (level 3): the digits classification pipeline runs about as fast and compiles
# faster (`digits_unlearn.py:tiny` with a warm compilation cache: 25.7 s at level 0, 16.7 s at
# level 1, 15.7 s at the default; 34.1 / 35.7 / 43.0 s with a cold one).
LEVEL_1_XLA_FLAGS = (
    "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
    if xla_knows("xla_backend_optimization_level", "xla_llvm_disable_expensive_passes")
    else ""
)
os.environ["XLA_FLAGS"] = " ".join([*_FLAGS, FAST_COMPILE_XLA_FLAGS, LEVEL_1_XLA_FLAGS]).strip()

# Scripts the tests launch compile as the in-process tests do (below), with most of XLA's
# optimisation skipped (`jax_disable_most_optimizations`: backend level 0, over XLA_FLAGS' level
# 1) unless the test says: the UNets' and the populations' programs compile for longer than
# they run (the tiny SD chain: 48.5 s at level 0, 92.3 s at level 1). A test whose script runs
# the classification pipeline removes the variable (`experiment(..., optimized=True)`, the
# default); the YNNPACK and oneDNN checks remove XLA_FLAGS too, for XLA's own defaults.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

# The scripts' CPU options (malloc, YNNPACK off convolutions, the models' convolution module), as
# the experiment scripts set them, before JAX starts its backend.
salun_jax.cpu.enable()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from salun_jax.data import load_dataset  # noqa: E402

# Most in-process tests run a few steps of tiny models, so compiling is most of their time: they
# compile with most of XLA's optimisation skipped (`jax_disable_most_optimizations`: backend
# level 0), which compiles faster. Tests marked `xla_optimized` train long enough in-process for
# optimised code to pay off and compile at XLA_FLAGS' level 1 (above). Scripts that tests launch
# run in their own processes with the flags the test gives them. Values can differ between the
# levels by float rounding; the suite passes at either level.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True)
def _xla_optimization(request):
    optimized = request.node.get_closest_marker("xla_optimized") is not None
    jax.config.update("jax_disable_most_optimizations", not optimized)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ZIP = os.path.join(REPO, "..", "shared", "data", "cifar10_jpeg.zip")


@pytest.fixture(scope="session")
def fast_compile_xla_flags():
    """The XLA_FLAGS entry that compiles the tests' programs faster ("" where XLA lacks it)."""
    return FAST_COMPILE_XLA_FLAGS


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def experiment():
    """run(script, config, workdir, *overrides, wait=True, optimized=True) -> CompletedProcess
    (or the Popen when wait=False): an experiment script in a subprocess on CPU, sharing the
    run's persistent JAX compilation cache (later runs of the same programs skip compilation).

    The script compiles at XLA_FLAGS' level 1 (above): the classification pipeline's programs
    run long enough for it to pay (tests/test_experiments, test_faults and test_ledger: 252.7 s
    -> 213.2 s). `optimized=False` skips most of the optimisation (level 0) for the population
    pipelines (audit.py, forgetting_quality.py), whose programs compile for longer than they
    run."""
    import subprocess
    import sys

    base_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}

    def run(script, config, workdir, *overrides, wait=True, timeout=600, optimized=True):
        env = dict(base_env)
        if optimized:
            env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
        cmd = [
            sys.executable,
            os.path.join(REPO, "experiments", script),
            "--config",
            os.path.join(REPO, "experiments", "configs", config),
            "--workdir",
            str(workdir),
            "--progress=on",  # bars on a pipe too: tests tell what ran by their text
            *overrides,
        ]
        if not wait:
            return subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        return subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )

    return run


# xdist gives each worker whole modules (`--dist loadscope`, pyproject.toml) in collection order
# (`--no-loadscope-reorder`: xdist's own order, by number of tests, started the few-test
# end-to-end modules last). The longest modules are collected first, longest first (their summed
# durations on a 2-core machine, 2026-12-07, in seconds), so the short ones fill the end.
_SLOW_FILES = (
    "test_faults.py",  # 126
    "test_sd_experiment.py",  # 96
    "test_unlearn.py",  # 76
    "test_experiments.py",  # 76
    "test_population.py",  # 63
    "test_sd_unlearn.py",  # 49
    "test_ledger.py",  # 45
    "test_loop.py",  # 43
    "test_diffusion_pipeline.py",  # 43
    "test_cli.py",  # 41
    "test_diffusion_unlearning.py",  # 39
    "test_tuning.py",  # 37
    "test_forgetting_quality_experiment.py",  # 33
    "test_audit_experiment.py",  # 32
    "test_conv.py",  # 26
    "test_losses_diffusion.py",  # 23
    "test_models.py",  # 22
    "test_metric_writer.py",  # 20
    "test_api.py",  # 18
)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: others keep order
