"""Where `centerpoint predict` writes, without ever replacing a file of the user's.

The output directory may not be (or lie inside) an input directory or a recursive pattern's folder, nor
be the folder of an input file.
Each input gets its own drawing, named `<stem>.jpg`, or `<stem>-<8 hex digits of its absolute path>.jpg`
when another input would get the same name: unique, and the same for the same input on every run.
Beside the drawings: `detections.json` (`detection_entry`: COCO results entries, with each detection's
file, drawing and class name added) and `images.json` (a COCO dataset's `images` and `categories`: the id
of each input image, in predict's input order from 1, and the checkpoint's classes), so that pycocotools'
`COCO("images.json").loadRes("detections.json")` reads them.

An existing file is replaced only if an earlier `predict` wrote it, as its manifest
(`.centerpoint-predict.json` in the output directory: names and sha256 of the files it wrote) says and
its content still matches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from centerpoint.errors import CenterpointError
from centerpoint.evaluation.predict_in import input_folders
from centerpoint.io.atomic import atomic_write_text

RESULTS = "detections.json"
IMAGES = "images.json"
MANIFEST = ".centerpoint-predict.json"
LISTS = (RESULTS, IMAGES)  # the files predict writes beside the drawings


def drawing_names(files: Sequence[Path]) -> dict[Path, str]:
    """The drawing's file name for each input image."""
    plain = {f: f.stem + ".jpg" for f in files}
    sources: dict[str, set[Path]] = {}  # case-insensitive: some filesystems are
    for f, name in plain.items():
        sources.setdefault(name.lower(), set()).add(f.resolve())
    names = {}
    for f, name in plain.items():
        if len(sources[name.lower()]) > 1 or name.lower() in (*LISTS, MANIFEST):
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
    input_dirs = set(input_folders(inputs))
    folders = [d for d in input_dirs if _inside(target, d)] + [f.parent for f in files if f.resolve().parent == target]
    if folders:
        raise CenterpointError(f"--out {out} is (inside) {folders[0]}, a folder of input images: the drawings could "
                               "replace them; choose another --out")
    if out.exists() and not out.is_dir():
        raise CenterpointError(f"--out {out} is a file; choose a directory")
    manifest = read_manifest(out)
    clash = [out / n for n in [*names.values(), *LISTS] if (out / n).exists() or (out / n).is_symlink()]
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


def detection_entry(image_id: int, file: Path, drawing: str, box: Sequence[float], score: float, label: int,
                    names: Sequence[str], category_ids: Sequence[int]) -> dict:
    """One detection in detections.json: a COCO results entry (image_id, category_id: the checkpoint's COCO
    category id of the label, or the label when it records none; bbox [x, y, w, h] in image pixels; score)
    plus the input `file`, its `drawing` and the class name (`label`)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"image_id": image_id, "category_id": int(category_ids[label]) if category_ids else label,
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)], "score": round(score, 5),
            "file": str(file), "drawing": drawing, "label": names[label]}


def lists_json(results: list[dict], images: list[dict], names: Sequence[str],
               category_ids: Sequence[int]) -> dict[str, bytes]:
    """{file name: content} of detections.json and images.json (see the module docstring); images:
    {"id", "file_name", "width", "height"} of each input."""
    ids = [int(c) for c in category_ids] if category_ids else list(range(len(names)))
    coco = {"images": images, "annotations": [],
            "categories": [{"id": i, "name": n} for i, n in zip(ids, names, strict=True)]}
    return {RESULTS: json.dumps(results, indent=1).encode(), IMAGES: json.dumps(coco, indent=1).encode()}
