"""Forgetting quality of the unlearning methods over populations of models
(`salun_jax.pipeline.forgetting_quality`).

    python experiments/forgetting_quality.py \
        --config experiments/configs/digits_forgetting_quality.py --workdir runs/fq

Writes config.json, results.json (keyed by method), results.md, run.json and plots/ in --workdir.
"""

from salun_jax import cpu
from salun_jax.pipeline import cli

if __name__ == "__main__":
    cli.run_pipeline("salun_jax.pipeline.forgetting_quality:run", setup=cpu.enable)
