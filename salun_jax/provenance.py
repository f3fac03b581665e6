"""Which code made an artefact: the package version and, in a git checkout, the commit."""

from __future__ import annotations

import functools
import os
import subprocess

from salun_jax.version import __version__


@functools.cache
def code_version() -> str:
    """ "<version>+<commit>" (with "-dirty" for uncommitted changes) in a git checkout, else the
    package version. Cached for the process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "salun_jax"))
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{commit}{'-dirty' if dirty else ''}"
