"""The command line of the experiment scripts: absl flags with one-line errors.

`--help` (and `--helpfull`) print the flags and exit 0; `--show_config` prints the config with
the overrides applied and exits. What a user or the OS can cause ends in one `error: ...` line on
stderr, without a traceback: a bad flag or config (exit 2), a `UserError` (2), an OS error naming
a file such as a full disk or a read-only directory (2), Ctrl-C (130: the same command resumes).
Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import errno
import importlib
import io
import logging
import os
import re
import signal
import sys
from collections.abc import Callable

# Only the standard library at import: --help answers without importing JAX (the pipelines,
# `salun_jax.pipeline.common` and the `setup` options load once the command line is parsed).


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """orbax logs every save at INFO through absl; keep its warnings, drop the chatter. An
    error of its background threads that a full disk caused keeps its line, not its traceback
    (the run then ends with one line naming the file)."""
    if "orbax" not in record.pathname:
        return True
    if record.exc_info and record.exc_info[1] is not None and _no_space(record.exc_info[1]):
        record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING


def fail(message: str) -> None:
    """Exits with one clear error line (no traceback) for errors a user can fix."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How a full disk reads in errors that C++ libraries (tensorstore under orbax) raise as text.
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|File too large")
_QUOTED_PATH = re.compile(r"""["'](/[^"']+)["']""")
_HELP_FLAGS = ("help", "helpshort", "?", "helpfull")
_FILE_ATTRIBUTES = ("fp", "_fileobj", "fileobj", "_file", "file", "raw")  # of writers (zipfile)


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or while handling (each once)."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it was explicitly raised from (`raise ... from`)."""
    out = []
    while error is not None and not any(error is e for e in out):
        out.append(error)
        error = error.__cause__
    return out


def _file_being_written(error: BaseException) -> str | None:
    """The name of the open file in the innermost frame of `error`'s traceback that has one: a
    failed `write` raises an OSError without the file's name (e.g. ENOSPC, EFBIG)."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            for candidate in (value, *(getattr(value, a, None) for a in _FILE_ATTRIBUTES)):
                if isinstance(candidate, io.IOBase):
                    name = getattr(candidate, "name", None)
                    if isinstance(name, str) and name:
                        return name
    return None


def _quiet_closed_loop(unraisable) -> None:
    """sys.unraisablehook: drops "Event loop is closed" from tensorstore's write callbacks that
    complete after orbax gave up a save (a full disk, Ctrl-C); the failure itself is reported
    (Python ignores unraisable exceptions anyway). A Ctrl-C that landed in a finalizer (a
    weakref callback of the garbage collector), which Python would ignore and run on, ends the
    run as any Ctrl-C does. Others go to the default hook."""
    value = unraisable.exc_value
    if isinstance(value, KeyboardInterrupt):
        _exit_now(*os_failure(value))
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def _no_space(error: BaseException) -> tuple[str | None, str] | None:
    """(the file being written or None, the reason) if a full disk or quota caused `error`:
    ENOSPC, EDQUOT or EFBIG in its chain, or their text in an error of a C++ library."""
    chain = _chain(error)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            where = e.filename if e.filename is not None else _file_being_written(e)
            return where, e.strerror or os.strerror(e.errno)
    for e in chain:
        found = None if isinstance(e, OSError) else _NO_SPACE_TEXT.search(str(e))
        if found:
            paths = _QUOTED_PATH.findall(str(e))  # tensorstore: the database, then the file
            return (paths[-1] if paths else None), found[0]
    return None


def os_failure(error: BaseException) -> tuple[str, int] | None:
    """(the one line, the exit code) for a failure a user or the OS caused, or None for a bug.

    - Ctrl-C (a `KeyboardInterrupt` anywhere in the chain: also an error raised while unwinding
      after it, e.g. by an async checkpoint save cut short): says the same command resumes, 130.
    - a full disk or quota (ENOSPC, EDQUOT, EFBIG anywhere in the chain, or their text in an
      error of a C++ library): names the file being written, 2.
    - another `OSError` with a file name (EACCES, EROFS, ENOTDIR, EISDIR, ...), raised or raised
      from: names the file, 2.
    """
    chain = _chain(error)
    if any(isinstance(e, KeyboardInterrupt) for e in chain):
        return (
            "interrupted; run the same command again to resume from the last checkpoint",
            INTERRUPTED_EXIT,
        )
    no_space = _no_space(error)
    if no_space:
        where, reason = no_space
        where = f"writing {where}" if where else "on the device"
        return f"no space left {where} ({reason}); free some space and rerun", 2
    for e in _causes(error):
        if isinstance(e, OSError) and e.filename is not None:
            reason = e.strerror or type(e).__name__
            other = f" -> {e.filename2}" if e.filename2 is not None else ""
            return f"{reason}: {e.filename}{other}", 2
    return None


def _exit_now(message: str, code: int) -> None:
    """Prints the error line and ends the process at once: no interpreter shutdown, so nothing
    that is still running (an async checkpoint save, its thread pool) can print a traceback
    after it. Whatever was being written is left as a kill leaves it, which a rerun handles."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line short
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    tqdm = sys.modules.get("tqdm")  # a progress bar's line has no end yet: start a new one
    bars = getattr(getattr(tqdm, "tqdm", None), "_instances", None)
    try:
        os.write(2, (("\n" if bars else "") + f"error: {message}\n").encode())
    finally:
        os._exit(code)


