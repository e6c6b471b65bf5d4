"""Where `centerpoint predict` writes, without ever replacing a file of the user's.

The output directory may not be (or lie inside) an input directory, nor be the folder of an input file.
Each input gets its own drawing, named `<stem>.jpg`, or `<stem>-<8 hex digits of its absolute path>.jpg`
when another input (or `detections.json`) would get the same name: unique, and the same for the same
input on every run. An existing file is replaced only if an earlier `predict` wrote it, as its manifest
(`.centerpoint-predict.json` in the output directory: names and sha256 of the files it wrote) says and
its content still matches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from centerpoint.errors import CenterpointError
from centerpoint.io.atomic import atomic_write_text

RESULTS = "detections.json"
MANIFEST = ".centerpoint-predict.json"


def drawing_names(files: Sequence[Path]) -> dict[Path, str]:
    """The drawing's file name for each input image."""
    plain = {f: f.stem + ".jpg" for f in files}
    sources: dict[str, set[Path]] = {}  # case-insensitive: some filesystems are
    for f, name in plain.items():
        sources.setdefault(name.lower(), set()).add(f.resolve())
    names = {}
    for f, name in plain.items():
        if len(sources[name.lower()]) > 1 or name.lower() in (RESULTS, MANIFEST):
            name = f"{f.stem}-{hashlib.sha1(str(f.resolve()).encode()).hexdigest()[:8]}.jpg"
        names[f] = name
    return names


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(out: Path) -> dict[str, str]:
    """{file name: sha256} of the files earlier predict runs wrote into `out` ({} when there is none)."""
    try:
        files = json.loads((out / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def _ours(path: Path, manifest: dict[str, str]) -> bool:
    want = manifest.get(path.name)
    try:
        return want is not None and path.is_file() and not path.is_symlink() and sha256(path.read_bytes()) == want
    except OSError:
        return False


def check_outputs(inputs: Sequence[Path], files: Sequence[Path], out: Path, names: dict[Path, str]) -> None:
    """Refuse (CenterpointError) an output directory that holds inputs or files predict did not write."""
    target = out.resolve()
    input_dirs = {Path(p).resolve() for p in inputs if Path(p).is_dir()}
    folders = [d for d in input_dirs if _inside(target, d)] + [f.parent for f in files if f.resolve().parent == target]
    if folders:
        raise CenterpointError(f"--out {out} is (inside) {folders[0]}, a folder of input images: the drawings could "
                               "replace them; choose another --out")
    if out.exists() and not out.is_dir():
        raise CenterpointError(f"--out {out} is a file; choose a directory")
    manifest = read_manifest(out)
    clash = [out / n for n in [*names.values(), RESULTS] if (out / n).exists() or (out / n).is_symlink()]
    foreign = [p for p in clash if not _ours(p, manifest)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise CenterpointError(f"--out {out} already holds {foreign[0].name}{more}, not written by centerpoint "
                               "predict; choose an empty --out (predict replaces only its own files)")


def record(out: Path, written: dict[str, str]) -> None:
    """Add the files just written ({name: sha256}) to the output directory's manifest."""
    if written:
        files = {**read_manifest(out), **written}
        atomic_write_text(out / MANIFEST, json.dumps({"written_by": "centerpoint predict", "files": files},
                                                     indent=1, sort_keys=True))
