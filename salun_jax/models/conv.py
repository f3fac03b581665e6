"""2-D convolutions with a choice of gradient formulation, picked per layer shape on XLA:CPU.

XLA:CPU runs a plain NHWC/HWIO forward convolution several times faster than the convolutions
its autodiff emits for the backward pass (the input gradient is a convolution with input
dilation for strided layers, the weight gradient one with batch and feature swapped). Here the
same mathematical gradients can be computed other ways, and a per-shape chooser keeps, for each
layer shape, the fastest:

  - forward: ``xla`` (`lax.conv_general_dilated`) or ``im2col`` (patches @ kernel matrix);
  - input gradient: ``xla`` (the transpose XLA derives) or ``conv`` (a forward, stride-1
    convolution of the zero-interleaved, padded output gradient with the flipped, in/out-swapped
    kernel);
  - weight gradient: ``xla``, ``im2col`` (patches^T @ output gradient, one matmul) or ``swap``
    (a forward convolution with batch and channels swapped: input [C, H, W, B] (x) kernel
    [Ho, Wo, B, O], kernel-dilated by the stride).

All compute the same values up to float rounding. `Conv` is `flax.linen.Conv` with the
convolution function swapped, so parameter names and shapes (and checkpoints, masks) do not
change. ``conv_impl``: ``"xla"`` (XLA's own everywhere), ``"custom"`` (fixed: XLA forward, input
gradient as a forward convolution, weight gradient by im2col), ``"auto"`` (per shape: each
candidate timed once, jitted, median of a few runs, the choice cached in memory and in
``conv_plans.json`` in the data cache directory, keyed by shape, jax version, backend, device
kind, usable CPU count and XLA_FLAGS). On GPU/TPU ``"auto"`` always means XLA's own.

``"onednn"`` runs all three parts with oneDNN's kernels (`salun_jax.models.onednn`: XLA FFI
custom calls on the same NHWC/HWIO layouts, float32; other dtypes keep XLA's), where oneDNN is
installed (`pip install -e ".[onednn]"`); "auto" then times oneDNN's parts among the candidates
too. ResNet-18 x0.25, batch 128, the 2-core Intel machine (README, "Measured here"): the train
step ran 1.6-1.7x faster than "xla"; against PyTorch's NCHW step in the same run, 0.94-1.05x on
2 cores and 1.13-1.17x on one.

On the CPU backend "xla", "custom" and "auto" pass each convolution's input through
`materialize` (an identity XLA cannot fuse into its consumers; see there), so the weight
gradients' layout transposes read one buffer instead of recomputing BatchNorm, ReLU and the
residual chain. ``"plain"`` is
``"xla"`` without it: `lax.conv_general_dilated` untouched, for comparison. Results agree to
float rounding: the gradients were bit-identical in every check without augmentation; with the
crop + flip augmentation fused in, one ResNet-18 x0.25 step differed slightly, each no further
from a float64 run of the step than float32 itself is (median relative error of the update 3.6e-4
materialised, 1.7e-3 "plain"; 6.5e-4 for both without augmentation).

The default is ``"xla"`` (or $SALUN_JAX_CONV_IMPL). ResNet-18 x0.25, batch 128, jax 0.10.2, the
2-core machine, quiet (experiments/bench_train.py): "xla" ran the train step 1.07x faster than
"plain" on one core and whole CIFAR-10 epochs 1.18x faster on both; "auto" gave 1.07x "xla",
within the run-to-run noise of about 5% (earlier, under heavy load: 1.08x on one core and 0.83x
on two; "custom" 0.77x).

Which library runs XLA:CPU's convolutions is a compiler option of the whole program, not of a
layer: `compiler_options()` keeps YNNPACK (XLA:CPU's default for convolutions with more than 16
channels) off them, so XLA's own Eigen kernels run them, and `salun_jax.loop` compiles every step
with it ($SALUN_JAX_YNN_CONVOLUTIONS=1 restores XLA's default).

References: the convolution-gradient identities of Dumoulin & Visin 2016 ("A guide to
convolution arithmetic"), section 4 (transposed convolution as a direct convolution).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from salun_jax.models import onednn

ConvImpl = Literal["xla", "custom", "auto", "plain", "onednn"]
CONV_IMPLS = ("xla", "custom", "auto", "plain", "onednn")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_PLAN_FILE = "conv_plans.json"
_PLAN_FORMAT_VERSION = 1
# "auto" keeps XLA's own formulation unless a candidate is at least this much faster: timings on
# a shared machine wobble by several percent, and XLA's is the reference.
_MIN_GAIN = 0.05

Padding = tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """How one convolution's forward, input gradient and weight gradient are computed."""

    forward: Literal["xla", "im2col", "onednn"] = "xla"
    input_grad: Literal["xla", "conv", "onednn"] = "xla"
    weight_grad: Literal["xla", "im2col", "swap", "onednn"] = "xla"

    def __str__(self) -> str:
        return f"{self.forward}/{self.input_grad}/{self.weight_grad}"


