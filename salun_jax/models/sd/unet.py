"""Stable Diffusion v1.x latent UNet (diffusers' `UNet2DConditionModel`) in Flax Linen, NHWC.

An exact port of the PyTorch module for the options SD v1.x/v2.x use; weights load from a
diffusers `unet/` folder with `salun_jax.models.sd.loading.load_unet`. Unlike the old diffusers
Flax port, the spatial transformer's GroupNorm uses eps 1e-6, GEGLU uses the exact (erf) GELU and
the GroupNorm groups come from the config.

Dropout is not implemented (SD's dropout is 0), and the attention runs in the input dtype
(`upcast_attention` only matters for half precision).

References:
  (`diffusers:src/diffusers/models/unets/unet_2d_condition.py`,
  `unet_2d_blocks.py`, `transformers/transformer_2d.py`, `attention.py`, `embeddings.py`);
  Rombach et al. 2022 (latent diffusion), App. E.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from salun_jax.models.sd.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
    layer_norm,
)
from salun_jax.models.unet import timestep_embedding

CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"


def _per_block(value: int | tuple[int, ...], num_blocks: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * num_blocks
    if len(value) != num_blocks:
        raise ValueError(f"{name} has {len(value)} entries for {num_blocks} blocks")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The `UNet2DConditionModel` options this port supports; the defaults are SD v1.x's.

    Field names and meanings are those of diffusers' `unet/config.json` (see
    `loading.unet_config_from_dict`). As in diffusers (issue #2011), `attention_head_dim` is the
    number of heads when `num_attention_heads` is None.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (DOWN,)
    up_block_types: tuple[str, ...] = (UP,) + (CROSS_ATTN_UP,) * 3
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = False
    transformer_layers_per_block: int | tuple[int, ...] = 1

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"{n} block_out_channels but {len(self.down_block_types)} down and "
                f"{len(self.up_block_types)} up block types"
            )
        for kind in self.down_block_types:
            if kind not in (CROSS_ATTN_DOWN, DOWN):
                raise ValueError(f"unsupported down block type {kind!r}")
        for kind in self.up_block_types:
            if kind not in (CROSS_ATTN_UP, UP):
                raise ValueError(f"unsupported up block type {kind!r}")
        for ch, heads in zip(self.block_out_channels, self.heads_per_block, strict=True):
            if ch % self.norm_num_groups or ch % heads:
                raise ValueError(
                    f"block channels {ch} must divide by norm_num_groups "
                    f"{self.norm_num_groups} and by the {heads} heads"
                )

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        return _per_block(heads, len(self.block_out_channels), "attention heads")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(
            self.transformer_layers_per_block,
            len(self.block_out_channels),
            "transformer_layers_per_block",
        )


class TimestepEmbedding(nn.Module):
    """`linear_1` -> SiLU -> `linear_2`."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.features, name="linear_1")(x))
        return nn.Dense(self.features, name="linear_2")(x)


