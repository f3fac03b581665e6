"""Classification models and a name -> constructor registry."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from salun_jax.models.conv import Conv, ConvImpl, default_conv_impl
from salun_jax.models.resnet import ResNet, ResNet8, ResNet18, ResNet34, ResNet50
from salun_jax.models.vgg import VGG, VGG16BN, SmallCNN

MODELS = {
    "resnet8": ResNet8,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "vgg16_bn": VGG16BN,
    "small_cnn": SmallCNN,
}


def create_model(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float = 1.0,
    conv_impl: ConvImpl | None = None,
) -> nn.Module:
    """Builds a classifier by name. Input to the model: float [0, 1] images [B, H, W, C].

    `conv_impl` chooses how convolutions run ("xla", "custom", "auto", "plain", "onednn";
    None: the default of `salun_jax.models.conv.default_conv_impl`); parameters do not depend on
    it.

    Raises:
      ValueError: unknown model name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return MODELS[name](
        num_classes=num_classes, mean=tuple(mean), std=tuple(std), width=width, conv_impl=conv_impl
    )


__all__ = [
    "MODELS",
    "Conv",
    "ConvImpl",
    "ResNet",
    "ResNet8",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "SmallCNN",
    "VGG",
    "VGG16BN",
    "create_model",
    "default_conv_impl",
]
