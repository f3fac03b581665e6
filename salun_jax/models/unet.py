"""Class-conditional DDPM UNet with a learned null class (classifier-free guidance).

A Flax Linen port of SalUn's `DDPM/models/diffusion.py::Conditional_Model`: the DDIM-repo UNet
(Ho et al. 2020 architecture) plus a class embedding MLP whose output is concatenated with the
time embedding and projected into every residual block, and a learnable null-class embedding used
for classifier-free guidance.

Differences from the PyTorch module, all deliberate:
  * Layout is NHWC (``x`` is ``[B, H, W, C]``), as usual in JAX.
  * Class dropout is not drawn inside the model. The caller passes ``null_mask`` (True -> the
    learned null embedding replaces the class embedding); `salun_jax.diffusion.losses` draws it.
    This keeps the model deterministic given its rngs and lets CFG run both halves in one batch.
  * ``swish(concat[temb, cemb])`` is computed once and shared by every block; upstream recomputes
    the same value inside each block.
  * Initialisation reproduces PyTorch's defaults (conv/linear kernels and biases
    U(+-1/sqrt(fan_in)), embeddings N(0, 1), GroupNorm 1/0), which the upstream model relies on.

References:
  upstream `DDPM/models/diffusion.py::Conditional_Model`; Ho et al. 2020 (DDPM) App. B;
  Ho & Salimans 2022 (CFG).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from salun_jax.models.resnet import torch_uniform_init

# Name of the learned null-class parameter; samplers look for it before using guidance.
NULL_CLASS_PARAM = "null_class_embedding"
CLASS_EMBEDDING_MODULE = "class_embedding"


# kaiming_uniform(a=sqrt(5)) == U(+-sqrt(6 / ((1 + 5) fan_in))) == U(+-1/sqrt(fan_in)).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dense(features: int, fan_in: int, name: str) -> nn.Dense:
    return nn.Dense(
        features, kernel_init=_torch_kernel_init, bias_init=torch_uniform_init(fan_in), name=name
    )


# flax's own nn.Conv: materialising the convolution inputs (salun_jax.cpu.conv, which speeds the
# ResNets' CPU step) measured no gain on this UNet (GroupNorm, no BatchNorm). DDPM train step,
# in-process A/B on two cores, interleaved rounds, plain vs materialised: paper UNet batch 8,
# median 2.50 vs 2.30 s/step, but the median per-round time ratio plain / materialised is 0.99;
# tiny UNet batch 64, 0.124 vs 0.124 s/step (ratio 1.00); the same parameters after a step.
def _conv(
    features: int,
    in_channels: int,
    name: str,
    kernel: int = 3,
    strides: int = 1,
    padding=None,
) -> nn.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        kernel_init=_torch_kernel_init,
        bias_init=torch_uniform_init(in_channels * kernel * kernel),
        name=name,
    )


def _group_norm(num_groups: int, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, name=name)


def timestep_embedding(
    t: jax.Array, dim: int, *, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0
) -> jax.Array:
    """Sinusoidal timestep embedding, as diffusers' `get_timestep_embedding` parametrises it.

    The defaults give the DDPM/DDIM code's (tensor2tensor style) `[sin, cos]` with frequencies
    exp(-log(10000) * k / (dim/2 - 1)); Stable Diffusion's `Timesteps` layer uses
    ``flip_sin_to_cos=True, downscale_freq_shift=0`` (`[cos, sin]`, divisor dim/2).

    Args:
      t: [B] timesteps (int or float; may be fractional).
      dim: embedding size.
      flip_sin_to_cos: put the cosines first.
      downscale_freq_shift: the frequencies are exp(-log(10000) * k / (dim/2 - shift)).

    Returns:
      [B, dim] float32 embedding (zero-padded by one column when dim is odd).

    References:
      diffusers `src/diffusers/models/embeddings.py`.
    """
    half = dim // 2
    # Same float32 op order as diffusers (scale, then divide).
    exponent = jnp.arange(half, dtype=jnp.float32) * -math.log(10000.0)
    freq = jnp.exp(exponent / (half - downscale_freq_shift))
    angles = jnp.asarray(t, jnp.float32)[:, None] * freq[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResnetBlock(nn.Module):
    """GN-swish-conv, + projected (time, class) embedding, GN-swish-dropout-conv, residual."""

    out_channels: int
    dropout: float
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool) -> jax.Array:
        # x: [B, H, W, Cin]; emb: [B, E] = swish(concat[temb, cemb]).
        in_channels = x.shape[-1]
        h = nn.swish(_group_norm(self.num_groups, "norm1")(x))
        h = _conv(self.out_channels, in_channels, "conv1")(h)
        h = h + _dense(self.out_channels, emb.shape[-1], "temb_cemb_proj")(emb)[:, None, None, :]
        h = nn.swish(_group_norm(self.num_groups, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, self.out_channels, "conv2")(h)
        if in_channels != self.out_channels:
            x = _conv(self.out_channels, in_channels, "nin_shortcut", kernel=1)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, q/k/v/proj as 1x1 convs, residual."""

    num_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        h = _group_norm(self.num_groups, "norm")(x).reshape(b, height * width, c)
        q = _dense(c, c, "q")(h)
        k = _dense(c, c, "k")(h)
        v = _dense(c, c, "v")(h)
        w = jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5)
        w = jax.nn.softmax(w, axis=-1)
        h = jnp.einsum("bij,bjc->bic", w, v)
        h = _dense(c, c, "proj_out")(h)
        return x + h.reshape(b, height, width, c)


