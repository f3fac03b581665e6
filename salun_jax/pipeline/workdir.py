"""A work directory used by one run at a time: an exclusive lock, released when the process ends
(also by a kill), so a second run on the same directory is refused at once with a clear line."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

import jax

from salun_jax.pipeline.common import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds `workdir/.lock` (an OS file lock: a killed run leaves no stale lock behind).

    In a multi-process run only process 0 takes the lock (the others share its directory).

    Raises:
      UserError: another process holds the lock.
    """
    os.makedirs(workdir, exist_ok=True)
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
