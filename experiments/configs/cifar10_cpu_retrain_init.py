"""Retrain's initialisation side by side on the CIFAR-10 CPU setting: seeds 1-3, Retrain, RL and
SalUn, once with an independent initialisation and once with the original model's initial
weights (upstream's `main_forget.py`).

    SALUN_JAX_CONV_IMPL=onednn python experiments/unlearn.py --config experiments/configs/cifar10_cpu_retrain_init.py --workdir runs/retrain_init --config.dataset=<CIFAR-10 folder or zip>

The two scenarios share the original models (`<workdir>/seed_<s>/original_<fp>`); each scenario's
table is in results.md. Measurements: docs/benchmarks.md.
"""

import ml_collections

from salun_jax.pipeline.common import sibling_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "cifar10_cpu.py", variant)
    if variant != "tiny":
        config.seeds = (1, 2, 3)
    config.run_methods = ("Retrain", "RL", "SalUn")
    config.scenarios = ("independent", "original")
    config.scenario_settings = dict(
        independent=dict(retrain_init="independent"), original=dict(retrain_init="original")
    )
    return config