def _on_sigint(signum, frame) -> None:
    del signum, frame
    _exit_now(*os_failure(KeyboardInterrupt()))


def _help_asked(argv: list[str]) -> str | None:
    """`help` or `helpfull` if the command line asks for help (before any `--`)."""
    for arg in argv[1:]:
        if arg == "--":
            return None
        name = arg.lstrip("-") if arg.startswith("-") else None
        if name in _HELP_FLAGS:
            return "helpfull" if name == "helpfull" else "help"
    return None


def _print_and_exit(write: Callable[[], None]) -> None:
    """Runs `write` (printing to stdout) and exits 0, also when a reader such as `head` closed
    the pipe early."""
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    sys.exit(0)


def _print_help(full: bool) -> None:
    """absl's usage text (the script's docstring and its flags) on stdout, and how to see a
    config's fields."""
    from absl import flags

    main = sys.modules["__main__"]
    doc = (main.__doc__ or f"\nUSAGE: {sys.argv[0]} [flags]\n").rstrip("\n")
    if full:
        flag_text = flags.FLAGS.get_help()
    else:
        modules = [sys.argv[0], __name__]
        flag_text = "\n".join(
            text for text in (flags.FLAGS.module_help(m) for m in modules) if text.strip()
        )
    found = re.search(r"--config[ =](\S+\.py)", main.__doc__ or "")
    config = found[1] if found else "experiments/configs/<file>.py"
    script = sys.argv[0]
    print(doc)
    if flag_text:
        print("\nflags:\n" + flag_text)
    if "config" in flags.FLAGS:  # a script run by a config (not e.g. evaluate.py)
        print(
            f"\nSee a config's fields: python {script} --config {config} --show_config\n"
            "Change one: --config.<field>=<value>, e.g. --config.train.epochs=5; a config file's "
            f"variant (where it has some, e.g. tiny): --config {config}:<variant>."
        )
    if not full:
        print("Try --helpfull to get a list of all flags.")


