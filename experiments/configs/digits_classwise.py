"""Class-wise forgetting on digits: all train images of digit `forget_class` (TA drops it).

    python experiments/unlearn.py --config experiments/configs/digits_classwise.py --workdir runs/digits_class

About as fast as digits_unlearn.py. Expected: Retrain UA = 100 and MIA near 100; SalUn near them.
"""

import importlib.util
import os

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_unlearn.py")
    spec = importlib.util.spec_from_file_location("digits_unlearn", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.split = dict(
        scenario="class", forget_class=3, val_fraction=0.1, drop_forget_class_from_test=True
    )
    config.sweep_fractions = ()
    config.scenarios = ()  # this scenario only (the main job runs it next to 10% random)
    return config