XLA_PLAN = ConvPlan()
CUSTOM_PLAN = ConvPlan("xla", "conv", "im2col")
ONEDNN_PLAN = ConvPlan("onednn", "onednn", "onednn")
PLAN_PARTS = ("forward", "input_grad", "weight_grad")
# "onednn" candidates are timed only where `onednn.available()` (see `_onednn_usable`).
FORWARD_CANDIDATES = ("xla", "im2col", "onednn")
INPUT_GRAD_CANDIDATES = ("xla", "conv", "onednn")
WEIGHT_GRAD_CANDIDATES = ("xla", "im2col", "swap", "onednn")


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """What a plan is chosen for: input [B, H, W, C] (x) kernel [kh, kw, C, O], strides, padding."""

    input_shape: tuple[int, int, int, int]
    kernel_shape: tuple[int, int, int, int]
    strides: tuple[int, int]
    padding: Padding
    dtype: str

    def key(self) -> str:
        b, h, w, c = self.input_shape
        kh, kw, _, o = self.kernel_shape
        (pt, pb), (pl, pr) = self.padding
        return (
            f"{b}x{h}x{w}x{c}-k{kh}x{kw}-o{o}-s{self.strides[0]}x{self.strides[1]}"
            f"-p{pt},{pb},{pl},{pr}-{self.dtype}"
        )


# 1. The formulations. x: [B, H, W, C], kernel: [kh, kw, C, O], g (output gradient): [B, Ho, Wo, O].


def _output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _forward_xla(x, kernel, strides, padding):
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS
    )


def _patches(x, kernel_size, strides, padding) -> jax.Array:
    """im2col: [B, Ho, Wo, kh * kw * C], ordered (kh, kw, C) like the HWIO kernel's rows."""
    (kh, kw), (sh, sw) = kernel_size, strides
    ho = _output_size(x.shape[1], kh, sh, padding[0])
    wo = _output_size(x.shape[2], kw, sw, padding[1])
    # lax.pad takes negative padding (cropping), as convolutions do.
    xp = lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0))
    )
    columns = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (xp.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, xp.shape[3]),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)


def _forward_im2col(x, kernel, strides, padding):
    kh, kw, c, o = kernel.shape
    patches = _patches(x, (kh, kw), strides, padding)
    return jnp.dot(patches, kernel.reshape(kh * kw * c, o))


def _input_grad_xla(g, kernel, x_shape, strides, padding):
    x_spec = jax.ShapeDtypeStruct(x_shape, g.dtype)
    (dx,) = jax.linear_transpose(lambda x: _forward_xla(x, kernel, strides, padding), x_spec)(g)
    return dx


def _input_grad_conv(g, kernel, x_shape, strides, padding):
    """dx = g zero-interleaved by the stride, padded, (x) the flipped kernel with I/O swapped."""
    kh, kw = kernel.shape[:2]
    pads = [(0, 0, 0)]
    for size, k, s, (low, _), out in zip(
        x_shape[1:3], (kh, kw), strides, padding, g.shape[1:3], strict=True
    ):
        dilated = (out - 1) * s + 1
        front = k - 1 - low
        pads.append((front, size + k - 1 - dilated - front, s - 1))
    pads.append((0, 0, 0))
    g_padded = lax.pad(g, jnp.zeros((), g.dtype), pads)
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)  # [kh, kw, O, C]
    return lax.conv_general_dilated(
        g_padded, flipped, (1, 1), "VALID", dimension_numbers=_DIMENSION_NUMBERS
    )


def _weight_grad_xla(x, g, kernel_shape, strides, padding):
    w_spec = jax.ShapeDtypeStruct(kernel_shape, g.dtype)
    (dw,) = jax.linear_transpose(lambda w: _forward_xla(x, w, strides, padding), w_spec)(g)
    return dw


