"""Forgetting quality (NeurIPS 2023 unlearning challenge metric) on the bundled digits data.

    python experiments/forgetting_quality.py \
        --config experiments/configs/digits_forgetting_quality.py --workdir runs/fq

32 original, 64 retrained (two halves of 32) and 32 unlearned models per method (FT, GA, RL,
l1-sparse, SalUn), SmallCNN x0.5, 10% random forgetting; each population trains in one compiled
program. Target: <= 15 min on 2 CPU cores; measured 3 min 30 s on a clean clone of 2aff122
(2026-12-02, quiet machine, jax 0.10.2, strategy vmap), giving:

    | Method | F (forgetting quality) | final score | FA % | RA % | TA % | eps med |
    |---|---|---|---|---|---|---|
    | Retrain | 0.1785 | 0.1797 | 97.72 | 98.34 | 95.96 | 1.61 |
    | Original | 0.1378 | 0.1392 | 98.59 | 98.53 | 96.13 | 1.79 |
    | FT | 0.0942 | 0.0962 | 98.55 | 99.04 | 96.63 | 2.08 |
    | GA | 0.0701 | 0.0666 | 96.97 | 96.20 | 92.54 | 2.30 |
    | RL | 0.0411 | 0.0411 | 98.43 | 98.47 | 95.27 | 2.83 |
    | l1-sparse | 0.1094 | 0.1116 | 98.50 | 98.97 | 96.70 | 2.08 |
    | SalUn | 0.0579 | 0.0578 | 98.55 | 98.47 | 95.12 | 2.64 |

The Retrain sanity row's F is the ceiling at N = 32 (coarse: rates move in steps of 1/32). On
digits the retrained models still classify 97-98% of the forget set, so Original is close to it,
and RL and SalUn (random labels on D_f) move the forget confidences away from Retrain's.

The `:tiny` variant (4 members, 1-2 epochs, 30 train images per class, GA and SalUn) checks the
pipeline, not the numbers. CIFAR-10 on a GPU: `cifar10_forgetting_quality.py`.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "digits"
    config.data_dir = ""
    config.cache_dir = ""
    config.train_per_class = 0
    config.test_per_class = 0
    config.members = 32
    config.seed = 0
    config.strategy = "auto"  # vmap over members: measured fastest here (salun_jax.population)
    config.split = dict(scenario="random", forget_fraction=0.1, val_fraction=0.1, seed=1)
    config.train = dict(
        model="small_cnn",
        width=0.5,
        epochs=10,
        batch_size=64,
        learning_rate=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        milestones=(8,),
        gamma=0.1,
        crop_padding=1,
        flip=False,
        seed=0,
    )
    config.unlearn = dict(
        epochs=5,
        learning_rate=0.01,
        batch_size=64,
        momentum=0.9,
        weight_decay=5e-4,
        crop_padding=1,
        flip=False,
        mask_mode="hard",
        update_batch_stats=True,
        rl_variant="concat",
    )
    # The digits_unlearn.py method settings.
    config.methods = dict(
        FT=dict(learning_rate=0.02),
        GA=dict(learning_rate=0.01, epochs=3),
        RL=dict(learning_rate=0.005),
        **{"l1-sparse": dict(learning_rate=0.02, l1_coefficient=5e-4)},
        SalUn=dict(learning_rate=0.005),
    )
    config.run_methods = ("FT", "GA", "RL", "l1-sparse", "SalUn")
    config.mask = dict(fraction=0.5)
    if variant == "tiny":
        config.members = 4
        config.train_per_class = 30
        config.train.update(epochs=2, milestones=())
        config.unlearn.epochs = 1
        config.run_methods = ("GA", "SalUn")  # one forget-only and one masked relabel method
        for method in config.methods.values():
            if "epochs" in method:
                method.epochs = 1
        return config
    if variant:
        raise ValueError(f"unknown variant {variant!r}; known: tiny")
    return config
