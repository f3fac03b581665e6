"""How XLA:CPU runs the models' convolutions: each input in its own buffer, YNNPACK off.

Two measured gains, both changing float rounding only (docs/benchmarks.md, section 4):

- `Conv` is `flax.linen.Conv` (the same parameters, names and checkpoints) whose input passes
  through `materialize` on the CPU backend. ResNet-18 x0.25, batch 128, 2 cores: the train step
  1.07x faster than plain `nn.Conv` on one core, whole CIFAR-10 epochs 1.18x on two.
- `xla_flag()` is the XLA_FLAGS entry that keeps YNNPACK (XLA:CPU's default library for
  convolutions with more than 16 channels) off convolutions, so XLA's own Eigen kernels run them,
  which get faster with a second core where YNNPACK's 32- and 64-channel ones do not: the same
  step 1.26x faster on 2 Intel cores, 1.14x on 2 AMD cores. Programs without convolutions
  compile as before (YNNPACK keeps dots and reductions).
"""

from __future__ import annotations

import functools
import glob
import mmap
import os

import flax.linen as nn
import jax
from jax import lax

_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
YNN_CONVOLUTIONS_ENV_VAR = "SALUN_JAX_YNN_CONVOLUTIONS"


@functools.cache
def xla_knows(*words: str) -> bool:
    """Whether this jaxlib's XLA has all these option names and values: an unknown XLA_FLAGS
    entry aborts the process when the backend starts, so look them up in its shared libraries
    instead."""
    import jaxlib  # noqa: PLC0415

    encoded = [word.encode() for word in words]
    libraries = glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so"))
    for path in sorted(libraries, key=os.path.getsize, reverse=True)[:2]:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if all(data.find(word) >= 0 for word in encoded):
                return True
    return False


def xla_flag() -> str | None:
    """The XLA_FLAGS entry that keeps YNNPACK off convolutions, or None: with
    $SALUN_JAX_YNN_CONVOLUTIONS=1 (XLA's default), where XLA_FLAGS sets the option already, or
    where this XLA does not know it."""
    if os.environ.get(YNN_CONVOLUTIONS_ENV_VAR, "0") == "1":
        return None
    if _YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    if not xla_knows(_YNN_OPTION, *_YNN_WITHOUT_CONVOLUTIONS.split(",")):
        return None
    return f"--{_YNN_OPTION}={_YNN_WITHOUT_CONVOLUTIONS}"


def _write_through(x: jax.Array) -> jax.Array:
    if x.size == 0:
        return x
    index = (0,) * x.ndim
    return x.at[index].set(x[index])


@jax.custom_jvp
def materialize(x: jax.Array) -> jax.Array:
    """`x`, unchanged in value and derivatives (the JVP is the identity, so every transform
    works), computed as an in-place one-element update of itself.

    Why: the weight gradient of an NHWC convolution needs its input with the batch as the minor
    dimension, so XLA:CPU transposes it. XLA fuses that transpose with the input's producers
    (BatchNorm-apply, ReLU, the residual add) and, through the residual shortcuts, with every
    earlier block's producers back to the last downsampling: one ResNet-18 x0.25 step had 17 such
    transposes recomputing up to three BatchNorms each with strided reads, about 130 ms of a
    750 ms step on one core. An in-place update cannot be fused into its consumers, so the
    transposes read one materialised buffer. Only what XLA may fuse changes, not the math."""
    return _write_through(x)


@materialize.defjvp
def _materialize_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return materialize(x), t


def conv_general_dilated(lhs, rhs, *args, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` with its input materialised on the CPU backend."""
    if jax.default_backend() == "cpu":
        lhs = materialize(lhs)
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


class Conv(nn.Conv):
    """`flax.linen.Conv` with its input materialised on the CPU backend: the same parameters,
    names (`Conv_0`, ...) and model repr as `nn.Conv`, so checkpoints, masks and the pipelines'
    fingerprints do not depend on it."""

    def __post_init__(self):
        if self.conv_general_dilated is None and self.conv_general_dilated_cls is None:
            object.__setattr__(self, "conv_general_dilated", conv_general_dilated)
        super().__post_init__()
