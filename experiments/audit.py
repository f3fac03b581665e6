"""Audits of every unlearning method from populations (`salun_jax.pipeline.audit`): U-LiRA
(AUC, TPR at 1% and 0.1% FPR) beside the population SVC MIA, KLoM, the relearning attack, the
L2 distances to Original and Retrain, the loss barrier, and sequential deletion requests.

    python experiments/audit.py --config experiments/configs/audit_digits.py --workdir runs/audit

Writes config.json, results.json, results.md (the audit and sequential-request tables),
plots/roc.png, plots/relearning.png and run.json in --workdir; stages are stored there and a
rerun reuses those whose settings, data and code match.
"""

from salun_jax import cpu
from salun_jax.pipeline import cli

if __name__ == "__main__":
    cli.run_pipeline("salun_jax.pipeline.audit:run", setup=cpu.enable)
