"""Forgetting quality of the unlearning methods over populations of models
(`salun_jax.pipeline.forgetting_quality`).

    python experiments/forgetting_quality.py \
        --config experiments/configs/digits_forgetting_quality.py --workdir runs/fq

Writes config.json, results.json (keyed by method), results.md, run.json and plots/ in --workdir.
"""

from absl import flags
from ml_collections import config_flags

from salun_jax.pipeline import cli, forgetting_quality

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    print(forgetting_quality.run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    cli.run(main, _CONFIG)
