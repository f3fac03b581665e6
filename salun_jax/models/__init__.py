"""Classification models and a name -> constructor registry."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from salun_jax.models.resnet import ModuleDef, ResNet, ResNet8, ResNet18, ResNet34, ResNet50
from salun_jax.models.vgg import VGG, VGG16BN, SmallCNN

MODELS = {
    "resnet8": ResNet8,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "vgg16_bn": VGG16BN,
    "small_cnn": SmallCNN,
}

# What `create_model` builds convolutions with when not told: one process-wide choice.
_default_conv: ModuleDef = nn.Conv


def set_default_conv(conv: ModuleDef) -> None:
    """Sets the convolution module `create_model` uses when given none (`nn.Conv` until set),
    for the whole process: the one hook through which the CPU wing (`salun_jax.cpu.enable`)
    reaches the models that the library builds from configs. Call it before building models."""
    global _default_conv
    _default_conv = conv


def default_conv() -> ModuleDef:
    """The convolution module `create_model` uses when given none (see `set_default_conv`)."""
    return _default_conv


def create_model(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float = 1.0,
    conv: ModuleDef | None = None,
) -> nn.Module:
    """Builds a classifier by name. Input to the model: float [0, 1] images [B, H, W, C].

    `conv`: the convolution module, `nn.Conv` or a drop-in with its parameters (None:
    `default_conv()`); parameters and their names do not depend on it.

    Raises:
      ValueError: unknown model name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return MODELS[name](
        num_classes=num_classes,
        mean=tuple(mean),
        std=tuple(std),
        width=width,
        conv=default_conv() if conv is None else conv,
    )


__all__ = [
    "MODELS",
    "ModuleDef",
    "ResNet",
    "ResNet8",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "SmallCNN",
    "VGG",
    "VGG16BN",
    "create_model",
    "default_conv",
    "set_default_conv",
]
