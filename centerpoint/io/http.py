"""The one HTTP fetcher: a file downloaded with resume, retries and a checksum, never over anyone's file.

Layout beside the destination NAME:
  NAME.part          bytes received so far; resumed with an HTTP Range request on the next attempt/run
  .NAME.part.owner   marker written when the .part is created (the expected size and digest, the file's
                     device and inode): a .part is resumed, replaced or removed only while its marker vouches
                     for it; any other NAME.part is someone else's file and is refused
  NAME               created only by renaming a fully received .part whose digest matched

Network failures (and, when the size is known in advance, corrupt bytes) are retried with exponential
backoff; an attempt that kept new bytes resets the count. A server that sends another size, a URL that
answers 4xx, a full disk: errors at once, naming the file or URL. Used for COCO (`data/download.py`, md5
and size known) and published weights (`weights.py`, a sha256 prefix from the file name).

(A little over 300 lines: one protocol, resume + ownership + retry + verification, whose parts only make
sense together.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Literal
from urllib.error import HTTPError, URLError

from rich.progress import Progress, TaskID

from centerpoint.errors import CenterpointError
from centerpoint.io.atomic import atomic_write_text, fsync_dir

__all__ = ["Bar", "Expected", "fetch", "hash_file"]

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not per file: a stalled connection is retried, a slow one is not
MAX_BACKOFF_S = 60.0

# Failures of the network (not of the local disk) that a later attempt may not hit. ConnectionError and
# TimeoutError are OSError subclasses, but a full disk raises a plain OSError and is not retried.
_NETWORK_ERRORS = (URLError, HTTPException, ConnectionError, TimeoutError)
_RETRY_HTTP = (408, 429)  # client-side codes that mean "try again later", not "wrong URL"


@dataclass(frozen=True)
class Expected:
    """What a download must turn out to be."""

    name: str  # shown in messages and on the progress bar
    size: int | None  # bytes; None: not known in advance (the server's length is then the one checked)
    digest: str  # hex digest, or its first digits (published weights carry 8 of their sha256 in the name)
    algorithm: Literal["md5", "sha256"] = "md5"

    def describe(self) -> str:
        size = f"{self.size} bytes " if self.size is not None else ""
        return f"{size}{self.algorithm} {self.digest}"


class Bar:
    """One rich progress task; a thin wrapper so the download code does not care whether bars show."""

    def __init__(self, progress: Progress, description: str, total: int | None) -> None:
        self._progress = progress
        self._task: TaskID = progress.add_task(description, total=total)

    def reset(self, description: str, completed: int, total: int | None = None) -> None:
        # reset() also drops the speed samples, so re-hashing from disk does not show up as transfer speed
        self._progress.reset(self._task, completed=completed, total=total, description=description)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


class _Retryable(Exception):
    """An attempt failed in a way a later attempt may not (network trouble, corrupt bytes)."""

    def __init__(self, message: str, *, progressed: bool = False, got: str | None = None) -> None:
        super().__init__(message)
        self.progressed = progressed  # new bytes were kept, so the next attempt resumes further along
        self.got = got  # set for a verification failure: what was received instead


@dataclass
class _Partial:
    """The digest of the first `size` bytes of the .part, kept across attempts so a resume within one run
    does not re-read the file; -1 means "unknown, hash it from disk"."""

    size: int
    hash: hashlib._Hash


def hash_file(path: Path, digest: hashlib._Hash, on_chunk: Callable[[int], None] | None = None) -> int:
    """Feed the bytes of `path` into `digest`; returns how many were read."""
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            total += len(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return total


def _content_range(resp: HTTPResponse) -> tuple[int | None, int | None]:
    """(start, total) from `Content-Range: bytes START-END/TOTAL`; None for what is missing or `*`."""
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if not m:
        return None, None
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def _content_length(resp: HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.strip().isdigit() else None


def _open(url: str, have: int, hint: str) -> HTTPResponse:
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
        raise CenterpointError(f"download failed: {url} answered HTTP {e.code} {e.reason}; check the URL, or "
                               f"{hint}") from e
    except _NETWORK_ERRORS as e:
        raise _Retryable(str(e)) from e
    except ValueError as e:  # urllib's answer to a malformed URL, e.g. a base URL without http://
        raise CenterpointError(f"invalid download URL {url!r} ({e}); check the URL, or {hint}") from e


# ------------------------------------------------------------------------------------------------ .part


def _owner(part: Path) -> Path:
    return part.with_name(f".{part.name}.owner")


def _owner_info(part: Path, expected: Expected) -> dict:
    st = part.stat()
    return {"size": expected.size, expected.algorithm: expected.digest, "device": st.st_dev, "inode": st.st_ino}


def _own_part(part: Path, expected: Expected) -> bool:
    """Whether `part` is the file this module created for `expected` (its marker names it and that file)."""
    try:
        info = json.loads(_owner(part).read_text(encoding="utf-8"))
        return isinstance(info, dict) and info == _owner_info(part, expected)
    except (OSError, ValueError):
        return False


def _check_part(part: Path, expected: Expected) -> None:
    """Refuse a .part that this module did not create: it is someone else's file."""
    if (part.exists() or part.is_symlink()) and not _own_part(part, expected):
        raise CenterpointError(
            f"{part} exists but was not started by this downloader (no matching {_owner(part).name}); move or "
            "delete it, then rerun"
        )


