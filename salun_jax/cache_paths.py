"""Where the library keeps its caches (decoded data sets, compiled programs, CPU kernel plans):
one directory, `cache_dir`, else $SALUN_JAX_CACHE, else ~/.cache/salun_jax."""

import os

CACHE_ENV_VAR = "SALUN_JAX_CACHE"


def resolve_cache_dir(cache_dir: str | None = None) -> str:
    """The cache directory: `cache_dir`, else $SALUN_JAX_CACHE, else ~/.cache/salun_jax."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or os.path.join("~", ".cache", "salun_jax")
    return os.path.abspath(os.path.expanduser(cache_dir))