def enable_compilation_cache(directory: str | None = None, cache_dir: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default: `jax_compilation/` in the data
    cache directory, `cache_dir` or else $SALUN_JAX_CACHE or ~/.cache/salun_jax), so a rerun
    compiles nothing (within a process, `salun_jax.loop` compiles each step once). Returns the
    directory."""
    import jax

    from salun_jax.cache_paths import resolve_cache_dir

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


def set_verbosity(verbosity: int) -> None:
    """absl's `--verbosity` for the library's named loggers (`salun_jax.*`, under absl's handler
    on the root logger, which absl already set to the flag's level): 1 shows the library's DEBUG
    lines (a line per training epoch) but keeps the other libraries (JAX's hundreds of compile
    and cache lines) at INFO; 2 and up show everyone's; 0 and below are absl's alone."""
    if verbosity == 1:
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("salun_jax").setLevel(logging.DEBUG)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def run(main: Callable, config_flag=None, setup: Callable[[], object] | None = None) -> None:
    """`absl.app.run(main)`, but a bad flag or config override (unknown key, missing config file)
    and any `UserError` raised by `main` end with one clear error line instead of a traceback,
    and so do Ctrl-C and OS errors naming a file (`os_failure`). `--help` / `--helpfull` print
    the flags, `--show_config` the config; both exit 0 without running. The config is locked
    after the overrides, so a mistyped key cannot add a setting. `config_flag` None: a script
    without a config (experiments/evaluate.py). `setup`: called first, before JAX starts its
    backend, to set process-wide options (the scripts pass `salun_jax.cpu.enable`); a ValueError
    or RuntimeError it raises ends with one line."""
    try:
        _run(main, config_flag, setup)
    except (KeyboardInterrupt, OSError) as error:  # while parsing or starting up
        failure = os_failure(error)
        if failure is None:
            raise
        _exit_now(*failure)


def _define_flags() -> dict:
    """The flags every entry point has besides --config / --workdir: {name: flag holder}."""
    from absl import flags

    return {
        "compilation_cache": flags.DEFINE_bool(
            "compilation_cache",
            True,
            "Keep compiled programs in the persistent JAX cache (jax_compilation/ in the data "
            "cache: --config.cache_dir, else $SALUN_JAX_CACHE or ~/.cache/salun_jax): reruns "
            "compile nothing. --nocompilation_cache turns it off.",
        ),
        "coordinator_address": flags.DEFINE_string(
            "coordinator_address",
            os.environ.get("SALUN_JAX_COORDINATOR_ADDRESS"),
            "host:port of process 0 for a multi-process run (jax.distributed); with "
            "--num_processes and --process_id. Env: SALUN_JAX_COORDINATOR_ADDRESS.",
        ),
        "num_processes": flags.DEFINE_integer(
            "num_processes",
            _env_int("SALUN_JAX_NUM_PROCESSES"),
            "Processes in a multi-process run. Env: SALUN_JAX_NUM_PROCESSES.",
        ),
        "process_id": flags.DEFINE_integer(
            "process_id",
            _env_int("SALUN_JAX_PROCESS_ID"),
            "This process's id, 0 .. num_processes - 1. Env: SALUN_JAX_PROCESS_ID.",
        ),
        "distributed": flags.DEFINE_bool(
            "distributed",
            False,
            "Join a multi-process run that JAX detects itself (TPU pod slice, SLURM, Open MPI).",
        ),
        "progress": flags.DEFINE_enum(
            "progress",
            "auto",
            ["auto", "on", "off"],
            "Progress bars of training epochs: auto (only when stderr is a terminal, so a "
            "redirected log gets none), on or off. How much is logged: --verbosity (-v): 0 "
            "(default) INFO, 1 adds a line per epoch, 2 also the libraries' debug lines, -1 "
            "warnings only.",
        ),
        "show_config": flags.DEFINE_bool(
            "show_config",
            False,
            "Print the config (the --config file with its --config.<field> overrides) as JSON "
            "and exit without running; --workdir is not needed.",
        ),
    }


def _parse(config_flag) -> list[str]:
    """Parses the command line (help, a missing config file, bad flags: one line or exit 0);
    returns the arguments left for absl's app.run."""
    from absl import flags

    help_asked = _help_asked(sys.argv)
    if help_asked:  # absl's --help exits 1 and needs the required flags: handled here
        _print_and_exit(lambda: _print_help(full=help_asked == "helpfull"))
    for i, arg in enumerate(sys.argv):  # config_flags prints a traceback for a missing file
        path = (
            arg.split("=", 1)[1]
            if arg.startswith("--config=")
            else (sys.argv[i + 1] if arg == "--config" and i + 1 < len(sys.argv) else None)
        )
        if path is not None and not os.path.exists(path.split(":", 1)[0]):
            fail(f"no config file {path}")
    showing = any(re.fullmatch(r"--?show_config(=(true|1))?", a, re.I) for a in sys.argv[1:])
    if showing and "workdir" in flags.FLAGS and flags.FLAGS["workdir"].default is None:
        flags.FLAGS.set_default("workdir", "")  # required to run, not to show the config
    try:
        remaining = flags.FLAGS(sys.argv)
        if config_flag is not None:  # a script with a config (not e.g. evaluate.py)
            if config_flag.value is None:
                fail(f"--config is required: python {sys.argv[0]} --config <config file>")
            config_flag.value.lock()  # config_flags reports a bad config file only when read
    except Exception as error:  # noqa: BLE001 - anything raised while parsing flags is user input
        text = " ".join(
            line.strip(" '\"\\")
            for line in str(error).replace("\\n", "\n").splitlines()
            if line.strip()
        )
        fail(f"bad command line: {text}")
    return remaining


def _run(main: Callable, config_flag, setup: Callable[[], object] | None) -> None:
    from absl import app

    sys.unraisablehook = _quiet_closed_loop
    # Ctrl-C (SIGINT) interrupts even where the parent started us with it ignored (a background
    # job of a script, some launchers and test runners): the one-line interrupt below needs it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    options = _define_flags()
    logging.getLogger("absl").addFilter(_quiet_orbax)
    remaining = _parse(config_flag)
    if options["show_config"].value and config_flag is not None:
        _print_and_exit(
            lambda: print(config_flag.value.to_json_best_effort(indent=2, sort_keys=True))
        )
    if setup is not None:  # parsing computes nothing: JAX's backend has not started yet
        try:
            setup()
        except (ValueError, RuntimeError) as error:
            fail(str(error))

    from salun_jax.pipeline.common import UserError

    def guarded_main(argv):
        try:
            _guarded(argv)
        except UserError as error:
            fail(str(error))
        except BaseException as error:  # noqa: BLE001 - sorted: one line for what a user caused
            failure = os_failure(error)
            if failure is None:
                raise  # a bug: keep the traceback
            _exit_now(*failure)
        # Done: a Ctrl-C while the interpreter shuts down (waiting for a last async checkpoint
        # save) ends with the same line, not a traceback from its threads.
        signal.signal(signal.SIGINT, _on_sigint)

    def _guarded(argv):
        from absl import flags

        set_verbosity(flags.FLAGS["verbosity"].value)
        try:
            initialize_distributed(
                options["coordinator_address"].value,
                options["num_processes"].value,
                options["process_id"].value,
                auto=options["distributed"].value,
            )
        except (ValueError, RuntimeError) as error:
            fail(f"cannot join the multi-process run: {error}")
        from salun_jax import loop

        loop.set_progress(options["progress"].value)
        if options["compilation_cache"].value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            config = config_flag.value if config_flag is not None else None
            enable_compilation_cache(
                cache_dir=(config.get("cache_dir") or None) if config else None
            )
        main(argv)

    app.run(guarded_main, flags_parser=lambda argv: remaining)  # parsed once


def run_pipeline(
    pipeline: Callable[[object, str], str] | str, setup: Callable[[], object] | None = None
) -> None:
    """The whole entry of a pipeline script: --config and --workdir flags, `run` (with `setup`),
    then `pipeline(config, workdir)` and its returned table printed by process 0 (every process
    of a multi-process run gets it). `pipeline` may be "module:function", imported once the
    command line is parsed (so --help does not import JAX)."""
    from absl import flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    workdir_flag = flags.DEFINE_string("workdir", None, "Work directory (resumes if it exists).")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        from salun_jax.pipeline.common import is_primary

        function = pipeline
        if isinstance(pipeline, str):
            module, name = pipeline.split(":")
            function = getattr(importlib.import_module(module), name)
        table = function(config_flag.value, workdir_flag.value)
        if is_primary():
            print(table)

    run(main, config_flag, setup)
