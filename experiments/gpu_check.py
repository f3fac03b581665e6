"""One short check of a GPU machine (under 8 minutes on one GPU): training throughput of the
paper's models and a reduced CIFAR-10 10% random-forgetting SalUn chain.

    # on the GPU machine (no internet): the wheels it lacks, built here beforehand by
    # scripts/build_gpu_wheelhouse.sh, then the check
    pip install --no-index --find-links wheelhouse tensorflow-datasets ml_collections array_record
    python experiments/gpu_check.py --data=../shared/data/cifar10_jpeg.zip --workdir=/tmp/gpu_check

Prints, each from the repository's own script run in a subprocess with a time limit:
  1. images/s of the paper ResNet-18 (full width) train step at batch 256, bare and in the loop
     (`experiments/bench_train.py`);
  2. images/s of the paper CIFAR-10 DDPM UNet train step at batch 128 (`bench_diffusion.py`);
  3. the results table of `experiments/unlearn.py` with `configs/cifar10_paper.py` reduced to one
     seed, 15 training epochs (Original and Retrain), 5 unlearning epochs and the methods Retrain,
     FT, GA, RL and SalUn (data from the zip given by --data).

Expected: no result on a GPU yet (this task had none); the chain's numbers are a smoke test of
the recipe at reduced length, not the paper's Table 1.

`--quick` runs the same three parts in their CPU-sized forms (bench --quick flags and the
config's `:tiny` variant with Retrain, FT and SalUn), in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

_DATA = flags.DEFINE_string(
    "data", "../shared/data/cifar10_jpeg.zip", "CIFAR-10 source (a zip, folder or tfds name)."
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/salun_jax_gpu_check", "Work directory.")
_QUICK = flags.DEFINE_bool("quick", False, "CPU-sized forms of every part (minutes on a CPU).")

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(EXPERIMENTS, "configs", "cifar10_paper.py")


def _parts(data: str, workdir: str, quick: bool) -> list[tuple[str, list[str], int]]:
    """(title, command, seconds allowed) of each part."""
    python = sys.executable
    if quick:
        return [
            ("ResNet train step", [python, "bench_train.py", "--quick"], 300),
            ("DDPM UNet train step", [python, "bench_diffusion.py", "--quick"], 300),
            (
                "CIFAR-10 10% SalUn chain (:tiny)",
                [
                    python,
                    "unlearn.py",
                    f"--config={CONFIG}:tiny",
                    f"--workdir={workdir}/chain_quick",
                    f"--config.dataset={data}",
                    "--config.run_methods=('Retrain','FT','SalUn')",
                    "--config.sweep_fractions=()",
                ],
                600,
            ),
        ]
    return [
        (
            "paper ResNet-18 train step, batch 256",
            [
                python,
                "bench_train.py",
                "--models=resnet18",
                "--widths=1.0",
                "--steps=50",
                "--rounds=3",
                "--batch_size=256",
                "--numpy_reference=false",
            ],
            120,
        ),
        (
            "paper DDPM UNet train step, batch 128",
            [
                python,
                "bench_diffusion.py",
                "--paper_batch_size=128",
                "--paper_steps=20",
                "--tiny_steps=20",
                "--sample_batch_size=100",
                "--sample_steps=20",
            ],
            120,
        ),
        (
            "CIFAR-10 10% SalUn chain (1 seed, 15 + 5 epochs)",
            [
                python,
                "unlearn.py",
                f"--config={CONFIG}",
                f"--workdir={workdir}/chain",
                f"--config.dataset={data}",
                "--config.seeds=(1,)",
                "--config.train.epochs=15",
                "--config.train.milestones=(8,12)",
                "--config.unlearn.epochs=5",
                "--config.methods.GA.epochs=2",
                "--config.run_methods=('Retrain','FT','GA','RL','SalUn')",
                "--config.sweep_fractions=()",
            ],
            240,
        ),
    ]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # No JAX here: this process would take the GPU's memory from the parts it launches.
    data, workdir = _DATA.value, os.path.abspath(_WORKDIR.value)
    if os.path.exists(data):  # a path, relative to where this was started; else a tfds name
        data = os.path.abspath(data)
    os.makedirs(workdir, exist_ok=True)
    failed = []
    for title, command, seconds in _parts(data, workdir, _QUICK.value):
        print(f"\n## {title}\n$ {' '.join(command)}", flush=True)
        start = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=EXPERIMENTS, timeout=seconds)
            ok = result.returncode == 0
        except subprocess.TimeoutExpired:
            print(f"timed out after {seconds} s", flush=True)
            ok = False
        print(f"({title}: {time.perf_counter() - start:.0f} s, {'ok' if ok else 'FAILED'})")
        if not ok:
            failed.append(title)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
