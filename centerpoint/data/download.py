"""Download (and optionally unpack) COCO 2017 with resume, retries and checksum verification.

Layout under `root` for a file NAME:
  NAME.part          bytes received so far; resumed with an HTTP Range request on the next attempt/run
  .NAME.part.owner   marker written when the .part is created (the file's identity and the expected size
                     and md5): a .part is resumed, replaced or removed only while its marker vouches for it
  NAME               the archive, only ever created by renaming a fully verified .part
  NAME.verified      sidecar (size, md5, mtime) so a 19 GB archive is not re-hashed on every run
  .NAME.unpacked     marker written after the archive's top-level entries were moved into place
  .NAME.*.unpacking  temporary extraction directory, marked inside as ours (removed on failure, cleaned
                     up by the next run)

Nothing else is ever removed or overwritten: an archive or .part that is not what this module wrote is an
error naming it. Two processes downloading into the same root at once are not supported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from urllib.error import HTTPError, URLError

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from centerpoint.atomic import atomic_write_text, fsync_dir
from centerpoint.data.unpack import unpack, unpacked_entries
from centerpoint.errors import CenterpointError

__all__ = ["COCO2017", "DEFAULT_BASE_URL", "ENV_BASE_URL", "RemoteFile", "download_coco", "file_url"]

DEFAULT_BASE_URL = "http://images.cocodataset.org"
ENV_BASE_URL = "CENTERPOINT_COCO_URL"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not per file: a stalled connection is retried, a slow one is not
MAX_BACKOFF_S = 60.0

# Failures of the network (not of the local disk) that a later attempt may not hit. ConnectionError and
# TimeoutError are OSError subclasses, but a full disk raises a plain OSError and is not retried.
_NETWORK_ERRORS = (URLError, HTTPException, ConnectionError, TimeoutError)
_RETRY_HTTP = (408, 429)  # client-side codes that mean "try again later", not "wrong URL"


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its name, expected size and md5, and the URL folder under the base URL."""

    name: str
    size: int
    md5: str
    subdir: str = "zips"


COCO2017: dict[str, RemoteFile] = {
    "train": RemoteFile("train2017.zip", 19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2", "zips"),
    "val": RemoteFile("val2017.zip", 815_585_330, "442b8da7639aecaf257c1dceb8ba8c80", "zips"),
    "annotations": RemoteFile(
        "annotations_trainval2017.zip", 252_907_541, "f4bbac642086de4f52a3fdda2de5fa2c", "annotations"
    ),
}


def file_url(base_url: str, remote: RemoteFile) -> str:
    """`{base}/{subdir}/{name}`, tolerating a trailing slash on the base and an empty subdir."""
    parts = [base_url.rstrip("/"), remote.subdir.strip("/"), urllib.parse.quote(remote.name)]
    return "/".join(p for p in parts if p)


class _Retryable(Exception):
    """An attempt failed in a way a later attempt may not (network trouble, corrupt bytes)."""

    def __init__(self, message: str, *, progressed: bool = False, got: str | None = None) -> None:
        super().__init__(message)
        self.progressed = progressed  # new bytes were kept, so the next attempt resumes further along
        self.got = got  # set for a verification failure: what was received instead


@dataclass
class _Partial:
    """The md5 of the first `size` bytes of the .part, kept across attempts so a resume within one run
    does not re-read the file; -1 means "unknown, hash it from disk"."""

    size: int
    md5: hashlib._Hash


class _Bar:
    """One rich progress task; a thin wrapper so the download code does not care whether bars show."""

    def __init__(self, progress: Progress, description: str, total: int) -> None:
        self._progress = progress
        self._task: TaskID = progress.add_task(description, total=total)

    def reset(self, description: str, completed: int, total: int | None = None) -> None:
        # reset() also drops the speed samples, so re-hashing from disk does not show up as transfer speed
        self._progress.reset(self._task, completed=completed, total=total, description=description)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


def _progress(enabled: bool) -> Progress:
    # stderr keeps stdout clean for the CLI's own output. Bars only on a terminal, and transient: they vanish
    # when the downloads end, so a failure leaves its one `error:` line alone (rich would also end a
    # non-terminal display with an empty line).
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_interactive),
        transient=True,
    )


