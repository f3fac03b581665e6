"""The command line of the experiment scripts: absl flags with one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from salun_jax.pipeline.common import UserError


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """orbax logs every save at INFO through absl; keep its warnings, drop the chatter."""
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def fail(message: str) -> None:
    """Exits with one clear error line (no traceback) for errors a user can fix."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default: `jax_compilation/` in the data
    cache directory), so identical programs (the same step for another seed, a rerun) compile
    once per machine. Returns the directory."""
    import jax

    from salun_jax.data.sources import resolve_cache_dir

    directory = directory or os.path.join(resolve_cache_dir(), "jax_compilation")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def run(main: Callable, config_flag) -> None:
    """`absl.app.run(main)`, but a bad flag or config override (unknown key, missing config file)
    and any `UserError` raised by `main` end with one clear error line instead of a traceback.
    The config is locked after the overrides, so a mistyped key cannot add a setting."""
    from absl import app, flags

    cache_flag = flags.DEFINE_bool(
        "compilation_cache",
        True,
        "Keep compiled programs in the persistent JAX cache "
        "($SALUN_JAX_CACHE or ~/.cache/salun_jax, jax_compilation/): reruns compile nothing.",
    )
    logging.getLogger("absl").addFilter(_quiet_orbax)
    for i, arg in enumerate(sys.argv):  # config_flags prints a traceback for a missing file
        path = (
            arg.split("=", 1)[1]
            if arg.startswith("--config=")
            else (sys.argv[i + 1] if arg == "--config" and i + 1 < len(sys.argv) else None)
        )
        if path is not None and not os.path.exists(path.split(":", 1)[0]):
            fail(f"no config file {path}")
    try:
        remaining = flags.FLAGS(sys.argv)
        config_flag.value.lock()  # config_flags reports a bad config file only when read
    except Exception as error:  # noqa: BLE001 - anything raised while parsing flags is user input
        text = " ".join(
            line.strip(" '\"\\")
            for line in str(error).replace("\\n", "\n").splitlines()
            if line.strip()
        )
        fail(f"bad command line: {text}")

    def guarded_main(argv):
        if cache_flag.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            enable_compilation_cache()
        try:
            main(argv)
        except UserError as error:
            fail(str(error))

    app.run(guarded_main, flags_parser=lambda argv: remaining)  # parsed once
