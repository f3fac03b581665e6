"""CIFAR ResNets (3x3 stem, no max-pool) with input normalisation inside the model.

References: He et al. 2016; the CIFAR variant used by SalUn (upstream `Classification/models/`):
conv1 3x3/s1 (no bias) + BN + ReLU, no max-pool, BasicBlock x[2,2,2,2] at widths 64/128/256/512,
average pool, fc with bias. PyTorch-equivalent initialisation: kaiming-normal(fan_out) convs, BN
gamma=1 beta=0, fc uniform(+-1/sqrt(fan_in)) for weight and bias. BN: eps 1e-5, momentum 0.9 (flax
convention).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# A flax module class or factory (`nn.Conv`, or a partial of it), as in flax's examples.
ModuleDef = Any

# PyTorch's kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_uniform_init(fan_in: int):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the bias, and the
    kernel: kaiming_uniform(a=sqrt(5)) gives the same bound). Shared by every model here."""

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / jnp.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchDense(nn.Module):
    """Dense initialised like PyTorch's nn.Linear (kernel and bias U(+-1/sqrt(fan_in)))."""

    features: int

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        return nn.Dense(
            self.features,
            kernel_init=torch_uniform_init(fan_in),
            bias_init=torch_uniform_init(fan_in),
        )(x)


class Normalize(nn.Module):
    """(x - mean) / std per channel; x is float in [0, 1]. No parameters."""

    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, x):
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std, x.dtype)
        return (x - mean) / std


def _batch_norm(train: bool, name: str | None = None):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def batch_norm_mask(batch_mask: jax.Array | None, x: jax.Array) -> jax.Array | None:
    """The per-example mask [B] reshaped to [B, 1, ..., 1] (broadcastable to `x`), or None.

    BatchNorm's batch statistics are then taken over the masked-in examples only: the real
    images of a padded last batch, as PyTorch's smaller last batch.
    """
    if batch_mask is None:
        return None
    return batch_mask.reshape(batch_mask.shape[0], *(1,) * (x.ndim - 1))


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool, batch_mask: jax.Array | None = None):
        conv = functools.partial(self.conv, use_bias=False, kernel_init=conv_kernel_init)
        mask = batch_norm_mask(batch_mask, x)
        y = conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = nn.relu(_batch_norm(train, "bn1")(y, mask=mask))
        y = conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
        y = _batch_norm(train, "bn2")(y, mask=mask)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), self.strides, padding=0, name="shortcut_conv")(x)
            x = _batch_norm(train, "shortcut_bn")(x, mask=mask)
        return nn.relu(x + y)


class BottleneckBlock(nn.Module):
    features: int
    strides: int = 1
    expansion: int = 4
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool, batch_mask: jax.Array | None = None):
        conv = functools.partial(self.conv, use_bias=False, kernel_init=conv_kernel_init)
        mask = batch_norm_mask(batch_mask, x)
        out_features = self.features * self.expansion
        y = conv(self.features, (1, 1), name="conv1")(x)
        y = nn.relu(_batch_norm(train, "bn1")(y, mask=mask))
        y = conv(self.features, (3, 3), self.strides, padding=1, name="conv2")(y)
        y = nn.relu(_batch_norm(train, "bn2")(y, mask=mask))
        y = _batch_norm(train, "bn3")(conv(out_features, (1, 1), name="conv3")(y), mask=mask)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = conv(out_features, (1, 1), self.strides, padding=0, name="shortcut_conv")(x)
            x = _batch_norm(train, "shortcut_bn")(x, mask=mask)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet. Input: float images in [0, 1], [B, H, W, C]. Output: logits [B, K].

    `width` scales every stage's channels (64 * width, ...) for small CPU variants.
    `batch_mask` ([B] bool, train mode): the examples BatchNorm's batch statistics are taken over
    (the real rows of a padded batch); None: all.
    `conv`: the convolution module (`nn.Conv`, or a drop-in with its parameters, such as the
    CPU wing's `salun_jax.cpu.conv.Conv`).
    """

    stage_sizes: Sequence[int]
    block_cls: Any = BasicBlock
    num_classes: int = 10
    width: float = 1.0
    base_features: int = 64
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    conv: ModuleDef = nn.Conv

    def features(self, x, train: bool, batch_mask: jax.Array | None = None):
        """Penultimate (pooled) features [B, D]."""
        x = Normalize(self.mean, self.std)(x)
        base = max(1, int(round(self.base_features * self.width)))
        x = self.conv(
            base, (3, 3), 1, padding=1, use_bias=False, kernel_init=conv_kernel_init, name="conv1"
        )(x)
        x = nn.relu(_batch_norm(train, "bn1")(x, mask=batch_norm_mask(batch_mask, x)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = self.block_cls(
                    base * 2**stage, strides, conv=self.conv, name=f"layer{stage + 1}_{block}"
                )(x, train=train, batch_mask=batch_mask)
        return jnp.mean(x, axis=(1, 2))

    @nn.compact
    def __call__(
        self,
        x,
        train: bool = False,
        return_features: bool = False,
        batch_mask: jax.Array | None = None,
    ):
        feats = self.features(x, train, batch_mask)
        logits = TorchDense(self.num_classes, name="fc")(feats)
        return (logits, feats) if return_features else logits


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
# Small CPU variants: fewer stages (and a width multiplier through `width`).
ResNet8 = functools.partial(ResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock)