def _hash_file(path: Path, md5: hashlib._Hash, on_chunk: Callable[[int], None]) -> int:
    """Feed the bytes of `path` into `md5`; returns how many were read."""
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            md5.update(chunk)
            total += len(chunk)
            on_chunk(len(chunk))
    return total


# ---------------------------------------------------------------------------------------------- sidecar


def _sidecar(archive: Path) -> Path:
    return archive.with_name(archive.name + ".verified")


def _sidecar_matches(archive: Path, remote: RemoteFile) -> bool:
    """True when the sidecar vouches for the archive as it is now (same size, md5 and mtime)."""
    try:
        st = archive.stat()
        info = json.loads(_sidecar(archive).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and info.get("size") == remote.size == st.st_size
        and info.get("md5") == remote.md5
        and info.get("mtime_ns") == st.st_mtime_ns
    )


def _write_sidecar(archive: Path, remote: RemoteFile) -> None:
    info = {"size": remote.size, "md5": remote.md5, "mtime_ns": archive.stat().st_mtime_ns}
    atomic_write_text(_sidecar(archive), json.dumps(info) + "\n")


def _archive_is_good(archive: Path, remote: RemoteFile, bar: _Bar) -> bool:
    """Trust a matching sidecar; otherwise re-hash an existing archive (and refresh the sidecar)."""
    if _sidecar_matches(archive, remote):
        return True
    if not archive.is_file():
        return False
    if archive.stat().st_size == remote.size:
        bar.reset(f"verify {remote.name}", completed=0)
        md5 = hashlib.md5()
        _hash_file(archive, md5, bar.advance)
        if md5.hexdigest() == remote.md5:
            _write_sidecar(archive, remote)
            return True
    # A final name with the wrong content (a truncated copy, an older release) was not written by this
    # module, which only renames verified files there: it is not ours to replace.
    size = archive.stat().st_size
    got = f"{size} bytes, expected {remote.size}" if size != remote.size else f"md5 differs from {remote.md5}"
    raise CenterpointError(
        f"{archive} exists but is not the expected {remote.name} ({got}); it is left as it is: move or delete "
        "it, then rerun to download it"
    )


# --------------------------------------------------------------------------------------------- download


