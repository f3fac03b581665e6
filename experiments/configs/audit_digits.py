"""Audits of every method from populations on the bundled digits data (issue 27).

    python experiments/audit.py --config experiments/configs/audit_digits.py --workdir runs/audit

Shadow populations of N = 16 SmallCNN x0.5 models (4 groups of 4; each example of the
129-example random forget pool held by half of them), Original and two Retrain populations, and
every method's 16 unlearned models; U-LiRA, population SVC MIA, KLoM, relearning (20 steps),
L2 distances, loss barriers and 3 sequential requests. Target: <= 15 min on 2 CPU cores
(measured: docs/benchmarks.md, "Audits"). The Retrain row sits at chance (AUC ~0.5).

`:tiny` (8 members, 30 train images per class, 1-2 epochs, SalUn) checks the pipeline,
not the numbers. CIFAR-10 on a GPU: `audit_cifar10_gpu.py`.
"""

import ml_collections

METHODS = (
    "FT",
    "GA",
    "RL",
    "IU",
    "l1-sparse",
    "BS",
    "BE",
    "SalUn",
    "SalUn-soft",
    "NegGrad+",
    "SCRUB",
    "SSD",
)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "digits"
    config.data_dir = ""
    config.cache_dir = ""
    config.train_per_class = 0
    config.test_per_class = 0
    # Shadow populations: `groups` (even) in-sets, `group_size` members each (N = product);
    # in-sets from mask_seed, member seeds from seed.
    config.groups = 4
    config.group_size = 4
    config.seed = 0
    config.mask_seed = 0
    config.mia_seed = 1
    config.strategy = "auto"
    config.split = dict(scenario="random", forget_fraction=0.1, val_fraction=0.1, seed=1)
    # The forgetting-quality recipe (digits_forgetting_quality.py).
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
    # digits_unlearn.py's method settings; NegGrad+, SCRUB and SSD with their defaults.
    config.methods = dict(
        FT=dict(learning_rate=0.02),
        GA=dict(learning_rate=0.01, epochs=3),
        RL=dict(learning_rate=0.005),
        IU=dict(iu_step_size=0.3, woodfisher_samples=200),
        **{"l1-sparse": dict(learning_rate=0.02, l1_coefficient=5e-4)},
        BS=dict(learning_rate=5e-4),
        BE=dict(learning_rate=1e-3),
        SalUn=dict(learning_rate=0.005),
        **{"SalUn-soft": dict(learning_rate=0.01)},
        **{"NegGrad+": dict(learning_rate=0.01)},
        SCRUB=dict(learning_rate=0.005),
        SSD=dict(),
    )
    config.run_methods = METHODS
    config.mask = dict(fraction=0.5)
    # The relearning attack on group 0's members: `steps` full-batch SGD steps on
    # `retain_examples` retain images (and, second, with `forget_examples` of the forget set).
    config.relearn = dict(steps=20, retain_examples=64, forget_examples=8, learning_rate=0.01)
    config.barrier = dict(alphas=(0.0, 0.25, 0.5, 0.75, 1.0), examples=512)
    config.sequential = dict(requests=3)  # 0: no sequential table
    if variant == "tiny":
        config.groups = 2
        config.group_size = 4
        config.train_per_class = 30
        config.train.update(epochs=2, milestones=())
        config.unlearn.epochs = 1
        config.methods.GA.epochs = 1
        config.run_methods = ("SalUn",)  # SSD's population path: tests/test_population.py
        config.relearn.steps = 2
        config.barrier.alphas = (0.0, 0.5, 1.0)
        config.barrier.examples = 64
        config.sequential.requests = 2
        return config
    if variant:
        raise ValueError(f"unknown variant {variant!r}; known: tiny")
    return config
