"""The built-in "shapes" dataset on disk: rendered once (`synthetic.render_sample`) into a COCO layout.

Layout: ``root/{train,val}/NNNNNN.jpg`` and ``root/annotations/instances_{train,val}.json``, plus the
``DONE`` manifest: the set's identity (seed, counts, version, classes) and every file's size and sha256.

Ownership: a dataset directory is the project's only when its ``DONE`` manifest lists every file in it
with the size and sha256 it was written with. Only such a directory (or an empty one) is ever replaced;
anything else at the target path is refused with an error, so a user's own data is never touched.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from centerpoint.data.synthetic import CLASSES, VERSION, render_sample
from centerpoint.errors import CenterpointError
from centerpoint.io.cache import TMP_MARKER, remove_stale_staging, staging_dir

_JPEG_QUALITY = 90
_MANIFEST = "DONE"
_STALE_TMP_S = 3600.0  # temp dirs older than this are leftovers of crashed runs, s



Digest = tuple[int, str]  # a file's size (bytes) and sha256 hex digest


def _digest(path: Path) -> Digest:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _write_one(job: tuple[str, int, str, int]) -> tuple[int, int, list[tuple[int, list[float]]], Digest]:
    """Render one image and save it as JPEG; returns (width, height, objects, file digest). Runs in workers."""
    out_dir, seed, split, index = job
    image, objects = render_sample(seed, split, index)
    path = Path(out_dir) / split / f"{index:06d}.jpg"
    image.save(path, quality=_JPEG_QUALITY)
    return image.width, image.height, objects, _digest(path)


def _identity(seed: int, num_train: int, num_val: int) -> dict:
    """What a dataset is: the manifest minus its file list."""
    return {"name": "shapes", "version": VERSION, "seed": seed, "num_train": num_train,
            "num_val": num_val, "classes": list(CLASSES)}


def _read_manifest(root: Path) -> dict | None:
    try:
        found = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _is_complete(root: Path, identity: dict) -> bool:
    found = _read_manifest(root)
    return found is not None and {k: v for k, v in found.items() if k != "files"} == identity and all(
        (root / "annotations" / f"instances_{s}.json").is_file() for s in ("train", "val")
    )


def is_shapes_dataset(root: Path, seed: int, num_train: int, num_val: int) -> bool:
    """Whether ``root`` holds the complete dataset for (seed, counts); reads only."""
    return _is_complete(Path(root).expanduser(), _identity(seed, num_train, num_val))


def _is_ours(root: Path) -> bool:
    """Whether ``root`` holds exactly the files its manifest lists, each with the listed size and sha256."""
    files = (_read_manifest(root) or {}).get("files")
    if not isinstance(files, dict):
        return False
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()} - {_MANIFEST, TMP_MARKER}
    if present != set(files):
        return False
    return all(list(_digest(root / rel)) == list(want) for rel, want in files.items())


def _refuse(root: Path) -> CenterpointError:
    return CenterpointError(
        f"{root} is not empty and is not a synthetic dataset written by centerpoint (its DONE manifest and "
        "file hashes do not match), so it is left alone: data.dataset=shapes generates only into an empty "
        "directory or the cache. For your own COCO-format data there use data.dataset=coco (what --data-dir "
        "means); otherwise choose another data.root")


def _check_target(root: Path) -> None:
    """Refuse, before any work, a target that holds something this module may not replace."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise _refuse(root)
    if root.is_dir() and any(root.iterdir()) and not _is_ours(root):
        raise _refuse(root)


def _remove_ours(root: Path) -> None:
    """Remove an empty directory or a dataset this module wrote (checked file by file); refuse anything else."""
    if not root.exists():
        return
    _check_target(root)
    if any(root.iterdir()):
        shutil.rmtree(root)
    else:
        root.rmdir()