def _weight_grad_im2col(x, g, kernel_shape, strides, padding):
    kh, kw, c, o = kernel_shape
    patches = _patches(x, (kh, kw), strides, padding)
    dw = lax.dot_general(
        patches.reshape(-1, kh * kw * c), g.reshape(-1, o), (((0,), (0,)), ((), ()))
    )
    return dw.reshape(kernel_shape)


def _weight_grad_swap(x, g, kernel_shape, strides, padding):
    """dw[i, j, c, o] = sum_{b, p, q} xpad[b, s p + i, s q + j, c] g[b, p, q, o]: a forward
    convolution of xpad as [C, H, W, B] images with g as a [Ho, Wo, B, O] kernel dilated by s."""
    kh, kw = kernel_shape[:2]
    ho, wo = g.shape[1:3]
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    # Pad, then crop to exactly the rows/columns the windows touch.
    hi_h = (ho - 1) * sh + kh - x.shape[1] - pt
    hi_w = (wo - 1) * sw + kw - x.shape[2] - pl
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, hi_h, 0), (pl, hi_w, 0), (0, 0, 0)))
    dw = lax.conv_general_dilated(
        jnp.transpose(xp, (3, 1, 2, 0)),  # [C, Hp, Wp, B]
        jnp.transpose(g, (1, 2, 0, 3)),  # [Ho, Wo, B, O]
        (1, 1),
        "VALID",
        rhs_dilation=strides,
        dimension_numbers=_DIMENSION_NUMBERS,
    )  # [C, kh, kw, O]
    return jnp.transpose(dw, (1, 2, 0, 3))


_FORWARDS = {"xla": _forward_xla, "im2col": _forward_im2col, "onednn": onednn.forward}
_INPUT_GRADS = {"xla": _input_grad_xla, "conv": _input_grad_conv, "onednn": onednn.input_grad}
_WEIGHT_GRADS = {
    "xla": _weight_grad_xla,
    "im2col": _weight_grad_im2col,
    "swap": _weight_grad_swap,
    "onednn": onednn.weight_grad,
}


def _onednn_usable(shape: ConvShape) -> bool:
    """oneDNN's handlers take float32 and non-negative padding (cropping goes to XLA)."""
    pads_ok = all(p >= 0 for pair in shape.padding for p in pair)
    return shape.dtype == "float32" and pads_ok and onednn.available()


def _candidates(table: dict, shape: ConvShape) -> list[str]:
    return [name for name in table if name != "onednn" or _onednn_usable(shape)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_with_plan(x, kernel, strides, padding, plan):
    return _FORWARDS[plan.forward](x, kernel, strides, padding)


def _conv_with_plan_fwd(x, kernel, strides, padding, plan):
    return _conv_with_plan(x, kernel, strides, padding, plan), (x, kernel)


def _conv_with_plan_bwd(strides, padding, plan, residuals, g):
    x, kernel = residuals
    dx = _INPUT_GRADS[plan.input_grad](g, kernel, x.shape, strides, padding)
    dw = _WEIGHT_GRADS[plan.weight_grad](x, g, kernel.shape, strides, padding)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv_with_plan.defvjp(_conv_with_plan_fwd, _conv_with_plan_bwd)


def _shape_of(x, kernel, strides, padding) -> ConvShape:
    return ConvShape(tuple(x.shape), tuple(kernel.shape), strides, padding, jnp.dtype(x.dtype).name)


# "auto": the plan is chosen only where a gradient is taken (the custom_vjp's forward rule), so
# initialisation and evaluation never time anything; the backward rule looks it up again (memory).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_auto(x, kernel, strides, padding):
    return _forward_xla(x, kernel, strides, padding)


def _conv_auto_fwd(x, kernel, strides, padding):
    plan = choose_plan(_shape_of(x, kernel, strides, padding))
    return _FORWARDS[plan.forward](x, kernel, strides, padding), (x, kernel)


def _conv_auto_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    plan = choose_plan(_shape_of(x, kernel, strides, padding))
    return _conv_with_plan_bwd(strides, padding, plan, residuals, g)


_conv_auto.defvjp(_conv_auto_fwd, _conv_auto_bwd)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Padding,
    plan: ConvPlan | Literal["auto"] = XLA_PLAN,
) -> jax.Array:
    """NHWC x [B, H, W, C] (x) HWIO kernel [kh, kw, C, O] -> [B, Ho, Wo, O] with `plan`'s
    gradients ("auto": `choose_plan`'s for this shape, chosen when a gradient is first traced).
    The XLA plan is `lax.conv_general_dilated` itself (all of JAX's transforms); other plans are
    a `jax.custom_vjp` (reverse mode only)."""
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if plan == XLA_PLAN:
        return _forward_xla(x, kernel, strides, padding)
    if plan == "auto":
        return _conv_auto(x, kernel, strides, padding)
    return _conv_with_plan(x, kernel, strides, padding, plan)


