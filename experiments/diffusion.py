"""The SalUn generation pipeline: make a class-conditional DDPM forget one class
(`salun_jax.pipeline.diffusion`: classifier, original DDPM, Retrain, saliency mask, SalUn / RL /
GA, sampling and evaluation, results.json and results.md).

    python experiments/diffusion.py --config experiments/configs/digits_ddpm.py --workdir runs/ddpm

Re-running the same command resumes from the work directory.
"""

from salun_jax import cpu
from salun_jax.pipeline import cli

if __name__ == "__main__":
    cli.run_pipeline("salun_jax.pipeline.diffusion:train_and_evaluate", setup=cpu.enable)
