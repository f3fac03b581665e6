"""The paper's class-wise forgetting on CIFAR-10 / ResNet-18 (all 4,500 train images of class
`forget_class`; TA drops that class from the test set), for GPUs/TPUs.

    python experiments/unlearn.py --config experiments/configs/cifar10_classwise_paper.py --workdir runs/c10_class

Expected (paper, qualitative): Retrain UA = 100 and MIA = 100; SalUn UA ~100 with RA/TA close to
Retrain. Same recipe and timing as cifar10_paper.py.
"""

import ml_collections

from salun_jax.pipeline.common import sibling_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "cifar10_paper.py", variant)
    config.split = dict(
        scenario="class", forget_class=0, val_fraction=0.1, drop_forget_class_from_test=True
    )
    config.sweep_fractions = ()
    return config
