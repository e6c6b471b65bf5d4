"""Download (and optionally unpack) COCO 2017 with resume, retries and checksum verification.

Layout under `root` for a file NAME:
  NAME.part, .NAME.part.owner, NAME   the download in progress and its result (`centerpoint.io.http`)
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
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from centerpoint.data.unpack import unpack, unpacked_entries
from centerpoint.errors import CenterpointError
from centerpoint.io.atomic import atomic_write_text
from centerpoint.io.http import Bar, Expected, fetch, hash_file
from centerpoint.io.monitor import make_progress

__all__ = ["COCO2017", "DEFAULT_BASE_URL", "ENV_BASE_URL", "RemoteFile", "download_coco", "file_url"]

DEFAULT_BASE_URL = "http://images.cocodataset.org"
ENV_BASE_URL = "CENTERPOINT_COCO_URL"
# How an error of the fetcher ends: what the user can do about a server that fails or sends another file.
_HINT = f"point {ENV_BASE_URL} at another mirror (or --base-url) and rerun"


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


def _archive_is_good(archive: Path, remote: RemoteFile, bar: Bar) -> bool:
    """Trust a matching sidecar; otherwise re-hash an existing archive (and refresh the sidecar)."""
    if _sidecar_matches(archive, remote):
        return True
    if not archive.is_file():
        return False
    if archive.stat().st_size == remote.size:
        bar.reset(f"verify {remote.name}", completed=0)
        md5 = hashlib.md5()
        hash_file(archive, md5, bar.advance)
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
    with make_progress(enabled=progress, transfer=True) as bars:
        for part_name in dict.fromkeys(parts):  # de-duplicate, keep order
            remote = files[part_name]
            archive = root / remote.name
            done = unpacked_entries(root, remote.name) if unzip else None
            if done is None:
                bar = Bar(bars, remote.name, remote.size)
                if not _archive_is_good(archive, remote, bar):
                    fetch(file_url(base, remote), archive, Expected(remote.name, remote.size, remote.md5), bar,
                          hint=_HINT, retries=retries, backoff_s=backoff_s)
                    _write_sidecar(archive, remote)
                bar.reset(remote.name, completed=remote.size)
                done = unpack(archive, root, bars) if unzip else [archive]
            if delete:  # only reached with a marker in place, i.e. after a complete unpack
                archive.unlink(missing_ok=True)
                _sidecar(archive).unlink(missing_ok=True)
            results.extend(done)
    return results
