"""Stable Diffusion's VAE (diffusers' `AutoencoderKL`) in Flax Linen, NHWC.

Encoder: conv_in, down blocks of resnets with asymmetrically padded strided convs, a mid block
(resnet, single-head self-attention, resnet), GN-SiLU-conv_out to 2 x latent channels, then
`quant_conv`; the result splits into the mean and log-variance of a diagonal Gaussian. Decoder:
`post_quant_conv`, conv_in, mid block, up blocks (layers_per_block + 1 resnets, nearest x2 +
conv), GN-SiLU-conv_out. Every GroupNorm here uses eps 1e-6.

Latents for the UNet are `encode(x).sample(rng) * config.scaling_factor` (0.18215 for SD v1.x)
and go back through `decode(z / config.scaling_factor)`, with images in [-1, 1].

References:
  (`diffusers:src/diffusers/models/autoencoders/autoencoder_kl.py`, `vae.py`,
  `unets/unet_2d_blocks.py::UNetMidBlock2D`); Kingma & Welling 2014; Rombach et al. 2022, §3.1.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from salun_jax.models.sd.layers import Attention, conv, group_norm
from salun_jax.models.sd.unet import DownBlock, MidBlock, UpBlock

VAE_EPS = 1e-6  # every GroupNorm in the VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Fields of diffusers' `vae/config.json`; the defaults are SD v1.x's."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise ValueError(f"unsupported down_block_types {self.down_block_types}")
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"unsupported up_block_types {self.up_block_types}")


class LatentDistribution(NamedTuple):
    """The encoder's diagonal Gaussian posterior; [B, h, w, latent_channels] each."""

    mean: jax.Array
    logvar: jax.Array  # clipped to [-30, 20] as diffusers does

    def sample(self, rng: jax.Array) -> jax.Array:
        noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.logvar) * noise


class VAEMidBlock(MidBlock):
    """`UNetMidBlock2D`: resnet, single-head self-attention with biases, its own GroupNorm and a
    residual connection, resnet."""

    def _attention(self, index: int) -> Attention:
        return Attention(
            1,
            qkv_bias=True,
            norm_groups=self.num_groups,
            norm_eps=self.eps,
            residual_connection=True,
            name=f"attentions_{index}",
        )


def _mid_block(cfg: VAEConfig) -> VAEMidBlock:
    return VAEMidBlock(
        cfg.block_out_channels[-1],
        2,
        cfg.norm_num_groups,
        VAE_EPS,
        add_attention=cfg.mid_block_add_attention,
        name="mid_block",
    )


def _output_head(h: jax.Array, cfg: VAEConfig, features: int) -> jax.Array:
    h = nn.silu(group_norm(cfg.norm_num_groups, VAE_EPS, "conv_norm_out")(h))
    return conv(features, "conv_out", kernel=3)(h)


class Encoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels].
        cfg = self.config
        num_blocks = len(cfg.block_out_channels)
        h = conv(cfg.block_out_channels[0], "conv_in", kernel=3)(x)
        for i, channels in enumerate(cfg.block_out_channels):
            h, _ = DownBlock(
                channels,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                VAE_EPS,
                add_downsample=i < num_blocks - 1,
                downsample_padding=0,
                name=f"down_blocks_{i}",
            )(h, None, None)
        h = _mid_block(cfg)(h, None, None)
        return _output_head(h, cfg, 2 * cfg.latent_channels)


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        # z: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels].
        cfg = self.config
        num_blocks = len(cfg.block_out_channels)
        h = conv(cfg.block_out_channels[-1], "conv_in", kernel=3)(z)
        h = _mid_block(cfg)(h, None, None)
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            h = UpBlock(
                channels,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                VAE_EPS,
                add_upsample=i < num_blocks - 1,
                name=f"up_blocks_{i}",
            )(h, None, None, None)
        return _output_head(h, cfg, cfg.out_channels)


class AutoencoderKL(nn.Module):
    """SD's VAE; call `encode` / `decode` with `apply(..., method=...)`.

    Attributes:
      config: the architecture; `VAEConfig()` is SD v1.x's (83,653,863 parameters).
    """

    config: VAEConfig = VAEConfig()

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels)

    def encode(self, x: jax.Array) -> LatentDistribution:
        """[B, H, W, 3] images in [-1, 1] -> the posterior over unscaled latents."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return LatentDistribution(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """[B, h, w, latent_channels] unscaled latents -> [B, H, W, 3] images (about [-1, 1])."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstructs `x` through the posterior mean (also what `init` traces)."""
        return self.decode(self.encode(x).mean)
