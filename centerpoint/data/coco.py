"""COCO-format dataset index: image files, boxes (xyxy pixels) and contiguous labels per image.

Labels are contiguous 0..C-1 in the order of the json's category ids; crowd boxes are ignored;
boxes are clipped to the image and degenerate ones (zero, negative or non-finite size, nothing left inside
the image) dropped (counted in `dropped_boxes`). The json's content is checked as a whole on loading
(`coco_json.validate_coco`), so nothing here meets a malformed entry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from centerpoint.data.coco_json import build_coco, load_coco
from centerpoint.errors import CenterpointError


@dataclass(frozen=True)
class CocoIndex:
    """One split of a COCO-format dataset, ready for the data pipeline.

    boxes[i]: (n_i, 4) float32 xyxy in original image pixels; labels[i]: (n_i,) int64 in 0..C-1.
    """

    coco: COCO
    ann_file: Path
    image_dir: Path
    image_ids: tuple[int, ...]
    file_names: tuple[str, ...]
    sizes: np.ndarray  # (N, 2) int: height, width
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    cat_ids: tuple[int, ...]  # contiguous label -> COCO category id
    class_names: tuple[str, ...]
    dropped_boxes: int
    dropped_images: int

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)


def _without_nonfinite_boxes(coco: COCO) -> tuple[COCO, int]:
    """`coco` without the annotations whose bbox holds NaN or an infinity (json's NaN / Infinity), and how
    many there were. They are dropped like boxes of zero size, also from the evaluation's ground truth
    (COCOeval would compute NaN overlaps with them)."""
    anns = coco.dataset["annotations"]
    finite = np.isfinite(np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)).all(axis=1)
    if finite.all():
        return coco, 0
    kept = [a for a, ok in zip(anns, finite.tolist(), strict=True) if ok]
    return build_coco(COCO, {**coco.dataset, "annotations": kept}), int((~finite).sum())


def load_index(ann_file: Path, image_dir: Path, train: bool, min_box_size: float = 1.0,
               min_image_size: int = 0) -> CocoIndex:
    """Index a split. In training, images without usable boxes or smaller than `min_image_size`
    (shorter side, pixels) are left out; in evaluation every image is kept."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not image_dir.is_dir():
        raise CenterpointError(f"image directory not found: {image_dir} (check --data-dir and data.*_images)")
    coco, nonfinite = _without_nonfinite_boxes(load_coco(ann_file))  # validated: ids, sizes, 4-number boxes
    cat_ids = tuple(sorted(coco.getCatIds()))
    if not cat_ids:
        raise CenterpointError(f"{ann_file}: no categories")
    label_of = {cid: i for i, cid in enumerate(cat_ids)}
    names = tuple(coco.cats[c]["name"] for c in cat_ids)
    ids, files, sizes, all_boxes, all_labels = [], [], [], [], []
    dropped_boxes, dropped_images = nonfinite, 0
    for img_id in sorted(coco.getImgIds()):
        info = coco.imgs[img_id]
        h, w, name = int(info["height"]), int(info["width"]), info["file_name"]
        anns = [a for a in coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= max(min_box_size, 1e-3)) & (
            (boxes[:, 3] - boxes[:, 1]) >= max(min_box_size, 1e-3))
        dropped_boxes += int((~keep).sum())
        labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)[keep]
        boxes = boxes[keep]
        if train and (len(boxes) == 0 or min(h, w) < min_image_size):
            dropped_images += 1
            continue
        ids.append(img_id)
        files.append(name)
        sizes.append((h, w))
        all_boxes.append(boxes)
        all_labels.append(labels)
    if not ids:
        raise CenterpointError(f"{ann_file}: no usable images")
    return CocoIndex(coco, ann_file, image_dir, tuple(ids), tuple(files), np.array(sizes, dtype=np.int64),
                     tuple(all_boxes), tuple(all_labels), cat_ids, names, dropped_boxes, dropped_images)


def data_identity(train: CocoIndex, val: CocoIndex) -> dict:
    """What makes the data of a run that data, for `--resume` to compare: per split, the annotation file's
    size and sha256 and the number of images used (not paths: the same files moved elsewhere are the same
    data). JSON-compatible."""
    def split(index: CocoIndex) -> dict:
        digest = hashlib.sha256()
        with open(index.ann_file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return {"bytes": index.ann_file.stat().st_size, "sha256": digest.hexdigest(), "images": len(index)}

    return {"train": split(train), "val": split(val)}
