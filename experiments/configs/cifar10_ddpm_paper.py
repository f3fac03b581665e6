"""The paper's CIFAR-10 DDPM class-wise unlearning (SalUn Sec. 5.2, Table 4), for GPU/TPU.

    python experiments/diffusion.py --config experiments/configs/cifar10_ddpm_paper.py --workdir runs/c10_ddpm

Recipe (upstream `DDPM/configs/cifar10_*.yml`): the 38.6M-parameter UNet (ch 128, ch_mult
1,2,2,2, attention at 16x16, dropout 0.1), T 1000 linear betas, 800k iterations at batch 128 with
Adam 2e-4, clip 1.0, EMA 0.9999, random flips (Original and Retrain alike); mask from the CFG (w 2)
loss on all 5000 forget images with per-batch clipping, top 50%; SalUn 1000 iterations, Adam
1e-4, batch 128, alpha 1e-3, pseudo class (c+1) mod 10; DDIM 1000 steps, eta 1, w 2; 500 samples
per class (UA on the forgotten class's 500, as the paper). The evaluation classifier is a
ResNet-34 trained from scratch by this library (upstream fine-tunes an ImageNet ResNet-34 at
224x224; we have no pretrained weights), and FD uses its features (not Inception FID).

Time (estimates, not measured here): the original model and Retrain are 800k steps of 128 each,
days on one GPU; each unlearning run is 1000 steps (minutes); sampling 5000 images x 1000 DDIM
steps x 2 (CFG) per model is of the order of an hour on one A100-class GPU. On the 2-core CPU one
train step of batch 8 takes 2.7 s (experiments/bench_diffusion.py): not meant for CPU.

Expected result (paper, DDPM CIFAR-10 class-wise; exact values not recovered):
SalUn UA ~100% on 500 samples of the forgotten class, with an FD/FID on the remaining classes
comparable to Retrain's; GA (-L_simple on D_f + alpha * L_simple on D_r, as upstream) collapses
the model. Our FD uses the evaluation
classifier's features, so its values are not the paper's FIDs.

Data: CIFAR-10 from tensorflow-datasets, or point `--config.dataset` at an image folder / zip
laid out split/class/image (e.g. CIFAR-10 exported as class folders).

`--config=experiments/configs/cifar10_ddpm_paper.py:tiny`: the same code path and the paper UNet
on 4 images per class, one epoch / iteration of everything, 2 DDIM steps: it only shows the pipeline
constructs and starts (about 3 minutes on the 2-core CPU, mostly compilation; needs the zip:
`--config.dataset=<your CIFAR-10 folder or zip>`).
"""

import ml_collections

from salun_jax.pipeline.common import unset_like


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "cifar10"
    config.data_dir = ""
    config.cache_dir = ""
    config.train_per_class = 0
    config.test_per_class = 0
    config.forget_class = 0  # airplane
    config.model = dict(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        resamp_with_conv=True,
        num_groups=32,
        null_class=True,
    )
    config.diffusion = dict(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    config.train = dict(
        num_iterations=800_000,
        batch_size=128,
        learning_rate=2e-4,
        grad_clip=1.0,
        ema_decay=0.9999,
        cond_drop_prob=0.1,
        flip=True,
        seed=0,
    )
    # Retrain: the train recipe; a non-None value here overrides it (e.g. --config.retrain.epochs=2).
    config.retrain = unset_like(config.train)
    # DDPM checkpoints (original, Retrain) every 25 epochs (~9.8k iterations) instead of every
    # one of the ~2000 epochs; not part of the recipe, so changing it keeps a workdir resumable.
    config.checkpoint_every = 25
    config.classifier = dict(
        model="resnet34",
        width=1.0,
        epochs=182,
        batch_size=256,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        milestones=(91, 136),
        gamma=0.1,
        crop_padding=4,
        flip=True,
        seed=0,
    )
    # Mask and unlearning data: a random flip applied once and frozen (upstream CIFAR-10).
    config.frozen_flip = True
    config.mask = dict(fraction=0.5, batch_size=128, guidance_scale=2.0, clip_norm=1.0, seed=0)
    config.unlearn = dict(
        num_iterations=1000,
        batch_size=128,
        learning_rate=1e-4,
        alpha=1e-3,
        grad_clip=1.0,
        cond_drop_prob=0.1,
        pseudo_class="next",
        mask_mode="hard",
        seed=0,
    )
    config.methods = dict(SalUn=dict(), RL=dict(), GA=dict())
    config.run_methods = ("Retrain", "SalUn", "RL", "GA")
    config.sample = dict(
        num_per_class=500,
        num_steps=1000,
        eta=1.0,
        guidance_scale=2.0,
        batch_size=500,
        use_ema=False,
        seed=0,
        grid_per_class=10,
        grid_scale=2,
    )
    if variant == "tiny":
        config.train_per_class = config.test_per_class = 4
        config.train.num_iterations = 1  # = one epoch: 5 steps of 8
        config.train.batch_size = 8
        config.classifier.update(
            model="resnet8", width=0.25, epochs=1, batch_size=50, milestones=()
        )
        config.mask.batch_size = 4
        config.unlearn.num_iterations = 1
        config.unlearn.batch_size = 2
        config.run_methods = ("SalUn",)
        config.sample.update(num_per_class=1, num_steps=2, batch_size=10, grid_per_class=1)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; known: tiny")
    return config
