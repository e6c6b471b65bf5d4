"""The run directory: a fresh run refuses a non-empty one, and a run holds an exclusive lock on it.

The lock is `<run dir>/.lock`, holding "<pid> <host>", taken with flock(2) by the one process that writes
the run (rank 0): the kernel releases it when that process dies, so the lock of a killed run is simply
taken over. Where the filesystem has no flock (some NFS mounts), the file itself is the lock (created with
O_EXCL); a leftover one is taken over when its process is gone from this host, and otherwise named in the
error. The lock file is removed when the run ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from centerpoint.errors import CenterpointError
from centerpoint.io.atomic import writer_pid

LOCK_NAME = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def contents(path: Path) -> list[str]:
    """Names in the run directory besides its lock file (empty when the directory does not exist)."""
    try:
        return sorted(p.name for p in Path(path).iterdir() if p.name != LOCK_NAME)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        what = "is a file" if Path(path).is_file() else "is not writable: a folder above it is a file"
        raise CenterpointError(f"run directory {path} {what}; choose another --workdir") from None
    except OSError as err:
        raise CenterpointError(f"run directory {path} cannot be read: {err.strerror or err}") from None


def check_start(path: Path, resume: bool) -> None:
    """Before any long work: the run directory must be usable (not a file, nor under one), and a fresh run
    needs it absent or empty: never mix two runs' files."""
    names = contents(path)
    if names and not resume:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise CenterpointError(f"run directory {path} is not empty ({shown}): pass --resume to continue the run "
                               "in it, or choose another --workdir")


def alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(lock_file: Path) -> tuple[int | None, str]:
    """(pid, host) written in a lock file; (None, "") when unreadable or not written yet."""
    try:
        pid, host = lock_file.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def _in_use(path: Path, pid: int | None, host: str) -> CenterpointError:
    who = f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else "pid unknown"
    return CenterpointError(f"run directory {path} is in use by another centerpoint process ({who}); wait for it "
                            "to end or choose another --workdir")


@dataclass
class RunLock:
    """A held lock on a run directory. `created`: the directories this process created for it (deepest
    first), removed again by `release(remove_created=True)` if they are still empty."""

    path: Path
    fd: int
    created: list[Path] = field(default_factory=list)

    def release(self, remove_created: bool = False) -> None:
        """Give the lock up (and remove the lock file); optionally the still-empty directories it created."""
        if self.fd < 0:
            return
        lock_file = self.path / LOCK_NAME
        try:
            if os.fstat(self.fd).st_ino == lock_file.stat().st_ino:
                lock_file.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        if remove_created:
            for directory in self.created:
                try:
                    directory.rmdir()  # only succeeds while empty: never removes anything else
                except OSError:
                    break


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def _exclusive_file(path: Path) -> int:
    """The lock where flock is unavailable: create the lock file exclusively; take over the file of a
    process that is gone from this host."""
    lock_file = path / LOCK_NAME
    for _ in range(3):
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid, host = _holder(lock_file)
            if pid is not None and host == socket.gethostname() and not alive(pid):
                lock_file.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise _in_use(path, pid, host) from None
        _write_holder(fd)
        return fd
    raise _in_use(path, *_holder(lock_file))


def _flock_file(path: Path) -> int | None:
    """The lock through flock(2); None where the filesystem does not support it."""
    lock_file = path / LOCK_NAME
    for _ in range(3):
        try:
            fd, created = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(lock_file, os.O_RDWR), False
            except FileNotFoundError:  # its holder just removed it
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(path, *_holder(lock_file)) from None
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_FLOCK:
                if created:
                    lock_file.unlink(missing_ok=True)
                return None
            raise
        try:  # the holder we waited on may have removed the file as it released it: lock the new one
            same = os.fstat(fd).st_ino == lock_file.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            _write_holder(fd)
            return fd
        os.close(fd)
    raise _in_use(path, *_holder(lock_file))


def lock(path: Path) -> RunLock:
    """Create the run directory if needed and lock it for this process; a CenterpointError names the
    process that holds it."""
    path = Path(path)
    created = _missing_dirs(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _flock_file(path)
        if fd is None:
            fd = _exclusive_file(path)
    except (FileExistsError, NotADirectoryError):
        raise CenterpointError(f"run directory {path} is not writable: a file is in the way; choose another "
                               "--workdir") from None
    except OSError as err:
        raise CenterpointError(f"run directory {path} is not writable: {err.strerror or err}") from None
    return RunLock(path, fd, created)


def remove_partial_writes(run_dir: Path) -> int:
    """Delete the temp files that killed checkpoint writes left in `run_dir/checkpoints`; returns how many.

    For the run's writer, holding the run directory's lock, before it starts. A temp file whose writer
    (the pid in its name) is still alive is left alone: it is another process's write in progress.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return 0
    removed = 0
    for path in ckpt_dir.glob(".*.safetensors.*.tmp"):
        pid = writer_pid(path)
        if pid is not None and pid != os.getpid() and alive(pid):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed
