"""The SalUn classification pipeline: original model, Retrain, saliency masks, every unlearning
method, evaluation, over one or several seeds (`salun_jax.pipeline.classification`).

    python experiments/unlearn.py --config experiments/configs/digits_unlearn.py --workdir runs/u

Writes config.json, results.json, results.md, plots/ and seed_<s>/ in --workdir; re-running the
same command resumes.
"""

from absl import flags
from ml_collections import config_flags

from salun_jax.pipeline import classification, cli
from salun_jax.pipeline.common import is_primary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (resumes if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    table = classification.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if is_primary():  # every process of a multi-process run gets the table; one prints it
        print(table)


if __name__ == "__main__":
    cli.run(main, _CONFIG)
