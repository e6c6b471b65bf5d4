"""What `centerpoint predict` reads: image files named directly, directories (searched recursively) and glob
patterns (`photos/*.jpg`, `shots/**/*.png`), expanded in a sorted, repeatable order."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from centerpoint.errors import CenterpointError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _is_pattern(path: Path) -> bool:
    """A path that does not exist and holds glob characters (* ? [): a pattern the shell left unexpanded
    (quoted, or a `**` the shell does not know)."""
    return not path.exists() and glob.has_magic(str(path))


def _images_under(folder: Path) -> list[Path]:
    """The image files anywhere below `folder`, sorted by path (symlinked folders are not followed: no
    cycles, no double counting)."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        found += [Path(parent) / n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """The image files the inputs name, in the inputs' order: a file as given, a directory's images
    recursively and a pattern's matching images (`**` spans folders), each sorted; a file reached twice
    is read once (its first place)."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += _images_under(p)
        elif p.is_file():
            files.append(p)
        elif _is_pattern(p):
            matched = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            images = [m for m in matched if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise CenterpointError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) match the pattern {p}")
            files += images
        else:
            raise CenterpointError(f"no such image or directory: {p}")
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise CenterpointError(f"no images ({kinds}) found in {', '.join(map(str, inputs))}")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def input_folders(inputs: Sequence[Path]) -> list[Path]:
    """The folders whose contents are inputs, resolved: each directory given, and the fixed leading folder
    of a recursive pattern (`shots/**/*.png`: shots), under which any new image would be read next time."""
    folders = []
    for p in map(Path, inputs):
        if p.is_dir():
            folders.append(p.resolve())
        elif _is_pattern(p) and "**" in str(p):
            fixed = _leading(p.parts)
            folders.append(Path(*fixed).resolve() if fixed else Path.cwd())
    return folders


def _leading(parts: Sequence[str]) -> list[str]:
    """The parts of a pattern before its first one with glob characters."""
    out = []
    for part in parts:
        if glob.has_magic(part):
            break
        out.append(part)
    return out
