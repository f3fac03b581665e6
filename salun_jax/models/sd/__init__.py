"""Stable Diffusion v1.x in Flax: UNet, CLIP text encoder, VAE, tokenizer, diffusers-folder loading.

Layout is NHWC throughout. See `loading.load_stable_diffusion` for the entry point and
diffusers' `UNet2DConditionModel`, `AutoencoderKL` and transformers' `CLIPTextModel` for the
architecture.
"""

from salun_jax.models.sd.clip_text import CLIPTextConfig, CLIPTextModel
from salun_jax.models.sd.loading import (
    StableDiffusion,
    WeightFileNotFoundError,
    WeightLoadingError,
    convert_state_dict,
    load_stable_diffusion,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    param_shapes,
)
from salun_jax.models.sd.tokenizer import CLIPTokenizer
from salun_jax.models.sd.unet import UNet2DConditionModel, UNetConfig
from salun_jax.models.sd.vae import AutoencoderKL, LatentDistribution, VAEConfig

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTokenizer",
    "LatentDistribution",
    "StableDiffusion",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "WeightFileNotFoundError",
    "WeightLoadingError",
    "convert_state_dict",
    "load_stable_diffusion",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
    "param_shapes",
]
