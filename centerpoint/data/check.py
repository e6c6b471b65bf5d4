"""`centerpoint data check`: find what is wrong with a dataset before a long run trips over it.

Per split: the annotation json's structure (the same validation training uses), every image file
(present, header readable by PIL's `verify()`, or fully decoded with `decode=True`, checked in a
thread pool; the size against the json's width/height), box sanity (zero or negative size, outside the
image, below `data.min_box_size`, crowd), images without boxes, and boxes and images per class.

Blocking problems are those that would stop or silently spoil training: classes that do not match
`model.num_classes`, missing or undecodable images under `data.on_bad_image: fail`, a split left without
usable images. Everything else is a warning: training drops and counts it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from centerpoint.data.coco_json import load_coco
from centerpoint.data.images import decode as decode_image
from centerpoint.data.images import open_image
from centerpoint.data.images import verify as verify_image
from centerpoint.data.size_stats import SplitSizes
from centerpoint.errors import CenterpointError
from centerpoint.spec import ExperimentSpec

Progress = Callable[[int], None]


@dataclass
class SplitReport:
    """What the check found in one split. Lists hold file names (first few kept in messages)."""

    split: str
    ann_file: Path
    image_dir: Path
    images: int = 0
    boxes: int = 0
    crowd: int = 0
    missing: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    degenerate_boxes: int = 0  # zero, negative or non-finite width/height, or nothing left inside the image
    clipped_boxes: int = 0  # partly outside the image
    small_boxes: int = 0  # below data.min_box_size (train split: dropped by training)
    images_without_boxes: int = 0
    class_boxes: dict[str, int] = field(default_factory=dict)
    class_images: dict[str, int] = field(default_factory=dict)
    blocking: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sizes: SplitSizes | None = None  # image and usable box sizes, objects per image (`size_stats`)


def _check_image(path: Path, size: tuple[int, int], decode: bool, max_pixels: int) -> tuple[str, str]:
    """('ok' | 'missing' | 'undecodable' | 'size', detail) for one image file; size is (width, height).
    Opened through the same door, with the same pixel limit, as training (`images.open_image`)."""
    try:
        with open_image(str(path), max_pixels) as img:
            found = img.size
            decode_image(img, str(path)) if decode else verify_image(img, str(path))
    except CenterpointError as err:
        if not path.exists():
            return "missing", ""
        text = str(err).replace(f"cannot decode image {path}: ", "").replace(f"image {path} ", "")
        return "undecodable", text[:160]
    if found != size:
        return "size", f"{found[0]}x{found[1]}, json {size[0]}x{size[1]}"
    return "ok", ""


def _first(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_split(spec: ExperimentSpec, root: Path, split: str, decode: bool = False, threads: int | None = None,
                progress: Progress | None = None) -> SplitReport:
    """Check one split ('train' or 'val') of the dataset under `root` as `spec` would read it."""
    d = spec.data
    ann, images = (d.train_ann, d.train_images) if split == "train" else (d.val_ann, d.val_images)
    report = SplitReport(split, root / ann, root / images)
    if not report.ann_file.is_file():
        raise CenterpointError(f"{split} annotations not found: {report.ann_file} (data.{split}_ann: {ann}, under "
                               f"data.root / --data-dir {root}); set --set data.{split}_ann=PATH relative to the root")
    if not report.image_dir.is_dir():
        raise CenterpointError(f"image directory not found: {report.image_dir} (data.{split}_images: {images}, under "
                               f"data.root / --data-dir {root}); set data.{split}_images=DIR relative to the root")
    coco = load_coco(report.ann_file)  # structure errors are blocking at once, with the json's own message
    entries = [coco.imgs[i] for i in sorted(coco.getImgIds())]
    report.images = len(entries)
    sizes = [(int(e["width"]), int(e["height"])) for e in entries]  # load_coco checked them
    names = [e["file_name"] for e in entries]
    _check_boxes(report, coco, spec, split, dict(zip([e["id"] for e in entries], sizes, strict=True)))
    _check_files(report, names, sizes, decode, d.max_image_pixels, threads, progress)
    _judge(report, spec, len(coco.getCatIds()))
    return report


def _check_boxes(report: SplitReport, coco, spec: ExperimentSpec, split: str,  # noqa: ANN001 - a pycocotools COCO
                 size_of: dict[int, tuple[int, int]]) -> None:
    """Box sanity and per-class counts, vectorised over all annotations."""
    anns = [a for a in coco.dataset["annotations"]]
    report.crowd = sum(1 for a in anns if a.get("iscrowd", 0))
    anns = [a for a in anns if not a.get("iscrowd", 0)]
    report.boxes = len(anns)
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)  # load_coco: 4 numbers each
    wh = np.array([size_of[a["image_id"]] for a in anns], dtype=np.float64).reshape(-1, 2)
    finite = np.isfinite(xywh).all(axis=1)
    x1, y1 = xywh[:, 0], xywh[:, 1]
    x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
    cw = np.clip(x2, 0, wh[:, 0]) - np.clip(x1, 0, wh[:, 0])
    ch = np.clip(y2, 0, wh[:, 1]) - np.clip(y1, 0, wh[:, 1])
    degenerate = ~finite | (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0) | (cw <= 0) | (ch <= 0)
    clipped = ~degenerate & ((x1 < 0) | (y1 < 0) | (x2 > wh[:, 0]) | (y2 > wh[:, 1]))
    min_side = spec.data.min_box_size if split == "train" else 0.0
    small = ~degenerate & ((cw < min_side) | (ch < min_side))
    report.degenerate_boxes, report.clipped_boxes = int(degenerate.sum()), int(clipped.sum())
    report.small_boxes = int(small.sum())
    usable = ~degenerate & ~small
    names = {c: coco.cats[c]["name"] for c in sorted(coco.getCatIds())}
    report.class_boxes = dict.fromkeys(names.values(), 0)
    report.class_images = dict.fromkeys(names.values(), 0)
    seen: set[tuple[int, int]] = set()
    for a, ok in zip(anns, usable, strict=True):
        if ok:
            report.class_boxes[names[a["category_id"]]] += 1
            seen.add((a["image_id"], a["category_id"]))
    for _, cat in seen:
        report.class_images[names[cat]] += 1
    with_boxes = {img for img, _ in seen}
    report.images_without_boxes = report.images - len(with_boxes)
    image_ids = sorted(size_of)
    row_of = {img: i for i, img in enumerate(image_ids)}
    per_image = np.bincount([row_of[a["image_id"]] for a, ok in zip(anns, usable, strict=True) if ok],
                            minlength=len(image_ids))
    report.sizes = SplitSizes(np.array([size_of[i] for i in image_ids], dtype=np.float64).reshape(-1, 2),
                              np.stack([cw, ch], axis=1)[usable], per_image)


def _check_files(report: SplitReport, names: list[str], sizes: list[tuple[int, int]], decode: bool,
                 max_pixels: int, threads: int | None, progress: Progress | None) -> None:
    """Every image file, in a thread pool (PIL releases the GIL while reading and decoding)."""
    threads = threads or min(32, 4 * (os.cpu_count() or 1))

    def one(i: int) -> tuple[str, str]:
        return _check_image(report.image_dir / names[i], sizes[i], decode, max_pixels)

    with ThreadPoolExecutor(threads) as pool:
        for i, (status, detail) in enumerate(pool.map(one, range(len(names)), chunksize=64)):
            if status == "missing":
                report.missing.append(names[i])
            elif status == "undecodable":
                report.undecodable.append(f"{names[i]} ({detail})")
            elif status == "size":
                report.size_mismatch.append(f"{names[i]} ({detail})")
            if progress is not None:
                progress(1)


def _judge(report: SplitReport, spec: ExperimentSpec, num_classes: int) -> None:
    """Sort the findings into blocking problems and warnings."""
    r, s = report, report.split
    if spec.model.num_classes is not None and num_classes != spec.model.num_classes:
        r.blocking.append(f"{s}: {num_classes} categories in {r.ann_file.name} but model.num_classes="
                          f"{spec.model.num_classes} (set --set model.num_classes={num_classes})")
    bad_files = [("missing", r.missing), ("undecodable", r.undecodable)]
    for what, names in bad_files:
        if names:
            text = f"{s}: {len(names)} {what} image(s): {_first(names)}"
            if spec.data.on_bad_image == "fail":
                r.blocking.append(text + " (training stops at the first; fix them or set data.on_bad_image=skip)")
            else:
                r.warnings.append(text + " (skipped and counted: data.on_bad_image=skip)")
    if r.images and s == "train" and r.images_without_boxes == r.images:
        r.blocking.append(f"train: none of the {r.images} images has a usable box; nothing to train on")
    elif r.images_without_boxes and s == "train":
        r.warnings.append(f"train: {r.images_without_boxes} image(s) without a usable box: left out of training")
    if r.size_mismatch:
        r.warnings.append(f"{s}: {len(r.size_mismatch)} image(s) differ from the json's width/height: "
                          f"{_first(r.size_mismatch)}")
    if r.degenerate_boxes:
        r.warnings.append(f"{s}: {r.degenerate_boxes} box(es) of zero, negative or non-finite size or outside "
                          "their image: dropped")
    if r.small_boxes:
        r.warnings.append(f"{s}: {r.small_boxes} box(es) below data.min_box_size={spec.data.min_box_size}: dropped")
    empty = [name for name, n in r.class_boxes.items() if n == 0]
    if empty:
        r.warnings.append(f"{s}: no boxes of class(es) {_first(empty, 5)}")


def blocking_problems(reports: list[SplitReport]) -> list[str]:
    """All blocking problems of the checked splits, in order."""
    return [p for r in reports for p in r.blocking]