class GEGLU(nn.Module):
    """`proj` to 2 x inner, split into (h, gate), h * gelu(gate) with the exact (erf) GELU."""

    inner_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(nn.Dense(2 * self.inner_dim, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU (`net_0`) to 4C, then `net_2` back to C (`net_1` is dropout upstream)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = GEGLU(4 * channels, name="net_0")(x)
        return nn.Dense(channels, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the text context, GEGLU feed-forward."""

    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        # x: [B, N, C]; context: [B, M, D].
        x = x + Attention(self.num_heads, name="attn1")(layer_norm(1e-5, "norm1")(x))
        x = x + Attention(self.num_heads, name="attn2")(layer_norm(1e-5, "norm2")(x), context)
        return x + FeedForward(name="ff")(layer_norm(1e-5, "norm3")(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GN(eps 1e-6), proj_in, transformer blocks over H*W tokens, proj_out,
    plus the input. proj_in/out are 1x1 convs (SD v1) or Dense (`use_linear_projection`, SD v2).
    """

    num_heads: int
    num_layers: int
    norm_groups: int
    use_linear_projection: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        project = nn.Dense if self.use_linear_projection else conv
        h = group_norm(self.norm_groups, 1e-6, "norm")(x)
        h = project(c, name="proj_in")(h).reshape(b, height * width, c)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.num_heads, name=f"transformer_blocks_{i}")(h, context)
        h = project(c, name="proj_out")(h.reshape(b, height, width, c))
        return h + x


class _BlockOptions(nn.Module):
    """Options every UNet block shares (a base class, never called)."""

    out_channels: int
    num_layers: int
    num_groups: int
    eps: float
    num_heads: int | None = None  # None: no attention (DownBlock2D / UpBlock2D)
    transformer_layers: int = 1
    use_linear_projection: bool = False

    def _attention(self, index: int) -> Transformer2DModel:
        return Transformer2DModel(
            self.num_heads,
            self.transformer_layers,
            self.num_groups,
            self.use_linear_projection,
            name=f"attentions_{index}",
        )

    def _resnet(self, index: int, output_scale_factor: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(
            self.out_channels,
            self.num_groups,
            self.eps,
            output_scale_factor,
            name=f"resnets_{index}",
        )


class DownBlock(_BlockOptions):
    """(Cross-attention) down block: resnet (+ transformer) per layer, then a strided conv.

    Returns the output and the skips it adds (every layer's output and the downsampled one).
    """

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for j in range(self.num_layers):
            x = self._resnet(j)(x, temb)
            if self.num_heads is not None:
                x = self._attention(j)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.downsample_padding, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(_BlockOptions):
    """(Cross-attention) up block: each layer concatenates `[h, skip]` (h first, the last skip
    first; no skips in the VAE decoder), then resnet (+ transformer); then nearest x2 + conv."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context) -> jax.Array:
        skips = None if skips is None else list(skips)
        for j in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._resnet(j)(x, temb)
            if self.num_heads is not None:
                x = self._attention(j)(x, context)
        if self.add_upsample:
            x = Upsample2D(name="upsamplers_0")(x)
        return x


class MidBlock(_BlockOptions):
    """`UNetMidBlock2DCrossAttn`: resnet, transformer, resnet."""

    output_scale_factor: float = 1.0
    add_attention: bool = True

    @nn.compact
    def __call__(self, x, temb, context) -> jax.Array:
        x = self._resnet(0, self.output_scale_factor)(x, temb)
        if self.add_attention:
            x = self._attention(0)(x, context)
        return self._resnet(1, self.output_scale_factor)(x, temb)


class UNet2DConditionModel(nn.Module):
    """SD's epsilon-prediction UNet conditioned on a timestep and a text context.

    Attributes:
      config: the architecture; `UNetConfig()` is SD v1.x (859,520,964 parameters).
    """

    config: UNetConfig = UNetConfig()

    @nn.compact
    def __call__(
        self, sample: jax.Array, timesteps: jax.typing.ArrayLike, context: jax.Array
    ) -> jax.Array:
        """Predicts the noise in `sample`.

        Args:
          sample: [B, H, W, in_channels] noisy latents; H and W divisible by
            2^(len(block_out_channels) - 1).
          timesteps: [B] or scalar timesteps (may be fractional).
          context: [B, M, cross_attention_dim] text encoder states (M = 77 in SD).

        Returns:
          [B, H, W, out_channels].

        Raises:
          ValueError: badly shaped inputs.
        """
        cfg = self.config
        num_blocks = len(cfg.block_out_channels)
        factor = 2 ** (num_blocks - 1)
        batch, height, width = sample.shape[:3]
        if sample.ndim != 4 or height % factor or width % factor:
            raise ValueError(
                f"sample must be [B, H, W, C] with H, W divisible by {factor}, got {sample.shape}"
            )
        if context.ndim != 3 or context.shape[0] != batch:
            raise ValueError(f"context must be [{batch}, M, D], got {context.shape}")
        heads = [
            h if kind == CROSS_ATTN_DOWN else None
            for h, kind in zip(cfg.heads_per_block, cfg.down_block_types, strict=True)
        ]
        block = dict(
            num_layers=cfg.layers_per_block,
            num_groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            use_linear_projection=cfg.use_linear_projection,
        )

        # 1. Time embedding: sinusoidal(C0) -> MLP(4 C0).
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
        temb = timestep_embedding(
            t,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            downscale_freq_shift=cfg.freq_shift,
        )
        temb = TimestepEmbedding(4 * cfg.block_out_channels[0], name="time_embedding")(temb)

        # 2. Down path; conv_in's output and every block layer's output are skips.
        h = conv(cfg.block_out_channels[0], "conv_in", kernel=3)(sample)
        skips = [h]
        for i, channels in enumerate(cfg.block_out_channels):
            h, block_skips = DownBlock(
                channels,
                num_heads=heads[i],
                transformer_layers=cfg.transformer_layers[i],
                add_downsample=i < num_blocks - 1,
                downsample_padding=cfg.downsample_padding,
                name=f"down_blocks_{i}",
                **block,
            )(h, temb, context)
            skips.extend(block_skips)

        # 3. Mid block at the lowest resolution.
        h = MidBlock(
            cfg.block_out_channels[-1],
            num_heads=cfg.heads_per_block[-1],
            transformer_layers=cfg.transformer_layers[-1],
            output_scale_factor=cfg.mid_block_scale_factor,
            name="mid_block",
            **{**block, "num_layers": 2},
        )(h, temb, context)

        # 4. Up path: layers_per_block + 1 layers per block, each eating the last skip.
        num_up_layers = cfg.layers_per_block + 1
        for i, kind in enumerate(cfg.up_block_types):
            k = num_blocks - 1 - i  # the matching down block
            block_skips, skips = skips[-num_up_layers:], skips[:-num_up_layers]
            h = UpBlock(
                cfg.block_out_channels[k],
                num_heads=cfg.heads_per_block[k] if kind == CROSS_ATTN_UP else None,
                transformer_layers=cfg.transformer_layers[k],
                add_upsample=i < num_blocks - 1,
                name=f"up_blocks_{i}",
                **{**block, "num_layers": num_up_layers},
            )(h, block_skips, temb, context)
        assert not skips

        # 5. Output head.
        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out")(h))
        return conv(cfg.out_channels, "conv_out", kernel=3)(h)
