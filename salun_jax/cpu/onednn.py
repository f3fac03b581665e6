"""oneDNN's convolutions on XLA:CPU, through the XLA FFI: `Conv` (`enable(conv="onednn")`).

XLA:CPU runs convolutions with its own Eigen kernels (or YNNPACK's); neither has the blocked,
JIT-generated kernels of oneDNN, which PyTorch uses on CPU. `onednn_conv.cc` (beside this file)
wraps oneDNN's forward, backward-data and backward-weights convolutions as three XLA FFI
handlers on JAX's own layouts (NHWC activations, HWIO kernels, float32). `load()` compiles it
with the C++ compiler ($CXX, else c++) into the cache directory, once per source, jaxlib, oneDNN
and compiler (a few seconds; `python -m salun_jax.cpu.onednn` does it at install time), loads it
and registers the handlers. Nothing here runs unless asked: `salun_jax.cpu.enable(conv="onednn")`,
this module's `load()`, or tracing its `Conv`.

ResNet-18 x0.25, batch 128, 2 cores (docs/benchmarks.md, section 4.5): the train step 1.6-1.7x
faster than XLA's convolutions, 0.94-1.05x PyTorch's NCHW step in the same run.

What it needs: oneDNN 3.x with its headers, `pip install -e ".[cpu-onednn]"` (the
onednn-devel-cpu-gomp wheel, oneDNN 3.2 on GNU OpenMP), or $SALUN_JAX_ONEDNN_ROOT naming a
prefix with include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so*; and a C++17 compiler.

Limits: float32 only (other dtypes keep XLA's convolutions), first-order gradients (a custom
VJP), under `vmap` (populations) the members' convolutions run one after another; oneDNN runs
its own OpenMP threads inside each call ($OMP_NUM_THREADS, default: all cores). Values equal
XLA's to float rounding (a different summation order); tests/test_onednn.py checks each part
against `lax.conv_general_dilated`'s forward and autodiff on odd shapes, strides and paddings.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from salun_jax.cache_paths import resolve_cache_dir

ROOT_ENV_VAR = "SALUN_JAX_ONEDNN_ROOT"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
_TARGETS = ("forward", "input_grad", "weight_grad")
_TARGET_PREFIX = "salun_onednn_conv_"
_NHWC = ("NHWC", "HWIO", "NHWC")
# Wheels that ship oneDNN's headers and library into the environment's prefix.
_DISTRIBUTIONS = ("onednn-devel-cpu-gomp", "onednn-cpu-gomp")
_lock = threading.Lock()


def _prefixes() -> list[str]:
    """Where to look for include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so*, in order: $ROOT, the
    prefix the oneDNN wheels installed into (from their file lists), this environment's."""
    prefixes = [os.environ[ROOT_ENV_VAR]] if os.environ.get(ROOT_ENV_VAR) else []
    for name in _DISTRIBUTIONS:
        try:
            files = importlib.metadata.files(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            path = pathlib.Path(file.locate()).resolve()
            if path.name == "libdnnl.so":  # <prefix>/lib/libdnnl.so
                prefixes.append(str(path.parents[1]))
            elif path.name == "dnnl.hpp" and path.parent.name == "dnnl":  # <prefix>/include/...
                prefixes.append(str(path.parents[3]))
    prefixes.append(sys.prefix)
    return list(dict.fromkeys(prefixes))


def _find_onednn() -> tuple[str, str]:
    """(include directory, library file) of oneDNN, or raises FileNotFoundError."""
    for prefix in _prefixes():
        header = os.path.join(prefix, "include", "oneapi", "dnnl", "dnnl.hpp")
        libraries = sorted(glob.glob(os.path.join(prefix, "lib", "libdnnl.so*")))
        if os.path.exists(header) and libraries:
            return os.path.join(prefix, "include"), libraries[0]
    raise FileNotFoundError(
        "oneDNN not found (looked in: " + ", ".join(_prefixes()) + "); install it with "
        'pip install -e ".[cpu-onednn]" or set $' + ROOT_ENV_VAR
    )


def _compiler() -> str:
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C++ compiler: {compiler!r} is not on PATH (set $CXX)")
    return compiler


def _build(cache_dir: str) -> str:
    """Compiles onednn_conv.cc (once per source, jaxlib, oneDNN and compiler); the .so's path."""
    include, library = _find_onednn()
    compiler = _compiler()
    with open(_SOURCE, "rb") as f:
        source = f.read()
    jaxlib_version = importlib.metadata.version("jaxlib")
    stat = os.stat(library)
    identity = f"{jaxlib_version}|{include}|{library}|{stat.st_size}|{stat.st_mtime_ns}|{compiler}"
    digest = hashlib.sha256(source + identity.encode()).hexdigest()[:16]
    directory = os.path.join(cache_dir, "onednn", digest)
    output = os.path.join(directory, "libsalun_onednn.so")
    if os.path.exists(output):
        return output
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
    os.close(handle)
    command = [
        compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w",
        _SOURCE, "-I", jax.ffi.include_dir(), "-I", include, library,
        "-Wl,-rpath," + os.path.dirname(library), "-o", temporary,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        os.unlink(temporary)
        raise RuntimeError(
            f"compiling {_SOURCE} failed ({' '.join(command)}):\n{result.stderr[-4000:]}"
        )
    os.replace(temporary, output)  # atomic: concurrent builders (test workers) agree
    return output


_loaded: tuple[bool, str] | None = None


def _load() -> tuple[bool, str]:
    """Builds, loads and registers the handlers once per process: (ok, reason if not)."""
    global _loaded
    with _lock:  # one build and one registration, whichever thread asks first
        if _loaded is None:
            _loaded = _build_and_register()
    return _loaded


def _build_and_register() -> tuple[bool, str]:
    import ctypes  # noqa: PLC0415 (only here)

    try:
        library = ctypes.CDLL(_build(resolve_cache_dir()))
    except (OSError, RuntimeError) as error:  # FileNotFoundError is an OSError
        return False, str(error)
    for name in _TARGETS:
        symbol = getattr(library, _TARGET_PREFIX + name)
        jax.ffi.register_ffi_target(
            _TARGET_PREFIX + name, jax.ffi.pycapsule(symbol), platform="cpu"
        )
    return True, ""


def available() -> bool:
    """Whether oneDNN convolutions can run here: the CPU backend, oneDNN and a compiler found,
    and the handlers built (the first call builds them, then they are cached on disk)."""
    return jax.default_backend() == "cpu" and _load()[0]


def unavailable_reason() -> str:
    """Why `available()` is False ("" if it is True)."""
    if jax.default_backend() != "cpu":
        return f"oneDNN convolutions run on the CPU backend only (this is {jax.default_backend()})"
    return _load()[1]


def load() -> None:
    """Builds (once, cached on disk), loads and registers the handlers, without starting JAX's
    backend (a multi-process run initialises `jax.distributed` after the scripts' setup).

    Raises:
      RuntimeError: oneDNN convolutions cannot run here; the message says what is missing.
    """
    ok, reason = _load()
    if not ok:
        raise RuntimeError(f"oneDNN convolutions cannot run here: {reason}")


def _call(name, result_shape, a, b, strides, padding):
    if not available():  # builds and registers the handlers on first use
        raise RuntimeError(f"oneDNN convolutions cannot run here: {unavailable_reason()}")
    (top, bottom), (left, right) = padding
    return jax.ffi.ffi_call(
        _TARGET_PREFIX + name,
        jax.ShapeDtypeStruct(result_shape, jnp.float32),
        vmap_method="sequential",  # a vmapped model (populations) runs one member at a time
    )(
        a, b,
        stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_top=np.int64(top), pad_bottom=np.int64(bottom),
        pad_left=np.int64(left), pad_right=np.int64(right),
    )  # fmt: skip


def forward(x, kernel, strides, padding):
    """x [B, H, W, C] (x) kernel [kh, kw, C, O] -> [B, Ho, Wo, O], float32."""
    out = jax.eval_shape(  # XLA's own shape rule for the same convolution
        lambda x, kernel: lax.conv_general_dilated(
            x, kernel, strides, padding, dimension_numbers=_NHWC
        ),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
    )
    return _call("forward", out.shape, x, kernel, strides, padding)


def input_grad(g, kernel, x_shape, strides, padding):
    """The gradient w.r.t. the input [B, H, W, C] of <g, forward(x, kernel)>."""
    return _call("input_grad", tuple(x_shape), g, kernel, strides, padding)


def weight_grad(x, g, kernel_shape, strides, padding):
    """The gradient w.r.t. the kernel [kh, kw, C, O] of <g, forward(x, kernel)>."""
    return _call("weight_grad", tuple(kernel_shape), x, g, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides, padding):
    """NHWC x [B, H, W, C] (x) HWIO kernel [kh, kw, C, O] -> [B, Ho, Wo, O], all three parts
    by oneDNN (reverse mode only). `strides`: (sh, sw); `padding`: ((top, bottom), (left,
    right)), non-negative."""
    return forward(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return forward(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    dx = input_grad(g, kernel, x.shape, strides, padding)
    dw = weight_grad(x, g, kernel.shape, strides, padding)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _is_plain_2d(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
    """Whether a convolution is one oneDNN's handlers take: 2-D, NHWC/HWIO, float32, ungrouped,
    undilated."""

    def trivial(dilation):
        return dilation is None or all(d == 1 for d in dilation)

    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (
        lhs.ndim == 4
        and lhs.dtype == jnp.float32
        and rhs.dtype == jnp.float32
        and feature_group_count == 1
        and trivial(lhs_dilation)
        and trivial(rhs_dilation)
        and given == nhwc
    )


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
    """`lax.conv_general_dilated` run by oneDNN on the CPU backend where its handlers take the
    convolution (see `_is_plain_2d`; padding non-negative), else XLA's."""
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    if (
        jax.default_backend() != "cpu"
        or batch_group_count != 1
        or precision is not None
        or preferred_element_type is not None
        or not _is_plain_2d(
            lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
        )
    ):
        return lax.conv_general_dilated(
            lhs, rhs, *args, feature_group_count, batch_group_count, precision,
            preferred_element_type,
        )  # fmt: skip
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(low), int(high)) for low, high in padding)
    if any(p < 0 for pair in pads for p in pair):  # cropping: XLA's
        return lax.conv_general_dilated(lhs, rhs, strides, pads, dimension_numbers=_NHWC)
    return conv2d(lhs, rhs, strides, pads)


class Conv(nn.Conv):
    """`flax.linen.Conv` run by oneDNN (`conv_general_dilated`): the same parameters, names
    (`Conv_0`, ...) and model repr as `nn.Conv`, so checkpoints, masks and the pipelines'
    fingerprints do not depend on it. Traced on the CPU backend, it builds the handlers if
    `load()` has not (and raises RuntimeError where oneDNN cannot run)."""

    def __post_init__(self):
        if self.conv_general_dilated is None and self.conv_general_dilated_cls is None:
            object.__setattr__(self, "conv_general_dilated", conv_general_dilated)
        super().__post_init__()


if __name__ == "__main__":  # python -m salun_jax.cpu.onednn: build the handlers now
    load()
    print(f"oneDNN convolutions built: {_build(resolve_cache_dir())}")