def _content_range(resp: HTTPResponse) -> tuple[int | None, int | None]:
    """(start, total) from `Content-Range: bytes START-END/TOTAL`; None for what is missing or `*`."""
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if not m:
        return None, None
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def _content_length(resp: HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.strip().isdigit() else None


def _open(url: str, have: int) -> HTTPResponse:
    """Send the GET (with a Range header when resuming); classify failures as retryable or fatal."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except HTTPError as e:
        e.close()
        if e.code >= 500 or e.code in _RETRY_HTTP:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from e
        if e.code == 416 and have:
            # The server cannot serve our offset; the caller discards the .part and starts over.
            raise
        raise CenterpointError(
            f"download failed: {url} answered HTTP {e.code} {e.reason}; check the URL "
            f"(or point {ENV_BASE_URL} at a working mirror) and rerun"
        ) from e
    except _NETWORK_ERRORS as e:
        raise _Retryable(str(e)) from e
    except ValueError as e:  # urllib's answer to a malformed URL, e.g. a base URL without http://
        raise CenterpointError(
            f"invalid download URL {url!r} ({e}); fix {ENV_BASE_URL} or the base URL"
        ) from e


def _owner(part: Path) -> Path:
    return part.with_name(f".{part.name}.owner")


def _own_part(part: Path, remote: RemoteFile) -> bool:
    """Whether `part` is the file this module created for `remote` (its marker names it and that file)."""
    try:
        info = json.loads(_owner(part).read_text(encoding="utf-8"))
        st = part.stat()
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info == {"size": remote.size, "md5": remote.md5, "device": st.st_dev,
                                               "inode": st.st_ino}


def _check_part(part: Path, remote: RemoteFile) -> None:
    """Refuse a .part that this module did not create: it is someone else's file."""
    if (part.exists() or part.is_symlink()) and not _own_part(part, remote):
        raise CenterpointError(
            f"{part} exists but was not started by this downloader (no matching {_owner(part).name}); move or "
            "delete it, then rerun"
        )


def _create_part(part: Path, remote: RemoteFile) -> None:
    """Create an empty .part and its marker; the marker is written before any byte is received."""
    _remove_part(part)
    with open(part, "xb"):
        pass
    st = part.stat()
    info = {"size": remote.size, "md5": remote.md5, "device": st.st_dev, "inode": st.st_ino}
    atomic_write_text(_owner(part), json.dumps(info) + "\n")


def _remove_part(part: Path) -> None:
    """Remove a .part of ours (checked by the caller) and its marker."""
    part.unlink(missing_ok=True)
    _owner(part).unlink(missing_ok=True)


def _mismatch(part: Path, partial: _Partial, got: str) -> _Retryable:
    """Discard a .part whose bytes cannot be the expected file; the next attempt starts from zero."""
    _remove_part(part)
    partial.size = -1
    return _Retryable(f"verification failed, got {got}", got=got)


def _wrong_file(url: str, remote: RemoteFile, got: str) -> CenterpointError:
    """The server sends another file (a size known before the bytes arrive): no retry can change that."""
    return CenterpointError(
        f"{remote.name} from {url} is not the expected file: expected {remote.size} bytes, the server sends "
        f"{got}; point {ENV_BASE_URL} at another mirror (or --base-url) and rerun"
    )


def _attempt(url: str, remote: RemoteFile, part: Path, partial: _Partial, bar: _Bar) -> None:
    """One GET that extends `part`; returns only when `part` holds exactly the expected, verified bytes."""
    _check_part(part, remote)
    have = part.stat().st_size if part.exists() else 0
    if have > remote.size:  # cannot be a prefix of the expected file
        _remove_part(part)
        have = 0
    if partial.size != have:
        # Resuming a .part from an earlier run: its bytes must be hashed before new ones are appended.
        partial.md5, partial.size = hashlib.md5(), 0
        if have:
            bar.reset(f"verify {part.name}", completed=0)
            partial.size = _hash_file(part, partial.md5, bar.advance)
    if have == remote.size:  # complete already; asking for `bytes=SIZE-` would only get a 416
        if partial.md5.hexdigest() != remote.md5:
            raise _mismatch(part, partial, f"{have} bytes md5 {partial.md5.hexdigest()}")
        return

    try:
        resp = _open(url, have)
    except HTTPError as e:  # only a 416 for our resume offset gets here
        raise _mismatch(part, partial, f"HTTP {e.code} for a resume at byte {have}") from e
    with resp:
        if resp.status == 206:
            start, total = _content_range(resp)
            if start != have:
                raise _mismatch(part, partial, f"a range starting at {start} instead of {have}")
        else:
            # 200: the server ignored the Range header and sends the whole file, so start over.
            have, partial.md5, partial.size = 0, hashlib.md5(), 0
            total = _content_length(resp)
        if total is not None and total != remote.size:  # fail before streaming gigabytes of the wrong file
            raise _wrong_file(url, remote, f"{total} bytes (Content-{'Range' if resp.status == 206 else 'Length'})")
        if not have:
            _create_part(part, remote)
        bar.reset(remote.name, completed=have)
        _stream(resp, remote, part, partial, bar, url)


def _stream(resp: HTTPResponse, remote: RemoteFile, part: Path, partial: _Partial, bar: _Bar, url: str) -> None:
    """Append the response body to `part`, hashing as it goes, and check the result when it is complete."""
    start = partial.size
    with open(part, "ab") as f:
        while True:
            try:
                chunk = resp.read(CHUNK_BYTES)
            except _NETWORK_ERRORS as e:
                raise _Retryable(
                    f"connection lost at byte {partial.size}: {e}", progressed=partial.size > start
                ) from e
            if not chunk:
                break
            if partial.size + len(chunk) > remote.size:
                f.close()
                _mismatch(part, partial, "")  # discards the .part
                raise _wrong_file(url, remote, f"more than {remote.size} bytes")
            try:
                f.write(chunk)
            except OSError as e:
                raise _write_error(part, e) from e
            partial.md5.update(chunk)
            partial.size += len(chunk)
            bar.advance(len(chunk))
        if partial.size < remote.size:
            # http.client returns a short body silently when the peer closes early: keep it and resume.
            raise _Retryable(f"connection closed at byte {partial.size}", progressed=partial.size > start)
        try:
            f.flush()
            os.fsync(f.fileno())  # the rename to the final name must never expose unwritten blocks
        except OSError as e:
            raise _write_error(part, e) from e
    if partial.md5.hexdigest() != remote.md5:
        raise _mismatch(part, partial, f"{partial.size} bytes md5 {partial.md5.hexdigest()}")


def _write_error(path: Path, err: OSError) -> CenterpointError:
    return CenterpointError(f"cannot write {path}: {err.strerror or err}; free some disk space or pick another "
                            "--root (the download resumes from what was written)")


def _download(url: str, remote: RemoteFile, archive: Path, retries: int, backoff_s: float, bar: _Bar) -> None:
    """Fetch `url` into `archive` via `archive.part`, retrying with exponential backoff."""
    part = archive.with_name(archive.name + ".part")
    partial = _Partial(size=-1, md5=hashlib.md5())
    failures = 0
    while True:
        try:
            _attempt(url, remote, part, partial, bar)
            break
        except _Retryable as e:
            # An attempt that kept new bytes resets the count: a long download over a flaky link that
            # keeps making progress should finish rather than run out of retries.
            failures = 1 if e.progressed else failures + 1
            if failures <= retries:
                time.sleep(min(backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))
                continue
            if e.got is not None:
                raise CenterpointError(
                    f"{remote.name} from {url} failed verification: expected {remote.size} bytes md5 "
                    f"{remote.md5}, got {e.got}; the server is sending a different file: point "
                    f"{ENV_BASE_URL} at another mirror and rerun"
                ) from e
            resume = f" (it resumes from {part})" if part.exists() else ""
            raise CenterpointError(
                f"could not download {url} ({e}; {failures} attempts in a row failed); check the network "
                f"or point {ENV_BASE_URL} at a mirror, then rerun{resume}"
            ) from e
    os.replace(part, archive)
    _owner(part).unlink(missing_ok=True)
    fsync_dir(archive.parent)
    _write_sidecar(archive, remote)


# ------------------------------------------------------------------------------------------------- API


def download_coco(
    root: Path,
    parts: Sequence[str] = ("train", "val", "annotations"),
    base_url: str | None = None,
    unzip: bool = False,
    delete: bool = False,
    files: Mapping[str, RemoteFile] = COCO2017,
    retries: int = 5,
    backoff_s: float = 1.0,
    progress: bool = True,
) -> list[Path]:
    """Download the requested parts of `files` into `root`, verified; optionally unpack them.

    The base URL is `base_url`, else `$CENTERPOINT_COCO_URL`, else the official server. Interrupted
    downloads resume; verified archives and completed unpacks are skipped on later runs. `delete` removes
    each archive once it is completely unpacked and therefore needs `unzip`.

    Returns, per part in order, the archive path, or with `unzip` the unpacked top-level entries
    (e.g. `root/train2017`).
    """
    unknown = [p for p in parts if p not in files]
    if unknown:
        raise CenterpointError(f"unknown COCO part {unknown[0]!r}; choose from: {', '.join(files)}")
    if delete and not unzip:
        raise CenterpointError(
            "--delete removes archives after unpacking them; add --unzip (or drop --delete)"
        )
    if retries < 0 or backoff_s < 0:
        raise CenterpointError(f"retries ({retries}) and backoff ({backoff_s}s) must not be negative")
    base = base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CenterpointError(f"cannot create the data root {root} ({e}); pick another --root") from e

    results: list[Path] = []
    with _progress(progress) as bars:
        for part_name in dict.fromkeys(parts):  # de-duplicate, keep order
            remote = files[part_name]
            archive = root / remote.name
            done = unpacked_entries(root, remote.name) if unzip else None
            if done is None:
                bar = _Bar(bars, remote.name, remote.size)
                if not _archive_is_good(archive, remote, bar):
                    _download(file_url(base, remote), remote, archive, retries, backoff_s, bar)
                bar.reset(remote.name, completed=remote.size)
                done = unpack(archive, root, bars) if unzip else [archive]
            if delete:  # only reached with a marker in place, i.e. after a complete unpack
                archive.unlink(missing_ok=True)
                _sidecar(archive).unlink(missing_ok=True)
            results.extend(done)
    return results
