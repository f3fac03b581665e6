"""A work directory used by one run at a time: an exclusive lock, released when the process ends
(also by a kill), so a second run on the same directory is refused at once with a clear line; a
work directory that cannot hold the run's files (empty name, a file, read-only) is refused before
anything runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator

import jax

from salun_jax.pipeline.common import UserError

LOCK_FILE = ".lock"


def check_workdir(workdir: str, write: bool = True) -> None:
    """Makes `workdir` if it is missing and, with `write`, checks that a file can be made in it.

    Raises:
      UserError: `workdir` is empty, names an existing file, or cannot be made or written (a
        read-only or full file system, no permission), one line naming it.
    """
    if not workdir or not workdir.strip():
        raise UserError("--workdir is empty; name the directory for the run's files")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file, not a directory; use another --workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot make the work directory {workdir}: {error.strerror or error}"
            + (f" ({error.filename})" if error.filename not in (None, workdir) else "")
        ) from error
    if not write:
        return
    try:  # os.access misses read-only mounts and immutable directories, and root passes it
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=workdir)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise UserError(
            f"the work directory {workdir} is not writable ({error.strerror or error}); "
            "use another --workdir"
        ) from error


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds `workdir/.lock` (an OS file lock: a killed run leaves no stale lock behind).

    In a multi-process run only process 0 takes the lock (the others share its directory).

    Raises:
      UserError: another process holds the lock, or `workdir` is empty, a file, or cannot be
        created or written (refused before anything runs).
    """
    check_workdir(workdir, write=jax.process_index() == 0)
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(
                f"{workdir} is in use by {holder}; wait for it to finish or use another --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
