"""Where Numba keeps this package's compiled functions: somewhere writable, in every process.

The compiled loops are ``@njit(cache=True)``: the first process that calls one compiles it
and writes it to disk, and every later process, driver or Python worker, loads it instead
(docs/benchmarks.md, "First fits"). Numba writes next to the source
(``__pycache__``), or, when the installation is read-only, under the user's cache directory
(``~/.cache/numba``). Where neither is writable, as in a container with a read-only image and
no writable home, Numba refuses ``cache=True`` at import time ("no locator available") and the
executors could not even import the package; :func:`ensure_cache_dir` then points Numba at a
per-user directory under the system's temporary directory. ``NUMBA_CACHE_DIR`` set by the user
always wins.

Entries are safe to share: Numba keys them by the source file's contents, the signature, the
CPU and the Numba and Python versions, and writes each file under a temporary name renamed
into place, so parallel workers never read a half-written entry.
"""

from __future__ import annotations

import os
import tempfile
import threading

_lock = threading.Lock()
_checked = False


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def fallback_cache_dir() -> str:
    """The directory used when neither Numba's own locations is writable."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"spark_gpu_mf-numba-{user}")


def choose_cache_dir(in_tree: str, user_wide: str) -> str | None:
    """``None`` when Numba's own choice works (``in_tree``, then ``user_wide`` writable), else
    the fallback directory."""
    if _writable(in_tree) or _writable(user_wide):
        return None
    return fallback_cache_dir()


def ensure_cache_dir() -> None:
    """Before the first ``@njit(cache=True)`` of a module: make sure Numba can cache it.

    Checked once per process, for this package's ``__pycache__`` directories (a package is
    installed all at once: one answers for all).
    """
    global _checked
    with _lock:
        if _checked:
            return
        _checked = True
        from numba.core import config
        from numba.misc.appdirs import AppDirs

        if config.CACHE_DIR:
            return
        in_tree = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
        user_wide = AppDirs(appname="numba", appauthor=False).user_cache_dir
        chosen = choose_cache_dir(in_tree, user_wide)
        if chosen is None or not _writable(chosen):
            return
        # Both: Numba re-reads NUMBA_* variables when one changes, which would reset the
        # attribute alone.
        os.environ["NUMBA_CACHE_DIR"] = chosen
        config.CACHE_DIR = chosen
