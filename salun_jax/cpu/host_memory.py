"""Keep freed host memory in the process, so XLA:CPU does not page in its scratch every call.

XLA:CPU allocates each call's scratch ("temp") buffer with `malloc` and frees it when the call
ends: 232 MB for a ResNet-18 x0.25 train step at batch 128. glibc serves a block that large
with a fresh `mmap` and returns it to the kernel on `free`, so every call faults the whole buffer
in again, a 4 KiB page at a time, and the kernel zeroes each page: on the 2-core machine 56,800
page faults and 0.11-0.12 s of system time per 0.6 s step (jax 0.10.2, one core).

`keep_freed_host_memory` tells glibc to serve every block from one heap (one arena, no `mmap`)
and not to give freed memory back (no trimming), so the second call reuses the first one's
pages: 0 page faults and no system time per step, measured the same way (now and then a call
still grows the heap, when other allocations have split a freed block). The price is that the
process keeps its peak heap until it exits, which a training run reaches anyway, and that all
threads share one arena: on 2 cores XLA compiled the same ResNet step in 5.6-6.3 s instead of
4.7-4.9 s (its compiler threads contend for the lock) while the step ran 1.1x faster. Measured
on the 2-core machine (jax 0.10.2, clean clones): whole CIFAR-10 epochs of ResNet-18 x0.25
(9,000 images, one core) 40.0-40.7 s instead of 46.0-46.5 s, same losses; the digits main job,
compile-bound, 115 s instead of 101 s with an empty compilation cache and 64 s instead of 67 s
with a warm one, same table. Hence on by default for the scripts (training is what they spend
their time on, and the persistent cache removes compiling from reruns); opt out with
$SALUN_JAX_KEEP_HOST_MEMORY=0.

The settings apply to threads created afterwards: call it first thing in a process, before JAX
starts its backend (before the first computation or `jax.devices()`); a later call changes
nothing for the threads XLA has already started. It does nothing where the C library is not
glibc, with $SALUN_JAX_KEEP_HOST_MEMORY=0, or where a GPU/TPU plugin for JAX is installed (its
scratch is device memory, and one arena could slow a host's many loader threads) unless
$JAX_PLATFORMS is "cpu".
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform

# mallopt(3) parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1
ENV_VAR = "SALUN_JAX_KEEP_HOST_MEMORY"


_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _accelerator_plugin_installed() -> bool:
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return any(name.lower().startswith(_ACCELERATOR_PLUGINS) for name in names)


def keep_freed_host_memory() -> bool:
    """Sets glibc's malloc to one arena, no `mmap` and no trimming (see the module docstring).

    Returns:
      True if the settings were applied; False off glibc, when $SALUN_JAX_KEEP_HOST_MEMORY is
      "0", with an accelerator plugin installed and $JAX_PLATFORMS not "cpu", or if glibc
      refused one of them.
    """
    if os.environ.get(ENV_VAR, "1") == "0":
        return False
    if os.environ.get("JAX_PLATFORMS", "").strip() != "cpu" and _accelerator_plugin_installed():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = [
        libc.mallopt(_M_ARENA_MAX, 1),
        libc.mallopt(_M_MMAP_MAX, 0),
        libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX),
    ]
    return all(result == 1 for result in applied)
