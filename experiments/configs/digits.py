"""Digits (scikit-learn's 8x8 handwritten digits, bundled: no download), a small CNN.

    python experiments/train.py --config experiments/configs/digits.py --workdir runs/digits

About 10-20 s on 2 CPU cores; test accuracy ~95-98%.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "digits"
    config.data_dir = ""
    config.cache_dir = ""
    config.split = dict(scenario="none", seed=1, val_fraction=0.1)
    config.train = dict(
        model="small_cnn",
        width=0.5,
        epochs=20,
        batch_size=64,
        learning_rate=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        milestones=(15,),
        gamma=0.1,
        crop_padding=1,
        flip=False,
        seed=0,
    )
    return config