def _coco_json(split: str, results: list[tuple[int, int, list[tuple[int, list[float]]], Digest]]) -> dict:
    images, annotations = [], []
    for index, (width, height, objects, _) in enumerate(results):
        image_id = index + 1  # 1-based: some tools treat id 0 as "missing"
        images.append({"id": image_id, "file_name": f"{index:06d}.jpg", "width": width, "height": height})
        for category_id, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    info = {"description": f"centerpoint synthetic shapes v{VERSION} ({split})", "version": str(VERSION)}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def _generate(tmp: Path, seed: int, counts: dict[str, int], workers: int,
              progress: Callable[[int, int], None] | None) -> dict[str, Digest]:
    """Write every image and the annotation files into ``tmp``; returns each file's digest by relative path."""
    jobs = [(str(tmp), seed, split, i) for split, n in counts.items() for i in range(n)]
    total, done = len(jobs), 0
    results: list[tuple[int, int, list[tuple[int, list[float]]], Digest]] = []
    if progress is not None:
        progress(0, total)
    if workers > 1:
        # spawn, not fork: the parent may hold torch thread pools that a forked child must not inherit.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_write_one, jobs, chunksize=16):  # imap keeps job order
                results.append(result)
                done += 1
                if progress is not None:
                    progress(done, total)
    else:
        for job in jobs:
            results.append(_write_one(job))
            done += 1
            if progress is not None:
                progress(done, total)
    files = {f"{split}/{index:06d}.jpg": r[3] for (_, _, split, index), r in zip(jobs, results, strict=True)}
    start = 0
    for split, n in counts.items():
        coco = _coco_json(split, results[start:start + n])
        start += n
        path = tmp / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(coco))
        files[f"annotations/{path.name}"] = _digest(path)
    return files


def ensure_shapes_dataset(
    root: Path,
    seed: int = 0,
    num_train: int = 3000,
    num_val: int = 300,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Make sure the shapes dataset for (seed, counts) is at ``root`` as COCO; return ``root``.

    A complete dataset (its ``DONE`` manifest matches seed, counts and version) is reused as is.
    Otherwise it is generated in a temp dir next to ``root``, the manifest (with every file's size and
    sha256) is written last and the directory renamed into place, so a crash never leaves a half-written
    dataset that looks complete. ``root`` must be absent, empty, or a dataset this module wrote (checked
    against its manifest); anything else raises a CenterpointError before any work, and is left as it is.
    ``progress(done, total)`` is called as images are written. ``workers`` defaults to up to 2
    processes; the output is identical for any worker count.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    root = Path(root).expanduser()
    identity = _identity(seed, num_train, num_val)
    if _is_complete(root, identity):
        return root
    _check_target(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root.parent, f".{root.name}.tmp-*", _STALE_TMP_S)  # what crashed runs left
    if workers is None:
        # Spawning workers costs about a second; not worth it for small sets.
        workers = 1 if num_train + num_val < 200 else min(2, os.cpu_count() or 1)
    with staging_dir(root.parent, f".{root.name}.tmp-") as tmp:
        for sub in ("train", "val", "annotations"):
            (tmp / sub).mkdir()
        try:
            files = _generate(tmp, seed, {"train": num_train, "val": num_val}, workers, progress)
            manifest = {**identity, "files": {rel: list(d) for rel, d in sorted(files.items())}}
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks tmp complete
        except OSError as err:  # a full disk, most likely: name what was being written
            raise CenterpointError(f"cannot write the synthetic dataset ({err.filename or tmp}): "
                                   f"{err.strerror or err}; free some space or set CENTERPOINT_CACHE") from None
        if _is_complete(root, identity):  # another process finished first
            return root
        _remove_ours(root)
        try:
            tmp.rename(root)
            (root / TMP_MARKER).unlink()  # kept until now: a killed run's temp dir is marked to its end
        except OSError:
            # Lost a race with a concurrent generator between removal and rename; theirs is as good.
            if not _is_complete(root, identity):
                raise
    return root
