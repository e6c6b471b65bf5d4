"""Crash-safe file writes: write to a temporary sibling, fsync it, then rename it onto the target.

A reader (or the next run after a crash or Ctrl-C) sees either the old file or the complete new one, never
a truncated one. The temporary file lives in the target's directory because a rename is only atomic within
one filesystem.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "temp_name", "writer_pid"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a directory entry (a rename or a new file) to disk; best effort.

    Without it a power loss right after a rename may still lose the rename. Windows cannot open
    directories, so failures are ignored: the rename itself has still happened.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a file's data to disk so the rename never exposes a file whose blocks are not written yet."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_name(path: Path, pid: int, token: str) -> Path:
    """`.<name>.<pid>-<token>.tmp` beside `path`: the writer's pid in the name lets a clean-up tell a live
    process's write in progress from the leftover of a killed one."""
    return path.with_name(f".{path.name}.{pid}-{token}.tmp")


def writer_pid(tmp: Path) -> int | None:
    """The pid in a temp file name made by `temp_name` (None for other names)."""
    parts = tmp.name.rsplit(".", 2)
    pid = parts[1].split("-", 1)[0] if len(parts) == 3 and parts[2] == "tmp" else ""
    return int(pid) if pid.isdigit() else None


def _new_temp_file(path: Path) -> Path:
    """Create an empty, uniquely named, hidden sibling of `path`.

    Created with `open(..., "xb")` rather than `tempfile.mkstemp` so the final file gets the usual
    umask-based permissions instead of mkstemp's 0600.
    """
    while True:
        tmp = temp_name(path, os.getpid(), secrets.token_hex(4))
        try:
            with open(tmp, "xb"):
                return tmp
        except FileExistsError:  # pragma: no cover - a 32-bit random collision
            continue


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`.

    The temporary file already exists (empty) so the name is reserved; the caller writes or overwrites
    it. If the body raises (including KeyboardInterrupt), the temporary file is removed and `path` is
    left untouched. Parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(target)  # a failed write (a full disk) names the file it was writing
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text` atomically (UTF-8 by default, independent of the locale)."""
    atomic_write_bytes(path, text.encode(encoding))