class Downsample(nn.Module):
    with_conv: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            # Asymmetric (0, 1) padding as upstream ("no asymmetric padding in torch conv").
            c = x.shape[-1]
            return _conv(c, c, "conv", strides=2, padding=((0, 1), (0, 1)))(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    with_conv: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        if self.with_conv:
            c = x.shape[-1]
            x = _conv(c, c, "conv")(x)
        return x


class UNet(nn.Module):
    """Class-conditional epsilon-prediction UNet (DDIM-repo UNet + class embedding + null class).

    Attributes:
      ch: base channel count; time/class embedding width is 4 * ch.
      ch_mult: channel multiplier per resolution level.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: spatial resolutions at which attention follows each residual block.
      dropout: dropout rate inside residual blocks (active only when ``train=True``).
      num_classes: number of real classes (ids 0..num_classes-1).
      image_size: input height and width.
      out_channels: channels of the epsilon prediction (= input channels).
      resamp_with_conv: conv in up/downsampling (else nearest / average pooling only).
      num_groups: GroupNorm groups.
      null_class: whether the model has the learned null-class embedding (needed for CFG).
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    num_classes: int = 10
    image_size: int = 32
    out_channels: int = 3
    resamp_with_conv: bool = True
    num_groups: int = 32
    null_class: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        *,
        train: bool,
        null_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts the noise.

        Args:
          x: [B, H, W, C] noisy images (data scaled to [-1, 1]).
          t: [B] timesteps.
          y: [B] int class ids in [0, num_classes).
          train: enables dropout (rng stream 'dropout').
          null_mask: optional [B] bool; True -> use the learned null-class embedding.

        Returns:
          [B, H, W, out_channels] epsilon prediction.

        Raises:
          ValueError: wrong input shapes, or ``null_mask`` given to a model without a null class.
        """
        if x.ndim != 4 or x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"UNet expects x of shape [B, {self.image_size}, {self.image_size}, C], "
                f"got {x.shape}."
            )
        batch = x.shape[0]
        t, y = jnp.asarray(t), jnp.asarray(y)
        if t.shape != (batch,) or y.shape != (batch,):
            raise ValueError(f"t and y must have shape [{batch}], got {t.shape} and {y.shape}.")
        ch, emb_ch = self.ch, 4 * self.ch

        # 1. Time embedding: sinusoidal(ch) -> Dense(4ch) -> swish -> Dense(4ch).
        temb = timestep_embedding(t, ch)
        temb = _dense(emb_ch, ch, "temb_dense_0")(temb)
        temb = _dense(emb_ch, emb_ch, "temb_dense_1")(nn.swish(temb))

        # 2. Class embedding, with the learned null class where null_mask is set.
        cemb = nn.Embed(
            self.num_classes,
            ch,
            embedding_init=nn.initializers.normal(1.0),
            name=CLASS_EMBEDDING_MODULE,
        )(y)
        if self.null_class:
            null_emb = self.param(NULL_CLASS_PARAM, nn.initializers.normal(1.0), (ch,))
            if null_mask is not None:
                if null_mask.shape != (batch,):
                    raise ValueError(f"null_mask must have shape [{batch}], got {null_mask.shape}")
                cemb = jnp.where(null_mask[:, None], null_emb[None, :].astype(cemb.dtype), cemb)
        elif null_mask is not None:
            raise ValueError("null_mask given, but this UNet was built with null_class=False.")
        cemb = _dense(emb_ch, ch, "cemb_dense_0")(cemb)
        cemb = _dense(emb_ch, emb_ch, "cemb_dense_1")(nn.swish(cemb))

        # Every block applies Linear(swish(cat[temb, cemb])); the swish is shared.
        emb = nn.swish(jnp.concatenate([temb, cemb], axis=-1))  # [B, 8ch]
        block = functools.partial(ResnetBlock, dropout=self.dropout, num_groups=self.num_groups)
        attn = functools.partial(AttnBlock, num_groups=self.num_groups)

        # 3. Downsampling path; every intermediate feature map is kept for the skips.
        num_levels = len(self.ch_mult)
        resolution = self.image_size
        hs = [_conv(ch, x.shape[-1], "conv_in")(x)]
        for level in range(num_levels):
            for i in range(self.num_res_blocks):
                h = block(ch * self.ch_mult[level], name=f"down_{level}_block_{i}")(
                    hs[-1], emb, train=train
                )
                if resolution in self.attn_resolutions:
                    h = attn(name=f"down_{level}_attn_{i}")(h)
                hs.append(h)
            if level != num_levels - 1:
                downsample = Downsample(self.resamp_with_conv, name=f"down_{level}_downsample")
                hs.append(downsample(hs[-1]))
                resolution //= 2

        # 4. Middle: res, attn, res.
        h = hs[-1]
        h = block(h.shape[-1], name="mid_block_1")(h, emb, train=train)
        h = attn(name="mid_attn_1")(h)
        h = block(h.shape[-1], name="mid_block_2")(h, emb, train=train)

        # 5. Upsampling path: num_res_blocks + 1 blocks per level, each eating one skip.
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = block(ch * self.ch_mult[level], name=f"up_{level}_block_{i}")(
                    h, emb, train=train
                )
                if resolution in self.attn_resolutions:
                    h = attn(name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv, name=f"up_{level}_upsample")(h)
                resolution *= 2
        assert not hs

        # 6. Output head.
        h = nn.swish(_group_norm(self.num_groups, "norm_out")(h))
        return _conv(self.out_channels, h.shape[-1], "conv_out")(h)


def paper_cifar10_unet(num_classes: int = 10) -> UNet:
    """The paper's CIFAR-10 model (`configs/cifar10_train.yml`): 38,632,323 parameters."""
    return UNet(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_classes=num_classes,
        image_size=32,
        out_channels=3,
    )


def tiny_digits_unet(num_classes: int = 10) -> UNet:
    """A small UNet for 8x8x1 images (scikit-learn digits) that trains in seconds on CPU."""
    return UNet(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.1,
        num_classes=num_classes,
        image_size=8,
        out_channels=1,
        num_groups=8,
    )


def minimal_unet(num_classes: int = 10, **overrides) -> UNet:
    """The smallest UNet for 8x8x1 images: one level, no residual blocks on the way down, the
    middle block's attention. Its programs compile in seconds on a CPU: for tests and quick
    benchmark runs, not for learning anything. `overrides` replace any other field."""
    fields = dict(
        ch=8,
        ch_mult=(1,),
        num_res_blocks=0,
        attn_resolutions=(),
        dropout=0.1,
        num_classes=num_classes,
        image_size=8,
        out_channels=1,
        num_groups=4,
    )
    return UNet(**{**fields, **overrides})
