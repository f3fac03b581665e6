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


def enable_compilation_cache(directory: str | None = None, cache_dir: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default: `jax_compilation/` in the data
    cache directory, `cache_dir` or else $SALUN_JAX_CACHE or ~/.cache/salun_jax), so a rerun
    compiles nothing (within a process, `salun_jax.loop` compiles each step once). Returns the
    directory."""
    import jax

    from salun_jax.data.sources import resolve_cache_dir

    directory = directory or os.path.join(resolve_cache_dir(cache_dir), "jax_compilation")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> bool:
    """Joins a multi-process run through `jax.distributed.initialize`, before any JAX
    computation; on CPU the cross-process collectives go through gloo.

    Args:
      coordinator_address: "host:port" of process 0 (every process passes the same one).
      num_processes, process_id: how many processes, and this one's id (0 is the coordinator).
      auto: no address given: let JAX detect the cluster (TPU pod slices, SLURM, Open MPI).

    Returns:
      True if a multi-process run was joined, False for a plain single-process run.
    """
    if not coordinator_address and not auto:
        return False
    import jax

    # Only the CPU backend reads this; without it CPU processes cannot run collectives together.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        jax.distributed.initialize()
    if jax.process_index() != 0:  # logs come from process 0; the others keep their warnings
        logging.getLogger("absl").setLevel(logging.WARNING)
        logging.getLogger().setLevel(logging.WARNING)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def run(main: Callable, config_flag) -> None:
    """`absl.app.run(main)`, but a bad flag or config override (unknown key, missing config file)
    and any `UserError` raised by `main` end with one clear error line instead of a traceback.
    The config is locked after the overrides, so a mistyped key cannot add a setting."""
    from absl import app, flags

    from salun_jax.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # before JAX starts its backend and its threads
    cache_flag = flags.DEFINE_bool(
        "compilation_cache",
        True,
        "Keep compiled programs in the persistent JAX cache (jax_compilation/ in the data "
        "cache: --config.cache_dir, else $SALUN_JAX_CACHE or ~/.cache/salun_jax): reruns "
        "compile nothing. --nocompilation_cache turns it off.",
    )
    coordinator_flag = flags.DEFINE_string(
        "coordinator_address",
        os.environ.get("SALUN_JAX_COORDINATOR_ADDRESS"),
        "host:port of process 0 for a multi-process run (jax.distributed); with "
        "--num_processes and --process_id. Env: SALUN_JAX_COORDINATOR_ADDRESS.",
    )
    num_processes_flag = flags.DEFINE_integer(
        "num_processes",
        _env_int("SALUN_JAX_NUM_PROCESSES"),
        "Processes in a multi-process run. Env: SALUN_JAX_NUM_PROCESSES.",
    )
    process_id_flag = flags.DEFINE_integer(
        "process_id",
        _env_int("SALUN_JAX_PROCESS_ID"),
        "This process's id, 0 .. num_processes - 1. Env: SALUN_JAX_PROCESS_ID.",
    )
    distributed_flag = flags.DEFINE_bool(
        "distributed",
        False,
        "Join a multi-process run that JAX detects itself (TPU pod slice, SLURM, Open MPI).",
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
        try:
            initialize_distributed(
                coordinator_flag.value,
                num_processes_flag.value,
                process_id_flag.value,
                auto=distributed_flag.value,
            )
        except (ValueError, RuntimeError) as error:
            fail(f"cannot join the multi-process run: {error}")
        if cache_flag.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            config = config_flag.value
            enable_compilation_cache(
                cache_dir=(config.get("cache_dir") or None) if config else None
            )
        try:
            main(argv)
        except UserError as error:
            fail(str(error))

    app.run(guarded_main, flags_parser=lambda argv: remaining)  # parsed once


def run_pipeline(pipeline: Callable[[object, str], str]) -> None:
    """The whole entry of a pipeline script: --config and --workdir flags, `run`, then
    `pipeline(config, workdir)` and its returned table printed by process 0 (every process of a
    multi-process run gets it)."""
    from absl import flags
    from ml_collections import config_flags

    from salun_jax.pipeline.common import is_primary

    config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    workdir_flag = flags.DEFINE_string("workdir", None, "Work directory (resumes if it exists).")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        table = pipeline(config_flag.value, workdir_flag.value)
        if is_primary():
            print(table)

    run(main, config_flag)
