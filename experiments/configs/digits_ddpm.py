"""Class-wise unlearning in a tiny conditional DDPM on the bundled 8x8 digits (no download).

    python experiments/diffusion.py --config experiments/configs/digits_ddpm.py --workdir runs/digits_ddpm

The whole chain on 2 CPU cores: evaluation classifier (small CNN), a 0.78M-parameter UNet trained
for 1500 iterations, Retrain on digits 1-9, the saliency mask of digit 0, SalUn / RL / GA for 300
iterations each, and 30 DDIM samples (50 steps, eta 1, CFG w 2) per digit per model. About
12-14 minutes of wall time (measured: see the README / the issue note; the machine was shared).

Expected result: before unlearning every digit is drawn recognisably (classifier accuracy on the
samples ~100% per class); after SalUn and RL the samples for digit 0 are no longer 0s (UA ~100%)
while digits 1-9 stay at ~100% and FD rises only a little; GA (same lr and iterations, no retain
term) destroys every class. Retrain never draws a 0 either (UA ~100%).

alpha: upstream's 1e-3 multiplies a per-image SUM over C*H*W = 3072 CIFAR-10 elements, i.e. a
per-element weight of 3.07 against the per-element-mean forget loss. For 8x8x1 images the same
per-element weight is alpha = 3.07 / 64 = 0.048, used here. The literal alpha = 1e-3 (effective
0.064) also forgets digit 0, but degrades the other digits more (measured: retained-class accuracy
~98%, FD 1.5 -> 6.0 instead of -> 2.2).

`--config=experiments/configs/digits_ddpm.py:tiny`: a seconds-scale smoke variant (tests).
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "digits"
    config.data_dir = ""
    config.cache_dir = ""
    config.max_per_class = 0  # > 0: only the first n train/test images of each class
    config.forget_class = 0
    # tiny_digits_unet(): the paper's UNet shape at ch 32, two levels, attention at 4x4.
    config.model = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.1, resamp_with_conv=True, num_groups=8, null_class=True)
    config.diffusion = dict(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    # Adam 2e-3 (not 2e-4): 1000 iterations instead of 800k.
    config.train = dict(num_iterations=1000, batch_size=64, learning_rate=2e-3, grad_clip=1.0,
                        ema_decay=0.995, cond_drop_prob=0.1, flip=False, seed=0)
    config.retrain = dict()  # overrides of `train` for Retrain (same recipe by default)
    config.classifier = dict(model="small_cnn", width=0.5, epochs=20, batch_size=64,
                             learning_rate=0.05, momentum=0.9, weight_decay=5e-4, milestones=(15,),
                             gamma=0.1, crop_padding=1, flip=False, seed=0)
    config.mask = dict(fraction=0.5, batch_size=64, guidance_scale=2.0, clip_norm=1.0, seed=0)
    # Shared by every unlearning method; per-method overrides in `methods`.
    config.unlearn = dict(num_iterations=300, batch_size=64, learning_rate=1e-4, alpha=0.048,
                          grad_clip=1.0, cond_drop_prob=0.1, pseudo_class="next",
                          mask_mode="hard", seed=0)
    config.methods = dict(SalUn=dict(), RL=dict(), GA=dict())
    config.run_methods = ("Retrain", "SalUn", "RL", "GA")
    # Sampling for evaluation: raw (non-EMA) weights, as upstream's sample config and as the
    # weights unlearning starts from.
    config.sample = dict(num_per_class=30, num_steps=50, eta=1.0, guidance_scale=2.0,
                         batch_size=300, use_ema=False, seed=0, grid_per_class=10, grid_scale=4)
    if variant == "tiny":
        config.max_per_class = 12
        config.model = dict(ch=8, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(),
                            dropout=0.0, resamp_with_conv=True, num_groups=4, null_class=True)
        config.train.num_iterations = 4
        config.train.batch_size = 32
        config.classifier.epochs = 1
        config.classifier.milestones = ()
        config.mask.batch_size = 8
        config.unlearn.num_iterations = 2
        config.unlearn.batch_size = 8
        config.run_methods = ("SalUn", "RL", "GA")
        config.sample = dict(num_per_class=2, num_steps=2, eta=1.0, guidance_scale=2.0,
                             batch_size=20, use_ema=False, seed=0, grid_per_class=2, grid_scale=2)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; known: tiny")
    return config