def _create_part(part: Path, expected: Expected) -> None:
    """Create an empty .part and its marker; the marker is written before any byte is received."""
    _remove_part(part)
    with open(part, "xb"):
        pass
    atomic_write_text(_owner(part), json.dumps(_owner_info(part, expected)) + "\n")


def _remove_part(part: Path) -> None:
    """Remove a .part of ours (checked by the caller) and its marker."""
    part.unlink(missing_ok=True)
    _owner(part).unlink(missing_ok=True)


def _mismatch(part: Path, partial: _Partial, got: str) -> _Retryable:
    """Discard a .part whose bytes cannot be the expected file; the next attempt starts from zero."""
    _remove_part(part)
    partial.size = -1
    return _Retryable(f"verification failed, got {got}", got=got)


def _wrong_file(url: str, expected: Expected, got: str, hint: str) -> CenterpointError:
    """The server sends another file (a size known before the bytes arrive): no retry can change that."""
    return CenterpointError(f"{expected.name} from {url} is not the expected file: expected {expected.size} bytes, "
                            f"the server sends {got}; {hint}")


def _write_error(path: Path, err: OSError) -> CenterpointError:
    return CenterpointError(f"cannot write {path}: {err.strerror or err}; free some disk space or choose another "
                            "directory, then rerun (the download resumes from what was written)")


# --------------------------------------------------------------------------------------------- attempts


def _attempt(url: str, expected: Expected, part: Path, partial: _Partial, bar: Bar, hint: str) -> None:
    """One GET that extends `part`; returns only when `part` holds exactly the expected, verified bytes."""
    _check_part(part, expected)
    have = part.stat().st_size if part.exists() else 0
    if expected.size is not None and have > expected.size:  # cannot be a prefix of the expected file
        _remove_part(part)
        have = 0
    if partial.size != have:
        # Resuming a .part from an earlier run: its bytes must be hashed before new ones are appended.
        partial.hash, partial.size = hashlib.new(expected.algorithm), 0
        if have:
            bar.reset(f"verify {part.name}", completed=0)
            partial.size = hash_file(part, partial.hash, bar.advance)
    if have and have == expected.size:  # complete already; asking for `bytes=SIZE-` would only get a 416
        if not partial.hash.hexdigest().startswith(expected.digest):
            raise _mismatch(part, partial, f"{have} bytes {expected.algorithm} {partial.hash.hexdigest()}")
        return

    try:
        resp = _open(url, have, hint)
    except HTTPError as e:  # only a 416 for our resume offset gets here
        raise _mismatch(part, partial, f"HTTP {e.code} for a resume at byte {have}") from e
    with resp:
        if resp.status == 206:
            start, total = _content_range(resp)
            if start != have:
                raise _mismatch(part, partial, f"a range starting at {start} instead of {have}")
        else:
            # 200: the server ignored the Range header and sends the whole file, so start over.
            have, partial.hash, partial.size = 0, hashlib.new(expected.algorithm), 0
            total = _content_length(resp)
        if total is not None and expected.size is not None and total != expected.size:
            # fail before streaming gigabytes of the wrong file
            kind = "Range" if resp.status == 206 else "Length"
            raise _wrong_file(url, expected, f"{total} bytes (Content-{kind})", hint)
        if not have:
            _create_part(part, expected)
        bar.reset(expected.name, completed=have, total=expected.size or total)
        _stream(resp, expected, expected.size or total, part, partial, bar, url, hint)


