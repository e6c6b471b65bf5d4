"""COCO bbox evaluation time: `coco_bbox_metrics` with the pycocotools backend (the baseline) against
faster-coco-eval, on the same synthetic ground truth and detections, checking that all 12 COCOeval
numbers (and every per-class AP) come out identical.

Synthetic set: `--images` images of 640x480 with 1-15 ground-truth boxes each over 80 classes (small,
medium and large), and `--dets` detections per image as a CenterNet head gives them (top-k): a few
jittered copies of each object, some with the wrong class, the rest scattered boxes with low scores.

Prints one JSON line: seconds per backend (wall and this process's CPU time, of `coco_bbox_metrics`
alone; the annotation file is loaded once beforehand), the speed-up, whether the 12 numbers are
identical (per-class APs can differ in the last bit of a float mean), and bbox_mAP. Target (issue):
<= 8 s for faster-coco-eval at 5000 images x 100 detections.

    python benchmarks/evaluation.py [--images 5000] [--dets 100] [--fast-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from centerpoint.data.coco_json import load_coco
from centerpoint.evaluation.coco_metrics import METRIC_KEYS, coco_bbox_metrics

CLASSES, WIDTH, HEIGHT = 80, 640, 480


def make_ground_truth(images: int, rng: np.random.Generator) -> tuple[dict, list[np.ndarray]]:
    """COCO dict and, per image, its (n, 5) [x, y, w, h, category_id] boxes."""
    imgs, anns, per_image = [], [], []
    for i in range(1, images + 1):
        n = int(rng.integers(1, 16))
        side = np.exp(rng.uniform(np.log(8), np.log(400), (n, 1)))  # log-uniform: small to large
        wh = side * np.exp(rng.uniform(-0.5, 0.5, (n, 2)))
        wh = np.minimum(wh, [WIDTH - 1, HEIGHT - 1])
        xy = rng.uniform(0, 1, (n, 2)) * ([WIDTH, HEIGHT] - wh)
        cats = rng.integers(1, CLASSES + 1, (n, 1))
        boxes = np.concatenate([xy, wh, cats], 1)
        per_image.append(boxes)
        imgs.append({"id": i, "file_name": f"{i:012d}.jpg", "width": WIDTH, "height": HEIGHT})
        for x, y, w, h, c in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, CLASSES + 1)]
    return {"images": imgs, "annotations": anns, "categories": cats}, per_image


def make_detections(per_image: list[np.ndarray], dets: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 7) [image_id, x, y, w, h, score, category_id], `dets` rows per image."""
    rows = []
    for i, gt in enumerate(per_image, start=1):
        copies = np.repeat(gt, 3, axis=0)[: dets // 2]
        jitter = rng.normal(0, 0.08, (len(copies), 4)) * np.repeat(copies[:, 2:4], 2, axis=1)
        near = np.concatenate([copies[:, :4] + jitter, copies[:, 4:5]], 1)
        wrong = rng.random(len(near)) < 0.15
        near[wrong, 4] = rng.integers(1, CLASSES + 1, int(wrong.sum()))
        near_scores = rng.uniform(0.2, 1.0, len(near))
        m = dets - len(near)
        wh = np.exp(rng.uniform(np.log(4), np.log(300), (m, 2)))
        far = np.concatenate([rng.uniform(0, 1, (m, 2)) * ([WIDTH, HEIGHT] - np.minimum(wh, 600)), wh,
                              rng.integers(1, CLASSES + 1, (m, 1))], 1)
        boxes = np.concatenate([near, far])
        scores = np.concatenate([near_scores, rng.uniform(0.0, 0.3, m)])
        rows.append(np.column_stack([np.full(dets, i), boxes[:, :4], scores, boxes[:, 4]]))
    return np.concatenate(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--dets", type=int, default=100, help="detections per image")
    ap.add_argument("--fast-only", action="store_true", help="skip the (slow) pycocotools baseline")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gt, per_image = make_ground_truth(args.images, rng)
    detections = make_detections(per_image, args.dets, rng)
    ann_file = Path(tempfile.mkdtemp(prefix="centerpoint-bench-")) / "instances_val.json"
    ann_file.write_text(json.dumps(gt))
    t = time.perf_counter()
    coco_gt = load_coco(ann_file)
    load_s = time.perf_counter() - t
    backends = ["faster-coco-eval"] if args.fast_only else ["pycocotools", "faster-coco-eval"]
    seconds, cpu, metrics = {}, {}, {}
    for backend in backends:
        c, t = time.process_time(), time.perf_counter()
        metrics[backend] = coco_bbox_metrics(coco_gt, detections, backend=backend)
        seconds[backend], cpu[backend] = time.perf_counter() - t, time.process_time() - c
    shutil.rmtree(ann_file.parent)
    fast = seconds["faster-coco-eval"]
    result: dict[str, object] = {
        "bench": "evaluation", "images": args.images, "detections": len(detections),
        "gt_boxes": len(gt["annotations"]), "load_gt_s": round(load_s, 2),
        **{f"{b}_s": round(s, 2) for b, s in seconds.items()},
        **{f"{b}_cpu_s": round(s, 2) for b, s in cpu.items()},
        "bbox_mAP": round(metrics["faster-coco-eval"]["bbox_mAP"], 4),
        "target_fast_s": 8.0, "pass": fast <= 8.0,
    }
    if not args.fast_only:
        ref, got = metrics["pycocotools"], metrics["faster-coco-eval"]
        result["speedup"] = round(seconds["pycocotools"] / fast, 2)
        result["identical_12"] = all(ref[k] == got[k] for k in METRIC_KEYS)
        result["max_abs_diff_12"] = max(abs(ref[k] - got[k]) for k in METRIC_KEYS)
        result["max_abs_diff_per_class"] = max(abs(ref["per_class_AP"][k] - v) for k, v in got["per_class_AP"].items())
        result["pass"] = bool(fast <= 8.0 and result["identical_12"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
