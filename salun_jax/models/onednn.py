"""oneDNN's convolutions on XLA:CPU, through the XLA FFI (`conv_impl="onednn"`).

XLA:CPU runs convolutions with its own Eigen kernels (or YNNPACK's); neither has the blocked,
JIT-generated kernels of oneDNN, which PyTorch uses on CPU. `onednn_conv.cc` (beside this file)
wraps oneDNN's forward, backward-data and backward-weights convolutions as three XLA FFI
handlers on JAX's own layouts (NHWC activations, HWIO kernels, float32). This module compiles it
once per environment with the C++ compiler, into the data cache directory, loads it and
registers the handlers; `forward`, `input_grad` and `weight_grad` call them from traced code.

What it needs: oneDNN 3.x with its headers, e.g. `pip install -e ".[onednn]"` (the
onednn-devel-cpu-gomp wheel, oneDNN 3.2 on GNU OpenMP), or $SALUN_JAX_ONEDNN_ROOT naming a
prefix with include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so*; and a C++17 compiler ($CXX, else
c++). `available()` says whether all of it is there; `unavailable_reason()` says what is not.

oneDNN runs its own OpenMP threads inside each call ($OMP_NUM_THREADS, default: all cores).
Values equal XLA's to float rounding (a different summation order); tests/test_onednn.py checks
each part against `lax.conv_general_dilated`'s forward and autodiff on odd shapes, strides and
paddings.
"""

from __future__ import annotations

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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT_ENV_VAR = "SALUN_JAX_ONEDNN_ROOT"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
_TARGETS = ("forward", "input_grad", "weight_grad")
_TARGET_PREFIX = "salun_onednn_conv_"
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
        'pip install -e ".[onednn]" or set $' + ROOT_ENV_VAR
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

    from salun_jax.cache_paths import resolve_cache_dir  # noqa: PLC0415

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
    and the handlers built (the first call builds them, a few seconds, then cached on disk)."""
    return jax.default_backend() == "cpu" and _load()[0]


def unavailable_reason() -> str:
    """Why `available()` is False ("" if it is True)."""
    if jax.default_backend() != "cpu":
        return f"oneDNN convolutions run on the CPU backend only (this is {jax.default_backend()})"
    return _load()[1]


def version() -> str:
    """The oneDNN library file used, links resolved (e.g. "libdnnl.so.3.2"; "" if none), for
    cache keys."""
    try:
        return os.path.basename(os.path.realpath(_find_onednn()[1]))
    except FileNotFoundError:
        return ""


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
            x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
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
