"""The SalUn generation pipeline: make a class-conditional DDPM forget one class
(`salun_jax.pipeline.diffusion`: classifier, original DDPM, Retrain, saliency mask, SalUn / RL /
GA, sampling and evaluation, results.json and results.md).

    python experiments/diffusion.py --config experiments/configs/digits_ddpm.py --workdir runs/ddpm

Re-running the same command resumes from the work directory.
"""

from absl import flags
from ml_collections import config_flags

from salun_jax.pipeline import cli, diffusion
from salun_jax.pipeline.common import is_primary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    table = diffusion.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if is_primary():  # every process of a multi-process run gets the table; one prints it
        print(table)


if __name__ == "__main__":
    cli.run(main, _CONFIG)
