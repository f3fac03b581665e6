"""Trains a classifier (the "original" model of an unlearning study).

    python experiments/train.py --config experiments/configs/digits.py --workdir runs/digits

Writes config.json, split.npz, checkpoints/, metrics.jsonl and results.json in --workdir;
re-running the same command resumes from the newest checkpoint.
"""

from absl import flags
from ml_collections import config_flags

from salun_jax import cpu
from salun_jax.pipeline import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from salun_jax.pipeline.classification import train_original
    from salun_jax.pipeline.common import is_primary

    results = train_original(_CONFIG.value, _WORKDIR.value)
    if is_primary():  # one line per run, not per process
        accuracy, where = results["test_accuracy"], f"{_WORKDIR.value}/results.json"
        print(f"test accuracy {accuracy:.2f}% (results in {where})")


if __name__ == "__main__":
    cli.run(main, _CONFIG, setup=cpu.enable)
