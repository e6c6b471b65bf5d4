"""Unpack a downloaded zip into its root: every entry name checked first, extraction into a marked temporary
directory, then the top-level entries moved into place and a marker written last.

Under `root` for an archive NAME: `.NAME.unpacked` lists the top-level entries a complete unpack made;
`.NAME.*.unpacking` is the temporary extraction directory (`cache.staging_dir`: marked from its first
moment, and only marked ones are cleaned up by a later run). An existing top-level entry without the
marker is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

from rich.progress import Progress

from centerpoint.errors import CenterpointError
from centerpoint.io.atomic import atomic_write_text, fsync_dir
from centerpoint.io.cache import remove_stale_staging, staging_dir


def _marker(root: Path, name: str) -> Path:
    return root / f".{name}.unpacked"


def unpacked_entries(root: Path, name: str) -> list[Path] | None:
    """The entries a previous complete unpack produced, or None if that has to be done (again)."""
    try:
        info = json.loads(_marker(root, name).read_text(encoding="utf-8"))
        entries = [root / entry for entry in info["entries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entries if all(p.exists() for p in entries) else None


def _top_level_entries(archive: Path, root: Path, names: list[str]) -> list[str]:
    """Validate every member name (zip-slip) and return the archive's top-level names, sorted.

    Everything is checked before anything is written, so a hostile archive leaves no trace. zipfile
    would silently sanitize `../x` to `x`; refusing is clearer than extracting somewhere unexpected.
    """
    real_root = root.resolve()
    tops: set[str] = set()
    for name in names:
        parts = re.split(r"[/\\]", name)  # backslashes too: archives made on Windows use them
        escapes = not (root / name).resolve().is_relative_to(real_root)
        if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts or escapes:
            raise CenterpointError(
                f"refusing to unpack {archive}: entry {name!r} would be written outside {root}; "
                "the archive is unsafe, delete it and download it again from a trusted source"
            )
        # Same rule as zipfile's own extraction: empty and "." components are dropped.
        kept = [p for p in name.split("/") if p not in ("", ".")]
        if kept:
            tops.add(kept[0])
    return sorted(tops)


def unpack(archive: Path, root: Path, progress: Progress) -> list[Path]:
    """Extract into a hidden temporary directory under root, then move the top-level entries into place.

    A crash leaves at most the temporary directory (removed by the next attempt), never a half-filled
    `ROOT/train2017`. The marker is written last, so its presence means the unpack completed.
    """
    remove_stale_staging(root, f".{archive.name}.*.unpacking")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise CenterpointError(
            f"cannot open {archive} as a zip ({e}); delete it and rerun to download it again"
        ) from e
    with zf:
        infos = zf.infolist()
        tops = _top_level_entries(archive, root, [i.filename for i in infos])
        for top in tops:
            if (root / top).exists() or (root / top).is_symlink():
                raise CenterpointError(
                    f"{root / top} already exists but {_marker(root, archive.name)} does not, so it may be a "
                    "partial or foreign copy; move or delete it and rerun"
                )
        task = progress.add_task(f"unpack {archive.name}", total=sum(i.file_size for i in infos))
        try:
            with staging_dir(root, f".{archive.name}.", ".unpacking") as tmp:
                for info in infos:
                    zf.extract(info, tmp)
                    progress.advance(task, info.file_size)
                for top in tops:
                    os.replace(tmp / top, root / top)
        except OSError as e:
            raise CenterpointError(
                f"cannot unpack {archive}: cannot write {e.filename or root}: {e.strerror or e}; check free "
                "disk space and rerun"
            ) from e
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as e:  # corrupt, encrypted, ...
            raise CenterpointError(f"cannot unpack {archive} ({e}); delete it and rerun to download it again") from e
    fsync_dir(root)
    atomic_write_text(_marker(root, archive.name), json.dumps({"archive": archive.name, "entries": tops}) + "\n")
    return [root / top for top in tops]
