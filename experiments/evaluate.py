"""Evaluates a saved model of a finished `unlearn.py` run again, as the pipeline did (the same
split and shadow sets), optionally with other MIA feature kinds; prints its metrics and row as JSON.

    python experiments/evaluate.py --workdir runs/digits --scenario classwise \
        --method SalUn --seed 1 --mia_kinds=confidence,entropy

Every row of results.json has its model: Original, Retrain and each method (`sj.load_run`).
"""

import json

from absl import flags

from salun_jax import cpu
from salun_jax.pipeline import cli

WORKDIR = flags.DEFINE_string("workdir", None, "The finished run's work directory.")
SCENARIO = flags.DEFINE_string("scenario", "", "The scenario (e.g. random, classwise), if several.")
METHOD = flags.DEFINE_string("method", None, "Original, Retrain or a method (e.g. SalUn).")
SEED = flags.DEFINE_integer("seed", None, "The seed of the row.")
MIA_KINDS = flags.DEFINE_list("mia_kinds", None, "MIA feature kinds (default: the run's).")
flags.mark_flags_as_required(["workdir", "method", "seed"])


def main(argv):
    del argv
    from salun_jax.pipeline.runs import evaluate_run, load_run

    run = load_run(WORKDIR.value, METHOD.value, SEED.value, SCENARIO.value or None)
    metrics = evaluate_run(run, tuple(MIA_KINDS.value) if MIA_KINDS.value else None)
    stored = {k: run.metrics[k] for k in ("UA", "RA", "TA", "MIA")}
    print(json.dumps({"method": run.method, "seed": run.seed, "metrics": metrics, "row": stored}))


if __name__ == "__main__":
    cli.run(main, None, setup=cpu.enable)
