"""Audits of every method from populations on CIFAR-10 / ResNet-18, for a GPU.

    python experiments/audit.py --config experiments/configs/audit_cifar10_gpu.py \
        --workdir runs/audit_c10

The digits audit (`audit_digits.py`) at CIFAR scale: N = 32 members (4 groups of 8; each example
of the 10% random forget pool held by half of them), ResNet-18 at full width with the
forgetting-quality recipe (`cifar10_forgetting_quality.py`: the paper's, shortened to 30 epochs),
the paper config's unlearning settings (`cifar10_paper.py`; NegGrad+, SCRUB and SSD with their
defaults), relearning on 256 retain images, 3 sequential requests. Produces results.json,
results.md, plots/roc.png and plots/relearning.png; populations and stages are stored, so a
stopped run resumes. Data through tfds (`cifar10`), or --config.dataset=<your folder or zip>.

Not yet run: no GPU was lent while it was written. Size it first with --config.group_size=2
(N = 8); a vmapped population's memory grows with its members (here one group, 8, at a time).
IU runs member by member (hours at this scale; drop it with --config.run_methods). On CPU, the
`:tiny` variant (ResNet-8 x0.25, 20 train images per class) checks the pipeline, not the numbers.
"""

import ml_collections

from salun_jax.pipeline.common import sibling_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    digits = sibling_config(__file__, "audit_digits.py")
    fq = sibling_config(__file__, "cifar10_forgetting_quality.py")
    paper = sibling_config(__file__, "cifar10_paper.py")
    config = digits
    config.dataset = "cifar10"
    config.groups = 4
    config.group_size = 8
    config.train = fq.train
    config.unlearn = paper.unlearn
    config.methods = dict(
        paper.methods.to_dict(),
        **{"NegGrad+": dict(learning_rate=0.01)},
        SCRUB=dict(learning_rate=0.005),
        SSD=dict(),
    )
    config.relearn = dict(steps=20, retain_examples=256, forget_examples=16, learning_rate=0.01)
    config.barrier = dict(alphas=(0.0, 0.25, 0.5, 0.75, 1.0), examples=2048)
    if variant == "tiny":
        config.groups, config.group_size = 2, 4
        config.train_per_class, config.test_per_class = 20, 10
        config.train.update(model="resnet8", width=0.25, batch_size=32, epochs=2, milestones=())
        config.unlearn.update(batch_size=32, epochs=1)
        config.run_methods = ("SalUn", "SSD")
        config.relearn.update(steps=2, retain_examples=32, forget_examples=4)
        config.barrier.update(alphas=(0.0, 0.5, 1.0), examples=64)
        config.sequential.requests = 2
        return config
    if variant:
        raise ValueError(f"unknown variant {variant!r}; known: tiny")
    return config
