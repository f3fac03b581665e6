"""VGG16-BN as in the SalUn code (upstream `Classification/models/`): bias-free 3x3 convs + BN +
ReLU,
max-pools, adaptive average pool to 2x2, classifier 2048 -> 256 -> 256 -> K with N(0, 0.01)
Linear init, normalisation inside the model. Also a small plain CNN for 8x8 digits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from salun_jax.models.resnet import (
    ModuleDef,
    Normalize,
    TorchDense,
    batch_norm_mask,
    conv_kernel_init,
)

VGG16_LAYOUT = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


def _adaptive_avg_pool(x, size: int):
    """torch.nn.AdaptiveAvgPool2d((size, size)) for H, W divisible by size or equal to 1."""
    b, h, w, c = x.shape
    if h == 1 and w == 1:
        return jnp.broadcast_to(x, (b, size, size, c))
    if h % size or w % size:
        raise ValueError(f"adaptive pool to {size}x{size} needs H, W divisible by it; got {h}x{w}")
    return x.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


def _conv_bn_relu(
    x: jax.Array,
    features: int,
    stride: int,
    train: bool,
    batch_mask: jax.Array | None,
    conv: ModuleDef,
) -> jax.Array:
    """3x3 conv (no bias, PyTorch's kaiming-normal fan-out init) + BatchNorm (batch statistics
    over the `batch_mask` examples) + ReLU, inside a compact module."""
    x = conv(features, (3, 3), stride, padding=1, use_bias=False, kernel_init=conv_kernel_init)(x)
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    return nn.relu(bn(x, mask=batch_norm_mask(batch_mask, x)))


class VGG(nn.Module):
    """VGG with BatchNorm. Input: float images in [0, 1], [B, H, W, C]. Output: logits [B, K].

    `batch_mask` ([B] bool, train mode): the examples BatchNorm's batch statistics are taken over.
    `conv`: the convolution module, as in `ResNet`.
    """

    layout: Sequence = VGG16_LAYOUT
    num_classes: int = 10
    width: float = 1.0
    hidden: int = 256
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(
        self,
        x,
        train: bool = False,
        return_features: bool = False,
        batch_mask: jax.Array | None = None,
    ):
        x = Normalize(self.mean, self.std)(x)
        for item in self.layout:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = _conv_bn_relu(
                x,
                max(1, int(round(item * self.width))),
                1,
                train,
                batch_mask,
                self.conv,
            )
        x = _adaptive_avg_pool(x, 2).reshape(x.shape[0], -1)  # [B, 4 * C]
        dense = functools.partial(
            nn.Dense, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros
        )
        hidden = max(1, int(round(self.hidden * self.width)))
        x = nn.relu(dense(hidden)(x))
        feats = nn.relu(dense(hidden)(x))
        logits = dense(self.num_classes, name="fc")(feats)
        return (logits, feats) if return_features else logits


VGG16BN = functools.partial(VGG, layout=VGG16_LAYOUT)


class SmallCNN(nn.Module):
    """A small conv net for 8x8 inputs: 3 conv-BN-ReLU layers (strides 1, 2, 2), mean pool, fc.
    `batch_mask` and `conv` as in `VGG`."""

    num_classes: int = 10
    width: float = 1.0
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(
        self,
        x,
        train: bool = False,
        return_features: bool = False,
        batch_mask: jax.Array | None = None,
    ):
        x = Normalize(self.mean, self.std)(x)
        for features, stride in ((32, 1), (64, 2), (128, 2)):
            x = _conv_bn_relu(
                x,
                max(1, int(round(features * self.width))),
                stride,
                train,
                batch_mask,
                self.conv,
            )
        feats = jnp.mean(x, axis=(1, 2))
        logits = TorchDense(self.num_classes, name="fc")(feats)
        return (logits, feats) if return_features else logits
