"""Building blocks shared by the Stable Diffusion UNet and VAE (diffusers' layout, NHWC).

Submodule names follow diffusers' state-dict keys with list indices joined by an underscore
(`to_out.0` -> `to_out_0`), so `salun_jax.models.sd.loading` maps weights by name alone.

References:
  (`diffusers:src/diffusers/models/resnet.py`, `attention_processor.py`,
  `downsampling.py`, `upsampling.py`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(num_groups: int, epsilon: float, name: str) -> nn.GroupNorm:
    # Two-pass variance, as torch computes it; Flax's default eps (1e-6) is not torch's (1e-5),
    # so every caller passes eps.
    return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, use_fast_variance=False, name=name)


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


def conv(
    features: int, name: str | None = None, kernel: int = 1, strides: int = 1, padding=None
) -> nn.Conv:
    """A torch-style Conv2d (symmetric `kernel // 2` padding unless `padding` is given)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding=padding, name=name
    )


def multi_head_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, is_causal: bool = False
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v over heads split as torch's `view(B, N, heads, dim)`.

    Args:
      q: [B, N, C] queries; k, v: [B, M, C] keys and values; C divisible by num_heads.
      num_heads: number of heads.
      is_causal: mask out keys after each query (CLIP's text transformer).

    Returns:
      [B, N, C].
    """

    def split(x):
        return x.reshape(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads)

    out = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=is_causal)
    return out.reshape(q.shape)


CROSS_ATTENTION_PROBS = "cross_attention_probs"


def attention_probs(q: jax.Array, k: jax.Array, num_heads: int) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) per head: [B, heads, N, M] for q [B, N, C], k [B, M, C]."""
    b, n, c = q.shape
    q = q.reshape(b, n, num_heads, c // num_heads)
    k = k.reshape(b, k.shape[1], num_heads, c // num_heads)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / jnp.sqrt(jnp.float32(c // num_heads))
    return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
    """diffusers' `Attention` (AttnProcessor2_0).

    Attributes:
      num_heads: attention heads; head_dim = C / num_heads.
      qkv_bias: biases on to_q/to_k/to_v (False in the UNet, True in the VAE mid block).
      norm_groups: if set, a GroupNorm (`group_norm`, as the VAE mid-block attention has) is
        applied to the input before the projections.
      norm_eps: that GroupNorm's eps.
      residual_connection: add the input to the output (the VAE mid block).
    """

    num_heads: int
    qkv_bias: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    residual_connection: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        # x: [B, N, C] tokens or [B, H, W, C] (attends over H*W); context: [B, M, D] or None
        # (self-attention).
        shape, channels = x.shape, x.shape[-1]
        residual = x = x.reshape(shape[0], -1, channels)
        if self.norm_groups is not None:
            x = group_norm(self.norm_groups, self.norm_eps, "group_norm")(x)
        context = x if context is None else context
        q = nn.Dense(channels, use_bias=self.qkv_bias, name="to_q")(x)
        k = nn.Dense(channels, use_bias=self.qkv_bias, name="to_k")(context)
        v = nn.Dense(channels, use_bias=self.qkv_bias, name="to_v")(context)
        h = multi_head_attention(q, k, v, self.num_heads)
        if context is not x and self.is_mutable_collection("intermediates"):
            # Cross-attention maps for Forget-Me-Not's attention re-steering, only when asked
            # for (`apply(..., mutable=["intermediates"])`): [B, heads, N, M] after softmax.
            self.sow("intermediates", CROSS_ATTENTION_PROBS, attention_probs(q, k, self.num_heads))
        h = nn.Dense(channels, name="to_out_0")(h)
        if self.residual_connection:
            h = h + residual
        return h.reshape(shape)


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, + projected time embedding, GN-SiLU-conv, 1x1 shortcut if channels change.

    Dropout is left out: SD's configs have dropout 0 and this port is used for inference and
    fine-tuning without it.

    Attributes:
      out_channels: output channels.
      num_groups: GroupNorm groups.
      eps: GroupNorm eps (norm_eps in the UNet, 1e-6 in the VAE).
      output_scale_factor: the sum `(shortcut + h)` is divided by it.
    """

    out_channels: int
    num_groups: int
    eps: float
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        # x: [B, H, W, Cin]; temb: [B, E] or None (VAE).
        h = nn.silu(group_norm(self.num_groups, self.eps, "norm1")(x))
        h = conv(self.out_channels, "conv1", kernel=3)(h)
        if temb is not None:
            h = h + nn.Dense(self.out_channels, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.silu(group_norm(self.num_groups, self.eps, "norm2")(h))
        h = conv(self.out_channels, "conv2", kernel=3)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """3x3 stride-2 conv (`conv`). padding 1 in the UNet; padding 0 in the VAE, where diffusers
    first pads one row/column at the bottom/right."""

    padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return conv(x.shape[-1], "conv", kernel=3, strides=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (`conv`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], "conv", kernel=3)(x)