def _stream(resp: HTTPResponse, expected: Expected, size: int | None, part: Path, partial: _Partial, bar: Bar,
            url: str, hint: str) -> None:
    """Append the response body to `part`, hashing as it goes, and check the result when it is complete
    (`size`: the whole file's length, when the expectation or the server tells it)."""
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
            if expected.size is not None and partial.size + len(chunk) > expected.size:
                f.close()
                _mismatch(part, partial, "")  # discards the .part
                raise _wrong_file(url, expected, f"more than {expected.size} bytes", hint)
            try:
                f.write(chunk)
            except OSError as e:
                raise _write_error(part, e) from e
            partial.hash.update(chunk)
            partial.size += len(chunk)
            bar.advance(len(chunk))
        if size is not None and partial.size < size:
            # http.client returns a short body silently when the peer closes early: keep it and resume.
            raise _Retryable(f"connection closed at byte {partial.size}", progressed=partial.size > start)
        try:
            f.flush()
            os.fsync(f.fileno())  # the rename to the final name must never expose unwritten blocks
        except OSError as e:
            raise _write_error(part, e) from e
    if not partial.hash.hexdigest().startswith(expected.digest):
        raise _mismatch(part, partial, f"{partial.size} bytes {expected.algorithm} {partial.hash.hexdigest()}")


# ------------------------------------------------------------------------------------------------- API


def fetch(url: str, dest: Path, expected: Expected, bar: Bar, *, hint: str, retries: int = 5,
          backoff_s: float = 1.0) -> None:
    """Download `url` into `dest` via `dest.part` (resumed if ours), retrying with exponential backoff.

    `dest` appears only complete and verified. `hint` ends the error messages: what the user can do
    instead (point at a mirror, download the file by hand). A digest mismatch is retried only when the
    size is known in advance (then it means corrupt bytes; otherwise most likely another file).
    """
    part = dest.with_name(dest.name + ".part")
    partial = _Partial(size=-1, hash=hashlib.new(expected.algorithm))
    failures = 0
    while True:
        try:
            _attempt(url, expected, part, partial, bar, hint)
            break
        except _Retryable as e:
            # An attempt that kept new bytes resets the count: a long download over a flaky link that
            # keeps making progress should finish rather than run out of retries.
            failures = 1 if e.progressed else failures + 1
            if failures <= retries and (e.got is None or expected.size is not None):
                time.sleep(min(backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))
                continue
            if e.got is not None:
                raise CenterpointError(
                    f"{expected.name} from {url} failed verification: expected {expected.describe()}, got "
                    f"{e.got}; the server is sending a different file: {hint}"
                ) from e
            resume = f" (it resumes from {part})" if part.exists() else ""
            raise CenterpointError(
                f"could not download {url} ({e}; {failures} attempts in a row failed); check the network and "
                f"rerun{resume}, or {hint}"
            ) from e
    os.replace(part, dest)
    _owner(part).unlink(missing_ok=True)
    fsync_dir(dest.parent)
