"""Diffusion: noise schedule, denoising loss, CFG-guided DDIM/DDPM samplers, DDPM training,
diffusion SalUn (saliency mask, RL/GA unlearning) and generation metrics."""

from salun_jax.diffusion.evaluation import (
    class_accuracies,
    classifier_frechet_distance,
    evaluate_samples,
    frechet_distance,
    generate_samples,
    save_sample_grid,
    unlearning_accuracy,
)
from salun_jax.diffusion.losses import (
    antithetic_timesteps,
    diffusion_loss,
    make_denoising_loss_fn,
    sample_null_mask,
)
from salun_jax.diffusion.samplers import (
    ddim_sample,
    ddpm_sample,
    guided_eps,
    timestep_sequence,
    to_uint8,
)
from salun_jax.diffusion.schedule import NoiseSchedule, linear_schedule, q_sample
from salun_jax.diffusion.training import (
    DiffusionTrainConfig,
    create_diffusion_state,
    make_diffusion_train_step,
    train_diffusion,
)
from salun_jax.diffusion.unlearning import (
    DiffusionUnlearnConfig,
    diffusion_saliency_scores,
    make_diffusion_unlearn_step,
    pseudo_labels,
    unlearn_diffusion,
)

__all__ = [
    "DiffusionTrainConfig",
    "DiffusionUnlearnConfig",
    "NoiseSchedule",
    "antithetic_timesteps",
    "class_accuracies",
    "classifier_frechet_distance",
    "create_diffusion_state",
    "ddim_sample",
    "ddpm_sample",
    "diffusion_loss",
    "diffusion_saliency_scores",
    "evaluate_samples",
    "frechet_distance",
    "generate_samples",
    "guided_eps",
    "linear_schedule",
    "make_denoising_loss_fn",
    "make_diffusion_train_step",
    "make_diffusion_unlearn_step",
    "pseudo_labels",
    "q_sample",
    "sample_null_mask",
    "save_sample_grid",
    "timestep_sequence",
    "to_uint8",
    "train_diffusion",
    "unlearn_diffusion",
    "unlearning_accuracy",
]
