"""The command line as a user meets it: every case is a subprocess of an experiment script.

`--help` and `--show_config` on every entry point; one `error: ...` line (no traceback) for
what a user or the OS causes: Ctrl-C (exit 130, the same command resumes), a full disk or a
file too large (names the file), a work directory that is empty, a file or read-only, an OS
error naming a file; a damaged results.json is moved aside, not overwritten. Independent
subprocesses start together: each spends seconds starting JAX.
"""

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from salun_jax.pipeline import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")
CONFIGS = os.path.join(EXPERIMENTS, "configs")
DIGITS = os.path.join(CONFIGS, "digits.py")
TINY = os.path.join(CONFIGS, "digits_unlearn.py") + ":tiny"


def _env(**changes):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **changes}
    return {k: v for k, v in env.items() if v is not None}


def _start(script, *args, env=None, wrap=()):
    # No preexec_fn: it forks this (JAX-initialised) process, which JAX warns about.
    return subprocess.Popen(
        [*wrap, sys.executable, os.path.join(EXPERIMENTS, script), *args],
        cwd=REPO,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _run_all(commands, timeout=300):
    """{name: CompletedProcess} of (script, *args) or (script, args, kwargs) run at once."""
    started = {}
    for name, command in commands.items():
        if isinstance(command[-1], dict):
            script, args, kwargs = command
            started[name] = _start(script, *args, **kwargs)
        else:
            started[name] = _start(*command)
    return {name: _finish(p, timeout) for name, p in started.items()}


def _lines(stderr):
    """stderr's lines, progress-bar redraws split off."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip()]


def _one_error_line(result, code=2):
    """The run failed with `code` and ended in one `error:` line, without a traceback."""
    assert result.returncode == code, result.stderr[-3000:]
    lines = _lines(result.stderr)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], result.stderr[-3000:]
    return lines[-1]


# ------------------------------------------------------------------------------------------------
# --help and --show_config.


def _entry_points():
    """(script, uses salun_jax.pipeline.cli) of each script in experiments/ with a command line."""
    scripts = []
    for path in sorted(glob.glob(os.path.join(EXPERIMENTS, "*.py"))):
        with open(path) as f:
            source = f.read()
        if "cli.run" in source or "app.run" in source:
            scripts.append((os.path.basename(path), "cli.run" in source))
    return scripts


@pytest.fixture(scope="module")
def help_runs():
    """Every entry point's --help, a --helpfull and a --show_config, all at once."""
    commands = {("help", script): (script, "--help") for script, _ in _entry_points()}
    commands[("helpfull", "unlearn.py")] = ("unlearn.py", "--helpfull")
    commands["show train"] = (
        "train.py",
        f"--config={DIGITS}",
        "--show_config",
        "--config.train.epochs=3",
    )
    return _run_all(commands)


@pytest.mark.parametrize("script, uses_cli", _entry_points())
def test_help_lists_the_flags_and_how_to_see_a_config(help_runs, script, uses_cli):
    result = help_runs[("help", script)]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "flags:" in result.stdout or "--" in result.stdout, result.stdout
    if not uses_cli:
        # Plain absl.app.run: absl's own --help, which exits 1 (not this library's code).
        assert result.returncode in (0, 1), result.stderr[-2000:]
        return
    assert result.returncode == 0, result.stderr[-2000:]
    if script == "evaluate.py":  # no config: it reads a finished run's
        for flag in ("--workdir", "--method", "--seed", "--mia_kinds"):
            assert flag in result.stdout, (flag, result.stdout)
        assert "See a config's fields" not in result.stdout
        return
    for flag in ("--config", "--workdir", "--show_config", "--nocompilation_cache"):
        assert flag in result.stdout, (flag, result.stdout)
    found = re.search(
        r"See a config's fields: python (\S+) --config (\S+) --show_config", result.stdout
    )
    assert found and found[1].endswith(script), result.stdout
    assert os.path.exists(os.path.join(REPO, found[2])), found[2]  # from the script's docstring
    assert "--helpfull" in result.stdout


def test_helpfull_exits_0_and_lists_absl_flags_too(help_runs):
    full = help_runs[("helpfull", "unlearn.py")]
    assert full.returncode == 0, full.stderr[-2000:]
    assert "--verbosity" in full.stdout and "--config" in full.stdout


def test_show_config_prints_the_overridden_config_and_runs_nothing(help_runs):
    train = help_runs["show train"]
    assert train.returncode == 0, train.stderr[-2000:]
    config = json.loads(train.stdout)
    assert config["train"]["epochs"] == 3 and config["dataset"] == "digits"


# ------------------------------------------------------------------------------------------------
# The work directory and OS errors.


@contextlib.contextmanager
def _read_only(path):
    """Makes `path` (a directory or a file) unwritable, also for root: `chmod` for a user,
    `chattr +i` or a read-only bind mount for root; skips where none works."""
    if os.geteuid() != 0:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
        try:
            yield
        finally:
            os.chmod(path, mode)
        return
    if (
        shutil.which("chattr")
        and subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0
    ):
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
        return
    bound = subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0
    if (
        bound
        and subprocess.run(
            ["mount", "-o", "remount,ro,bind", path, path], capture_output=True
        ).returncode
        == 0
    ):
        try:
            yield
        finally:
            subprocess.run(["umount", path], check=True)
        return
    if bound:
        subprocess.run(["umount", path], check=True)
    pytest.skip("root, and neither chattr +i nor a read-only bind mount works here")


def _no_bigger_files_than(limit):
    """A command prefix: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), as on a
    full disk (bash's ulimit -f counts 1024-byte blocks)."""
    return ["bash", "-c", f'trap "" XFSZ; ulimit -f {limit // 1024}; exec "$@"', "bash"]


def test_unusable_workdirs_and_os_errors_give_one_line_naming_the_file(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    locked_lock = tmp_path / "locked_lock"
    locked_lock.mkdir()
    (locked_lock / ".lock").write_text("")
    big = tmp_path / "big"
    train = ("train.py", f"--config={DIGITS}", "--config.train.epochs=1")
    # The size-limited run keeps no compilation cache: no cache file is cut short.
    no_cache = _env(JAX_COMPILATION_CACHE_DIR=None)
    with _read_only(read_only), _read_only(locked_lock / ".lock"):
        results = _run_all(
            {
                "empty": (*train, "--workdir="),
                "file": (*train, f"--workdir={a_file}"),
                "under a file": (*train, f"--workdir={a_file}/run"),
                "read-only": (*train, f"--workdir={read_only}"),
                "lock": (*train, f"--workdir={locked_lock}"),
                "too large": (
                    "train.py",
                    [*train[1:], f"--workdir={big}", "--nocompilation_cache"],
                    {"env": no_cache, "wrap": _no_bigger_files_than(8192)},
                ),
            }
        )
    assert "--workdir is empty" in _one_error_line(results["empty"])
    line = _one_error_line(results["file"])
    assert f"--workdir {a_file} is a file, not a directory" in line
    line = _one_error_line(results["under a file"])
    assert f"{a_file}/run" in line and "Not a directory" in line
    line = _one_error_line(results["read-only"])
    assert f"work directory {read_only} is not writable" in line
    assert os.listdir(read_only) == []  # refused before writing anything
    line = _one_error_line(results["lock"])
    assert line.endswith(str(locked_lock / ".lock")), line  # EPERM / EACCES naming the file
    line = _one_error_line(results["too large"])
    written = re.search(r"^error: no space left writing (\S+) \(File too large\)", line)
    assert written and written[1].startswith(str(big)), line


# ------------------------------------------------------------------------------------------------
# Ctrl-C.


def _checkpoint_entries(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _finished_epochs(workdir):
    return [
        int(n)
        for n in _checkpoint_entries(workdir)
        if n.isdigit() and os.path.exists(os.path.join(workdir, "checkpoints", n, "checksums.json"))
    ]


def _interrupt_when(process, ready, timeout=180):
    """Sends Ctrl-C (SIGINT) once `ready(stderr so far)`; returns the CompletedProcess."""
    chunks = []
    reader = threading.Thread(
        target=lambda: chunks.extend(iter(lambda: process.stderr.read(256), "")), daemon=True
    )
    reader.start()
    start = time.monotonic()
    while process.poll() is None and not ready("".join(chunks)):
        assert time.monotonic() - start < timeout, "".join(chunks)[-3000:]
        time.sleep(0.005)
    running = process.poll() is None
    if running:
        process.send_signal(signal.SIGINT)
    out = process.stdout.read()
    process.wait(timeout=timeout)
    reader.join(timeout=timeout)
    process.stdout.close()
    process.stderr.close()
    result = subprocess.CompletedProcess(process.args, process.returncode, out, "".join(chunks))
    assert running, result.stderr[-3000:]  # it ended before the Ctrl-C
    return result


def _assert_interrupted(result):
    line = _one_error_line(result, code=130)
    assert "interrupted" in line and "resume" in line and "same command" in line, line


# Digits training long enough for optimised code to pay: level 1 (conftest skips most of the
# optimisation for the scripts tests launch). The full-disk test below shares its programs.
OPTIMIZED = _env(JAX_DISABLE_MOST_OPTIMIZATIONS=None)


def test_ctrl_c_says_interrupted_and_the_same_command_resumes(tmp_path):
    command = (
        "train.py",
        f"--config={DIGITS}",
        f"--workdir={tmp_path}",
        "--config.train.epochs=200",
    )

    def saving_after_a_finished_one():  # Ctrl-C lands while an async save is under way
        entries, done = _checkpoint_entries(tmp_path), _finished_epochs(tmp_path)
        return bool(done) and any(not n.isdigit() or int(n) not in done for n in entries)

    first = _interrupt_when(
        _start(*command, env=OPTIMIZED), lambda _: saving_after_a_finished_one()
    )
    _assert_interrupted(first)
    before = max(_finished_epochs(tmp_path))
    again = _interrupt_when(
        _start(*command, env=OPTIMIZED), lambda _: max(_finished_epochs(tmp_path)) > before + 1
    )
    _assert_interrupted(again)
    resumed = re.search(r"resuming after epoch (\d+)", again.stderr)
    assert resumed and int(resumed[1]) >= 1, again.stderr[-3000:]
    assert "train 1/200" not in again.stderr  # not from the start


def test_ctrl_c_in_a_finalizer_still_ends_the_run():
    # Python ignores an exception raised in a weakref callback of the garbage collector (it goes
    # to sys.unraisablehook) and runs on: a Ctrl-C landing there once let a run finish with 0.
    code = (
        "import gc, sys, weakref\n"
        "from salun_jax.pipeline import cli\n"
        "sys.unraisablehook = cli._quiet_closed_loop\n"
        "class Model: pass\n"
        "def on_collect(_):\n"
        "    raise KeyboardInterrupt\n"
        "model = Model()\n"
        "ref = weakref.ref(model, on_collect)\n"
        "del model\n"
        "gc.collect()\n"
        "print('ran on')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
    )
    _assert_interrupted(result)
    assert "ran on" not in result.stdout


# ------------------------------------------------------------------------------------------------
# A full disk mid-run (after the Ctrl-C test: its compiled programs are in the cache by now).


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 192 KiB tmpfs (a real ENOSPC), where mounting is allowed (root, as in CI)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_during_a_checkpoint_and_a_bad_results_path_give_one_line(tmp_path, tiny_tmpfs):
    # The first checkpoint (~230 kB) does not fit: orbax's writers fail with ENOSPC.
    # results.json a directory: replacing it at the end fails with EISDIR, naming both files.
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "results.json").mkdir()
    train = (f"--config={DIGITS}", "--config.train.epochs=1")
    results = _run_all(
        {
            "full": ("train.py", (*train, f"--workdir={tiny_tmpfs}/w"), {"env": OPTIMIZED}),
            "isdir": ("train.py", (*train, f"--workdir={tmp_path}/w"), {"env": OPTIMIZED}),
        }
    )
    line = _one_error_line(results["full"])
    written = re.search(r"^error: no space left writing (\S+) \(No space left on device\)", line)
    assert written and written[1].startswith(f"{tiny_tmpfs}/w/checkpoints"), line
    line = _one_error_line(results["isdir"])
    assert line.startswith("error: Is a directory: ") and line.endswith(
        f"{tmp_path}/w/results.json"
    )


# ------------------------------------------------------------------------------------------------
# A damaged results.json.

EMPTY = {"runs": [], "sweep": {}}


@pytest.mark.parametrize(
    "content", ["[1, 2]", '{"runs": [{"method": "FT"', '{"runs": "x"}', "\xff\xfe"]
)
def test_load_results_moves_a_damaged_file_aside(tmp_path, content):
    path = tmp_path / "results.json"
    path.write_bytes(content.encode("latin-1"))
    assert common.load_results(str(path), {"runs": [], "sweep": {}}) == EMPTY
    assert not path.exists()
    (aside,) = tmp_path.glob("results.json.damaged-*")
    assert aside.read_bytes() == content.encode("latin-1")  # the user's data, kept
    path.write_bytes(content.encode("latin-1"))  # damaged again: a second file, not overwritten
    common.load_results(str(path), {"runs": [], "sweep": {}})
    assert len(list(tmp_path.glob("results.json.damaged-*"))) == 2


def test_load_results_keeps_a_good_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"runs": [{"method": "FT"}], "extra": 1}')
    loaded = common.load_results(str(path), {"runs": [], "sweep": {}})
    assert loaded == {"runs": [{"method": "FT"}], "sweep": {}, "extra": 1}
    assert path.exists() and not list(tmp_path.glob("*.damaged-*"))
    assert common.load_results(str(tmp_path / "none.json"), {"runs": []}) == {"runs": []}


def test_damaged_results_json_is_named_and_moved_aside_by_the_pipeline(tmp_path):
    (tmp_path / "results.json").write_text("[1, 2]")
    process = _start(
        "unlearn.py",
        "--config",
        TINY,
        f"--workdir={tmp_path}",
        "--config.run_methods=('FT',)",
        "--config.sweep_fractions=()",
    )
    # Ctrl-C once the warning is out: the test stops there (the interrupt has its own test).
    result = _interrupt_when(process, lambda stderr: "results.json.damaged-" in stderr)
    (aside,) = tmp_path.glob("results.json.damaged-*")
    assert aside.read_text() == "[1, 2]"
    warnings = [
        line for line in _lines(result.stderr) if "results.json" in line and "moved" in line
    ]
    assert len(warnings) == 1 and str(aside) in warnings[0], result.stderr[-3000:]
    _assert_interrupted(result)


def test_bad_cpu_options_are_one_line(tmp_path):
    # The scripts set the CPU wing's options first (salun_jax.cpu.enable): a bad choice stops
    # there, before any work, with one line.
    result = _finish(
        _start(
            "unlearn.py",
            f"--config={TINY}",
            f"--workdir={tmp_path / 'run'}",
            env=_env(SALUN_JAX_CONV_IMPL="auto"),
        )
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: $SALUN_JAX_CONV_IMPL must be one of xla, onednn, got 'auto'"
    )
    assert not (tmp_path / "run").exists()
