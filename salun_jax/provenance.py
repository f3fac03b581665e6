"""What made an artefact: the code version (the package version and, in a git checkout, the
commit) and content fingerprints of settings, data and splits. Every stored model, mask and result
row is keyed by one, so nothing made by other settings, data or code is reused."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from typing import Any

import numpy as np

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


def content_digest(value: Any) -> str:
    """sha256 (hex) of a value's content: numpy/JAX arrays by dtype, shape and bytes; dataclasses
    by their fields; sequences and mappings element by element; anything else by `repr` of its
    JSON form (so a tuple and a list of the same numbers agree, as a config round trip makes
    them)."""
    digest = hashlib.sha256()
    _update(digest, value)
    return digest.hexdigest()


def fingerprint(**parts: Any) -> str:
    """16 hex digits naming what made an artefact: every part (settings, a data set's
    `Dataset.fingerprint()`, split indices, the code version, other fingerprints) by name and
    content. A stored model, mask or row is reused only where its fingerprint is the one asked
    for: the same names and values give the same fingerprint in any process or machine."""
    return content_digest(parts)[:16]


def _update(digest: Any, value: Any) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(f"dataclass:{type(value).__name__}".encode())
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        digest.update(f"map:{len(value)}".encode())
        for key in sorted(value, key=str):
            _update(digest, str(key))
            _update(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq:{len(value)}".encode())
        for item in value:
            _update(digest, item)
    elif hasattr(value, "dtype") and hasattr(value, "shape") and not np.isscalar(value):
        array = np.ascontiguousarray(np.asarray(value))
        digest.update(f"array:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    else:
        if isinstance(value, np.generic):
            value = value.item()
        digest.update(json.dumps(value, sort_keys=True, default=repr).encode())
