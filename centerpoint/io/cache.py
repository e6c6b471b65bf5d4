"""The cache directory, and directories built in a marked temporary place before they count as done.

`$CENTERPOINT_CACHE` (default `~/.cache/centerpoint`) holds what the project generates or fetches: the
synthetic datasets, downloaded weights, inductor's compiled graphs.

A directory that takes long to build (a synthetic dataset, an unpacked archive) is built in a hidden
temporary directory beside or under its destination, holding a `.centerpoint-tmp` marker from its first
moment, and only then moved into place and marked done by its owner (a manifest, a marker file). A crash
leaves at most the temporary directory; a later run removes such leftovers only when they carry the marker,
so nothing of anyone else's is ever removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARKER = ".centerpoint-tmp"  # written first into each temporary directory: only marked ones are cleaned up


def default_cache_dir() -> Path:
    """Return the cache root: ``$CENTERPOINT_CACHE`` or ``~/.cache/centerpoint``.

    Callers append their own folder (e.g. ``shapes-v1-seed0...``, ``weights``) themselves.
    """
    env = os.environ.get("CENTERPOINT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "centerpoint"


@contextmanager
def staging_dir(parent: Path, prefix: str, suffix: str = "") -> Iterator[Path]:
    """A new temporary directory `parent/<prefix>XXXX<suffix>`, marked as ours before anything else is
    written into it, and removed on leaving (whatever the caller did not move out of it goes with it)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    try:
        (tmp / TMP_MARKER).write_bytes(b"")
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_staging(parent: Path, pattern: str, older_than_s: float = 0.0) -> None:
    """Remove the temporary directories matching `pattern` under `parent` that a crashed run left: only
    those holding the marker, and only once untouched for `older_than_s` (another process may still be
    building one that is younger)."""
    now = time.time()
    for tmp in parent.glob(pattern):
        try:
            if (tmp / TMP_MARKER).is_file() and (older_than_s <= 0 or now - tmp.stat().st_mtime > older_than_s):
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