# 2. The per-shape chooser.


def time_candidates(shape: ConvShape, repeats: int = 7) -> dict[str, dict[str, float]]:
    """Median seconds of every candidate of each part (forward, input grad, weight grad), each
    jitted alone on random inputs of `shape`; the candidates run in turn within each of the
    `repeats` rounds, so a change in the machine's load hits them alike. Call outside any trace
    (or under `jax.ensure_compile_time_eval`)."""
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(shape.dtype)
    kh, kw = shape.kernel_shape[:2]
    b, h, w, _ = shape.input_shape
    out_shape = (
        b,
        _output_size(h, kh, shape.strides[0], shape.padding[0]),
        _output_size(w, kw, shape.strides[1], shape.padding[1]),
        shape.kernel_shape[3],
    )
    x = jnp.asarray(rng.standard_normal(shape.input_shape), dtype)
    kernel = jnp.asarray(rng.standard_normal(shape.kernel_shape), dtype)
    g = jnp.asarray(rng.standard_normal(out_shape), dtype)
    s, p = shape.strides, shape.padding
    calls = {}
    for name in _candidates(_FORWARDS, shape):
        fn = _FORWARDS[name]
        calls["forward", name] = (jit(lambda x, k, fn=fn: fn(x, k, s, p)), (x, kernel))
    for name in _candidates(_INPUT_GRADS, shape):
        fn = _INPUT_GRADS[name]
        calls["input_grad", name] = (
            jit(lambda g, k, fn=fn: fn(g, k, shape.input_shape, s, p)),
            (g, kernel),
        )
    for name in _candidates(_WEIGHT_GRADS, shape):
        fn = _WEIGHT_GRADS[name]
        calls["weight_grad", name] = (
            jit(lambda x, g, fn=fn: fn(x, g, shape.kernel_shape, s, p)),
            (x, g),
        )
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    samples = {key: [] for key in calls}
    for _ in range(repeats):
        for key, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[key].append(time.perf_counter() - start)
    times: dict[str, dict[str, float]] = {"forward": {}, "input_grad": {}, "weight_grad": {}}
    for (part, name), seconds in samples.items():
        times[part][name] = statistics.median(seconds)
    return times


def plan_from_times(times: dict[str, dict[str, float]], min_gain: float = _MIN_GAIN) -> ConvPlan:
    """Per part, the fastest candidate if it beats XLA's by `min_gain` (a fraction), else XLA's."""

    def pick(part: str) -> str:
        best = min(times[part], key=times[part].get)
        return best if times[part][best] < (1.0 - min_gain) * times[part]["xla"] else "xla"

    return ConvPlan(pick("forward"), pick("input_grad"), pick("weight_grad"))


def _environment_key() -> str:
    device = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "").strip()
    # The CPUs this process may use (taskset, cgroups): one core and two choose differently.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    options = ",".join(f"{k}={v}" for k, v in sorted(compiler_options().items()))
    # Plans made with oneDNN among the candidates differ from those made without it.
    library = onednn.version() if onednn.available() else "none"
    return (
        f"jax{jax.__version__}|{jax.default_backend()}|{device.device_kind}|cpus={cpus}"
        f"|flags={flags}|options={options}|onednn={library}"
    )


class PlanCache:
    """Plans by shape: in memory, and as JSON in `directory` (None: in memory only).

    The file maps "<environment>||<shape key>" to {"plan": [fwd, dx, dw], "times": {...}}; it is
    rewritten atomically (merged with what another process may have added meanwhile).
    """

    def __init__(self, directory: str | None):
        self.path = None if directory is None else os.path.join(directory, _PLAN_FILE)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._entries.update(self._read())

    def _read(self) -> dict[str, dict]:
        if self.path is None or not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as f:
                contents = json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}  # a damaged cache is re-measured, not fatal
        if contents.get("format") != _PLAN_FORMAT_VERSION:
            return {}
        return dict(contents.get("entries", {}))

    def _write(self) -> None:
        if self.path is None:
            return
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        entries = {**self._read(), **self._entries}
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".conv_plans-", suffix=".json")
        with os.fdopen(handle, "w") as f:
            json.dump(
                {"format": _PLAN_FORMAT_VERSION, "entries": entries}, f, indent=1, sort_keys=True
            )
        os.replace(temporary, self.path)

    @staticmethod
    def _key(shape: ConvShape) -> str:
        return f"{_environment_key()}||{shape.key()}"

    def get(self, shape: ConvShape) -> ConvPlan | None:
        entry = self._entries.get(self._key(shape))
        return None if entry is None else ConvPlan(*entry["plan"])

    def times(self, shape: ConvShape) -> dict | None:
        entry = self._entries.get(self._key(shape))
        return None if entry is None else entry.get("times")

    def put(self, shape: ConvShape, plan: ConvPlan, times: dict | None = None) -> None:
        with self._lock:
            self._entries[self._key(shape)] = {
                "plan": [plan.forward, plan.input_grad, plan.weight_grad],
                "times": times,
            }
            self._write()


