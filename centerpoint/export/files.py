"""Where an export is written: atomically, and only over a file an earlier export wrote.

Beside each export OUT lies its mark, `.OUT.centerpoint-export.json` (`written_by` and the sha256 of what
was written). An existing OUT is replaced only while its mark says an export wrote it and its content
still matches; anything else there (a user's file, a symlink, a directory, an edited export) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from centerpoint.errors import CenterpointError
from centerpoint.io.atomic import atomic_write_bytes, atomic_write_text

WRITTEN_BY = "centerpoint export"


def mark_path(out: Path) -> Path:
    """The hidden file beside `out` that says an export wrote it."""
    return out.with_name(f".{out.name}.centerpoint-export.json")


def _mark(out: Path) -> dict | None:
    """The mark's content when it is one of ours, else None (also when it is absent)."""
    try:
        mark = json.loads(mark_path(out).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and mark.get("written_by") == WRITTEN_BY else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_target(out: Path) -> None:
    """Refuse (CenterpointError) an OUT the export may not write, before any export work: a directory, a file
    that no earlier export wrote (or one changed since), a path under a file or in a folder it may not write.
    Creates nothing."""
    mark = mark_path(out)
    if out.is_symlink() or out.is_dir():
        raise CenterpointError(f"cannot write {out}: it is a {'symlink' if out.is_symlink() else 'directory'}; "
                               "name a new file")
    if out.exists() and not (_mark(out) and _mark(out).get("sha256") == _sha256(out)):
        raise CenterpointError(f"{out} already exists and was not written by centerpoint export (or was changed "
                               "since): name a new file; an export replaces only its own")
    if (mark.exists() or mark.is_symlink()) and _mark(out) is None:
        raise CenterpointError(f"cannot write {out}: {mark} exists and is not an export's mark; move it away")
    folder = out.parent  # created only when the export is written: nearest existing folder decides
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CenterpointError(f"cannot write {out}: {folder}, a parent of it, is a file, not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CenterpointError(f"cannot write {out}: no permission to write in {folder}")


def write_export(out: Path, data: bytes, description: dict) -> None:
    """Replace `out` with `data` atomically (the previous file, if any, stays whole until the rename), then
    its mark."""
    check_target(out)  # again: the export took a while
    try:
        atomic_write_bytes(out, data)
        mark = {"written_by": WRITTEN_BY, "sha256": hashlib.sha256(data).hexdigest(), **description}
        atomic_write_text(mark_path(out), json.dumps(mark, indent=1, sort_keys=True))
    except OSError as err:
        raise CenterpointError(f"cannot write {out}: {err.strerror or err}") from None
