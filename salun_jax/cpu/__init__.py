"""The CPU wing: process-wide options that make training on CPU faster, set by one call.

    import salun_jax.cpu
    salun_jax.cpu.enable(conv="onednn")  # first thing in the process, before any computation

The rest of the library does not import this package: it uses `jax.jit` and the models'
`conv` module (`nn.Conv` by default), and runs the same without it. The experiment scripts call
`enable()` first thing; in Python, call it yourself. It sets, for the whole process:

- glibc's malloc to keep freed host memory (`host_memory`), so XLA:CPU's per-call scratch is
  not paged in again on every call;
- XLA_FLAGS to keep YNNPACK off convolutions (`conv.xla_flag`), so both cores run them;
- the convolution module `salun_jax.models.create_model` builds models with
  (`salun_jax.models.set_default_conv`): `"xla"`, XLA's convolutions with materialised inputs
  (`conv.Conv`), or `"onednn"`, oneDNN's (`onednn.Conv`; needs
  `pip install -e ".[cpu-onednn]"`, and compiles its handlers once, here, with the C++
  compiler).

Each changes float rounding only, not parameters, their names or checkpoints. Measurements:
docs/benchmarks.md, section 4.
"""

from __future__ import annotations

import os
import warnings

CONVS = ("xla", "onednn")
CONV_ENV_VAR = "SALUN_JAX_CONV_IMPL"


def _backend_started() -> bool:
    from jax._src import xla_bridge  # noqa: PLC0415 (no public API says this)

    return xla_bridge.backends_are_initialized()


def enable(
    conv: str | None = None, *, xla_flags: bool = True, keep_host_memory: bool = True
) -> dict:
    """Sets this process's CPU options (see the module docstring). Call it once, before JAX
    starts its backend (the first computation or `jax.devices()`): XLA reads XLA_FLAGS, and
    glibc applies the malloc settings to threads, when they start.

    Args:
      conv: "xla" or "onednn"; None: $SALUN_JAX_CONV_IMPL, else "xla".
      xla_flags: add the XLA_FLAGS entry that keeps YNNPACK off convolutions
        ($SALUN_JAX_YNN_CONVOLUTIONS=1 also opts out).
      keep_host_memory: keep freed host memory ($SALUN_JAX_KEEP_HOST_MEMORY=0 also opts out).

    Returns:
      What was set: {"conv": name, "xla_flag": the XLA_FLAGS entry added or None,
      "host_memory": whether the malloc settings apply}.

    Raises:
      ValueError: an unknown `conv`.
      RuntimeError: conv="onednn" where oneDNN convolutions cannot run (the message says what
        is missing).
    """
    from salun_jax.cpu import host_memory  # noqa: PLC0415

    source = "conv"
    if conv is None:
        conv, source = os.environ.get(CONV_ENV_VAR) or "xla", f"${CONV_ENV_VAR}"
    if conv not in CONVS:
        raise ValueError(f"{source} must be one of {', '.join(CONVS)}, got {conv!r}")
    kept = keep_host_memory and host_memory.keep_freed_host_memory()

    from salun_jax.cpu.conv import xla_flag  # noqa: PLC0415 (jax: after the malloc settings)
    from salun_jax.models import set_default_conv  # noqa: PLC0415

    flag = xla_flag() if xla_flags else None
    if flag is not None and _backend_started():
        warnings.warn(
            f"salun_jax.cpu.enable: JAX's backend is running, so XLA ignores {flag}; call "
            "enable() before the first computation",
            stacklevel=2,
        )
        flag = None
    if flag is not None:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    set_default_conv(conv_module(conv))  # "onednn": builds its handlers now, or says why not
    return {"conv": conv, "xla_flag": flag, "host_memory": kept}


def conv_module(name: str):
    """The flax convolution module of a `CONVS` name (for benchmarks and tests; `enable` sets
    the models' default). "onednn" builds its handlers (see `enable`)."""
    if name == "xla":
        from salun_jax.cpu.conv import Conv  # noqa: PLC0415

        return Conv
    if name == "onednn":
        from salun_jax.cpu import onednn  # noqa: PLC0415

        onednn.load()
        return onednn.Conv
    raise ValueError(f"conv must be one of {', '.join(CONVS)}, got {name!r}")