_CACHES: dict[str | None, PlanCache] = {}


def plan_cache(directory: str | None = "") -> PlanCache:
    """The process-wide cache for `directory` ("": the data cache directory, see
    `salun_jax.cache_paths.resolve_cache_dir`; None: memory only)."""
    if directory == "":
        from salun_jax.cache_paths import resolve_cache_dir  # noqa: PLC0415

        directory = resolve_cache_dir()
    if directory not in _CACHES:
        _CACHES[directory] = PlanCache(directory)
    return _CACHES[directory]


def choose_plan(shape: ConvShape, cache: PlanCache | None = None, repeats: int = 7) -> ConvPlan:
    """The plan for `shape`: XLA's off CPU; else the cached one, timing the candidates once."""
    if jax.default_backend() != "cpu":
        return XLA_PLAN
    cache = plan_cache() if cache is None else cache
    plan = cache.get(shape)
    if plan is None:
        # Runs eagerly even while a train step is being traced (that is where shapes are known).
        with jax.ensure_compile_time_eval():
            times = time_candidates(shape, repeats)
        plan = plan_from_times(times)
        cache.put(shape, plan, times)
    return plan


# 3. One buffer per convolution input on XLA:CPU.


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


# 4. The flax drop-in.

CONV_IMPL_ENV_VAR = "SALUN_JAX_CONV_IMPL"
_DEFAULT_CONV_IMPL: ConvImpl = "xla"


def default_conv_impl(impl: ConvImpl | None = None) -> ConvImpl:
    """`impl` if given, else $SALUN_JAX_CONV_IMPL, else the measured default (see the module
    docstring). Raises ValueError for an unknown name."""
    if impl is None:
        impl = os.environ.get(CONV_IMPL_ENV_VAR) or _DEFAULT_CONV_IMPL
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return impl


