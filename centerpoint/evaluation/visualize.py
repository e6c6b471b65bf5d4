"""Pictures of detections: boxes in per-class colours with labels that do not overprint, and what a run's
evaluation sends to TensorBoard besides its COCO numbers (validation images with ground truth and
predictions, per-class AP, evaluation time, a precision-recall curve per class)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 320  # pictures smaller than this (longer side, pixels) are enlarged so that labels stay readable


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright RGB colour per class index, hues spread by the golden ratio (neighbours differ clearly)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=13)  # a scalable font where Pillow has FreeType
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


Rect = tuple[float, float, float, float]


def place_tags(boxes: np.ndarray, sizes: Sequence[tuple[float, float]], image_wh: tuple[int, int]) -> list[Rect | None]:
    """Where each box's label tag (`sizes[i]`: width, height) goes, in the order given: above the box,
    inside its top-left corner or below it, the first place that no earlier tag covers, shifted to stay in
    the image; None when every place is taken (the tag is then left out, never printed over another)."""
    placed: list[Rect] = []
    out: list[Rect | None] = []
    w_img, h_img = image_wh
    for (x1, y1, _, y2), (tw, th) in zip(boxes.tolist(), sizes, strict=True):
        spot = None
        for tx, ty in ((x1, y1 - th), (x1 + 2, y1 + 2), (x1, y2)):
            tx, ty = min(max(tx, 0.0), w_img - tw), min(max(ty, 0.0), h_img - th)
            tag = (tx, ty, tx + tw, ty + th)
            if not any(_overlaps(tag, p) for p in placed):
                spot = tag
                placed.append(tag)
                break
        out.append(spot)
    return out


def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: Sequence[int], names: Sequence[str],
               scores: Sequence[float] | None = None, min_side: int = MIN_SIDE) -> np.ndarray:
    """(H, W, 3) uint8 image with xyxy pixel `boxes` (n, 4) drawn in their class's colour, each labelled
    `name` (or `name 0.87` with `scores`) on a filled tag placed by `place_tags`, highest scores first.
    Images under `min_side` pixels (longer side) are enlarged to it first, so the result may be larger
    (0: never)."""
    img = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    scale = max(1.0, min_side / max(img.size))
    if scale > 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    draw, font = ImageDraw.Draw(img), _font()
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable") if scores is not None \
        else np.arange(len(labels))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    # A diverged model can give non-finite or inverted boxes: leave out the first, put corners in order.
    order = np.array([i for i in order if np.isfinite(boxes[i]).all()], dtype=np.int64)
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])],
                           axis=1)[order] * scale
    labels = [int(labels[i]) for i in order]
    texts = [names[k] if 0 <= k < len(names) else str(k) for k in labels]
    if scores is not None:
        texts = [f"{t} {float(scores[i]):.2f}" for t, i in zip(texts, order, strict=True)]
    extents = [draw.textbbox((0, 0), t, font=font) for t in texts]
    sizes = [(r - l + 4, b - t + 4) for l, t, r, b in extents]  # noqa: E741
    for box, label in zip(boxes.tolist(), labels, strict=True):
        draw.rectangle(box, outline=class_colour(label), width=2)
    for tag, label, text, (left, top, _, _) in zip(place_tags(boxes, sizes, img.size), labels, texts, extents,
                                                    strict=True):
        if tag is None:
            continue
        colour = class_colour(label)
        draw.rectangle(tag, fill=colour)
        dark = sum(c * w for c, w in zip(colour, (0.299, 0.587, 0.114), strict=True)) > 150
        draw.text((tag[0] + 2 - left, tag[1] + 2 - top), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=font)
    return np.asarray(img)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 6) -> np.ndarray:
    """Two (H, W, 3) uint8 pictures next to each other on a dark background."""
    h = max(left.shape[0], right.shape[0])
    out = np.full((h, left.shape[1] + gap + right.shape[1], 3), 32, dtype=np.uint8)
    out[: left.shape[0], : left.shape[1]] = left
    out[: right.shape[0], left.shape[1] + gap:] = right
    return out


def rows_to_boxes(rows: np.ndarray) -> np.ndarray:
    """Detection rows [image_id, x, y, w, h, score, category] -> (n, 4) xyxy boxes."""
    return np.concatenate([rows[:, 1:3], rows[:, 1:3] + rows[:, 3:5]], axis=1) if len(rows) else np.zeros((0, 4))


def pr_curve(precision: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of one class from COCOeval's precision array at one IoU threshold: its values at
    recall 0, 0.01, ..., 1 (COCOeval's interpolated precision, 0 past the highest recall reached)."""
    p = np.asarray(precision, dtype=np.float64)
    return np.linspace(0.0, 1.0, len(p)), p


SCORE_SHOWN = 0.3  # predictions drawn on TensorBoard pictures: those scoring at least this


def evaluation_picture(index: Any, i: int, rows: np.ndarray, max_pixels: int) -> np.ndarray:
    """Validation image `i` of a `CocoIndex`: its ground truth (left) and the detection rows of that image
    scoring at least SCORE_SHOWN (right), in the same per-class colours."""
    from centerpoint.data.loader import read_image

    image = np.asarray(read_image(str(index.image_dir / index.file_names[i]), max_pixels=max_pixels))
    names = list(index.class_names)
    truth = draw_boxes(image, index.boxes[i], index.labels[i], names)
    label_of = {int(c): k for k, c in enumerate(index.cat_ids)}
    mine = rows[(rows[:, 0] == index.image_ids[i]) & (rows[:, 5] >= SCORE_SHOWN)]
    shown = draw_boxes(image, rows_to_boxes(mine), [label_of[int(c)] for c in mine[:, 6]], names, mine[:, 5])
    return side_by_side(truth, shown)


def log_evaluation(writer: Any, index: Any, rows: np.ndarray, metrics: dict, curves: dict[str, Sequence[float]],
                   step: int, num_images: int, max_pixels: int) -> None:
    """Send one evaluation to a TensorBoard SummaryWriter: the first `num_images` validation images
    (`val_images/<k>`, ground truth left, predictions right), per-class AP (`val_AP/<class>`), evaluation time
    (`val/eval_s`) and each class's precision-recall curve at IoU 0.5 (`val_PR/<class>`, COCOeval's own
    precision values, not recomputed). `rows`: the evaluation's detection rows."""
    from centerpoint.errors import CenterpointError

    for k in range(min(num_images, len(index))):
        try:
            picture = evaluation_picture(index, k, rows, max_pixels)
        except CenterpointError:  # an unreadable image (data.on_bad_image=skip; counted by the evaluation)
            continue
        writer.add_image(f"val_images/{k}", picture, step, dataformats="HWC")
    for name, ap in metrics.get("per_class_AP", {}).items():
        if ap >= 0:  # -1: no ground truth of this class
            writer.add_scalar(f"val_AP/{name}", ap, step)
    if "eval_s" in metrics:
        writer.add_scalar("val/eval_s", metrics["eval_s"], step)
    for name, precision in curves.items():
        recall, p = pr_curve(precision)
        # COCOeval keeps precision per recall level, not the counts behind it: the count fields stay 0.
        zeros = np.zeros_like(p)
        writer.add_pr_curve_raw(f"val_PR/{name}", zeros, zeros, zeros, zeros, p, recall, step, len(p))
