"""The SalUn classification pipeline: original model, Retrain, saliency masks, every unlearning
method, evaluation, over one or several seeds (`salun_jax.pipeline.classification`).

    python experiments/unlearn.py --config experiments/configs/digits_unlearn.py --workdir runs/u

Writes config.json, results.json, results.md, plots/ and seed_<s>/ in --workdir; re-running the
same command resumes.
"""

from salun_jax import cpu
from salun_jax.pipeline import cli

if __name__ == "__main__":
    cli.run_pipeline("salun_jax.pipeline.classification:train_and_evaluate", setup=cpu.enable)