def _canonical_padding(padding, x_shape, kernel_shape, strides) -> Padding:
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _supported(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
    def trivial(dilation):
        return dilation is None or all(d == 1 for d in dilation)

    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (
        lhs.ndim == 4
        and feature_group_count == 1
        and trivial(lhs_dilation)
        and trivial(rhs_dilation)
        and given == nhwc
    )


@functools.cache
def make_conv_general_dilated(impl: ConvImpl):
    """A `lax.conv_general_dilated` stand-in for `flax.linen.Conv` that applies `impl`'s plan.
    Cases it does not cover (grouped, dilated, non-2-D) go to `lax.conv_general_dilated`."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")

    def conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
    ):
        on_cpu = jax.default_backend() == "cpu"
        if impl not in ("plain", "onednn") and on_cpu:
            lhs = materialize(lhs)  # a custom call's operands are buffers already
        if (
            impl in ("xla", "plain")
            or batch_group_count != 1
            or precision is not None
            or preferred_element_type is not None
            or not _supported(
                lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
            )
        ):
            return lax.conv_general_dilated(
                lhs,
                rhs,
                window_strides,
                padding,
                lhs_dilation,
                rhs_dilation,
                dimension_numbers,
                feature_group_count,
                batch_group_count,
                precision,
                preferred_element_type,
            )
        strides = tuple(int(s) for s in window_strides)
        pads = _canonical_padding(padding, lhs.shape, rhs.shape, strides)
        if not on_cpu:
            plan = XLA_PLAN
        elif impl == "onednn":
            if not onednn.available():
                reason = onednn.unavailable_reason()
                raise RuntimeError(f"conv_impl='onednn' cannot run here: {reason}")
            usable = _onednn_usable(_shape_of(lhs, rhs, strides, pads))
            plan = ONEDNN_PLAN if usable else XLA_PLAN
        else:
            plan = CUSTOM_PLAN if impl == "custom" else "auto"
        return conv2d(lhs, rhs, strides, pads, plan)

    return conv_general_dilated


class Conv(nn.Conv):
    """`flax.linen.Conv` (same parameters: `kernel` [kh, kw, C, O], optional `bias` [O]) whose
    convolution follows `conv_impl` (one of `CONV_IMPLS`; see the module docstring).

    Raises:
      RuntimeError: at trace time, for conv_impl="onednn" on the CPU backend without oneDNN
        (on a convolution it would run; grouped or dilated ones keep XLA's either way).
    """

    conv_impl: ConvImpl = "xla"

    def __post_init__(self):
        if self.conv_general_dilated is None and self.conv_general_dilated_cls is None:
            object.__setattr__(
                self, "conv_general_dilated", make_conv_general_dilated(self.conv_impl)
            )
        super().__post_init__()


def conv_layer_shapes(model: nn.Module, x: jax.Array) -> list[tuple[str, ConvShape]]:
    """(module path, ConvShape) of every 2-D `nn.Conv` (or `Conv`) call of `model.init(key, x)`,
    found by abstract evaluation (nothing is computed)."""
    found = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Conv) and context.method_name == "__call__":
            inputs = args[0]
            kernel_size = tuple(module.kernel_size)
            if inputs.ndim == 4 and len(kernel_size) == 2:
                strides = module.strides or 1
                strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
                kernel_shape = (*kernel_size, inputs.shape[-1], module.features)
                padding = nn.linear.canonicalize_padding(module.padding, 2)
                shape = ConvShape(
                    tuple(inputs.shape),
                    kernel_shape,
                    strides,
                    _canonical_padding(padding, inputs.shape, kernel_shape, strides),
                    jnp.dtype(inputs.dtype).name,
                )
                found.append(("/".join(module.path), shape))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), x)
    return found


# 5. Which library runs XLA:CPU's convolutions.

# XLA:CPU (jax 0.10) gives convolutions with more than 16 channels, reductions and dots to
# YNNPACK by default. These options keep YNNPACK off the convolutions (XLA's own Eigen kernels
# run them) and on dots and reductions.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_EIGEN_CONVOLUTIONS = {
    _YNN_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
YNN_CONVOLUTIONS_ENV_VAR = "SALUN_JAX_YNN_CONVOLUTIONS"


@functools.cache
def _option_known(name: str, value: str) -> bool:
    try:
        jax.jit(lambda x: x + 1).lower(np.zeros(2, np.float32)).compile(
            compiler_options={name: value}
        )
    except jax.errors.JaxRuntimeError:  # an XLA without this option (or value)
        return False
    return True


def compiler_options() -> dict[str, str]:
    """XLA compiler options for programs with convolutions: on the CPU backend, keep YNNPACK off
    the convolutions; {} on GPU/TPU, where $SALUN_JAX_YNN_CONVOLUTIONS=1 (XLA's default), where
    XLA_FLAGS sets the option itself, or where this XLA does not know it.

    Why: YNNPACK's 32- and 64-channel convolutions do not get faster with a second core, Eigen's
    do. The ResNet-18 x0.25 train step (batch 128, jax 0.10.2) ran 1.26x faster on 2 cores and
    1.22x on one (Intel Sapphire Rapids), 1.14x on 2 and 0.98x on one (AMD EPYC); see the
    README's measurements. Results change by float rounding only."""
    if (
        jax.default_backend() != "cpu"
        or os.environ.get(YNN_CONVOLUTIONS_ENV_VAR, "0") == "1"
        or _YNN_OPTION in os.environ.get("XLA_FLAGS", "")
    ):
        return {}
    if not all(_option_known(name, value) for name, value in _EIGEN_CONVOLUTIONS.items()):
        return {}
    return dict(_EIGEN_CONVOLUTIONS)


def jit(fun: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options()`, which are read at the
    first call (the backend must not start at import: `jax.distributed` initialises before it),
    so it can decorate module-level functions. Called inside another trace (a nested jit, which
    may not carry compiler options) it is a plain `jax.jit`. `.lower` lowers the top-level one."""
    jitted = None
    nested = jax.jit(fun, **jit_kwargs)

    def get():
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fun, compiler_options=compiler_options() or None, **jit_kwargs)
        return jitted

    @functools.wraps(fun)
    def call(*args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return nested(*args, **kwargs)
        return get()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: get().lower(*args, **kwargs)
    return call
