"""Class-wise forgetting on digits: all train images of digit `forget_class` (TA drops it).

    python experiments/unlearn.py --config experiments/configs/digits_classwise.py --workdir runs/digits_class

About as fast as digits_unlearn.py. Expected: Retrain UA = 100 and MIA near 100; SalUn near them.
"""

import ml_collections

from salun_jax.pipeline.common import sibling_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_unlearn.py", variant)
    config.split = dict(
        scenario="class", forget_class=3, val_fraction=0.1, drop_forget_class_from_test=True
    )
    config.sweep_fractions = ()
    config.scenarios = ()  # this scenario only (the main job runs it next to 10% random)
    return config
