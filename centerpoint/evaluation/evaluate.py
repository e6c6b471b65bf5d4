"""Inference over a COCO-format split -> detections in COCO results format -> COCOeval metrics.

`evaluate` is the one evaluation path: the training loop and `centerpoint eval` (`evaluation/predict.py`) both call it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from centerpoint.data.coco import CocoIndex
from centerpoint.data.loader import DetectionDataset, collate_eval, eval_batches, make_loader
from centerpoint.data.transforms import eval_affine
from centerpoint.evaluation.coco_metrics import coco_bbox_metrics
from centerpoint.evaluation.decode import boxes_to_original
from centerpoint.runtime import distributed
from centerpoint.runtime.devices import Backend, resolve_workers
from centerpoint.spec import ExperimentSpec

Predict = Callable[[dict[str, Tensor], dict[str, Tensor], Tensor], tuple[Tensor, ...]]
# Called with (0, images this rank predicts in all) before the first batch, then after each batch with
# (images just predicted, the same total).
Progress = Callable[[int, int], None]


def detections_to_rows(boxes: Tensor, scores: Tensor, labels: Tensor, image_ids: Tensor,
                       sizes: np.ndarray, cat_ids: tuple[int, ...], score_threshold: float,
                       clip: bool = False) -> np.ndarray:
    """(B, k, 4) xyxy original-pixel boxes -> (n, 7) rows [image_id, x, y, w, h, score, category_id] of the
    detections scoring at least `score_threshold`.

    Without `clip` the boxes stay as the model gives them (mmdetection's CocoMetric scores them so). With
    `clip` they are clipped to their image (sizes: (B, 2) height, width) and those left without area are
    dropped: IoU with ground truth inside the image then reads higher, and so does the AP.
    """
    b = boxes.cpu().double().numpy()
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    if clip:
        h, w = sizes[:, 0][:, None], sizes[:, 1][:, None]
        x1, x2 = np.clip(x1, 0, w), np.clip(x2, 0, w)
        y1, y2 = np.clip(y1, 0, h), np.clip(y2, 0, h)
    s = scores.cpu().double().numpy()
    cats = np.asarray(cat_ids, dtype=np.float64)[labels.cpu().numpy()]
    ids = np.broadcast_to(image_ids.cpu().numpy()[:, None], s.shape).astype(np.float64)
    rows = np.stack([ids, x1, y1, x2 - x1, y2 - y1, s, cats], axis=-1).reshape(-1, 7)
    keep = rows[:, 5] >= score_threshold
    if clip:
        keep &= (rows[:, 3] > 0) & (rows[:, 4] > 0)
    return rows[keep]


def predict_split(predict: Predict, params: dict[str, Tensor], buffers: dict[str, Tensor], index: CocoIndex,
                  spec: ExperimentSpec, backend: Backend, rank: int = 0, world_size: int = 1,
                  progress: Progress | None = None, workers: int | None = None) -> tuple[np.ndarray, int]:
    """Run the model on this rank's share of `index`; returns (detection rows (n, 7), bad image count).

    workers: loader processes (a training run's `spec.resolved.workers`); None: `devices.resolve_workers`."""
    dataset = DetectionDataset(index, spec.data, spec.train.seed, train=False)
    input_sizes = [eval_affine(int(w), int(h), spec.data)[1] for h, w in index.sizes]
    batches = eval_batches(input_sizes, spec.eval.batch_size, rank, world_size, spec.eval.max_images)
    workers = resolve_workers(backend, spec.data.workers)[0] if workers is None else workers
    total = sum(len(b) for b in batches)
    loader = make_loader(dataset, batches, collate=collate_eval, workers=workers,
                         pin_memory=backend.pin_memory, pin_device=backend.pin_memory_device)
    size_of = {img_id: index.sizes[i] for i, img_id in enumerate(index.image_ids)}
    rows, bad = [], 0
    if progress is not None:
        progress(0, total)
    with torch.no_grad():
        for batch in loader:
            images = batch["images"].to(backend.device, non_blocking=True)
            boxes, scores, labels = predict(params, buffers, images)
            boxes = boxes_to_original(boxes.float(), batch["to_original"].to(boxes.device, torch.float32))
            sizes = np.stack([size_of[int(i)] for i in batch["image_ids"]])
            rows.append(detections_to_rows(boxes, scores, labels, batch["image_ids"], sizes, index.cat_ids,
                                           spec.eval.score_threshold, spec.eval.clip_boxes))
            bad += int(batch["bad_images"])
            if progress is not None:
                progress(len(batch["image_ids"]), total)
    return (np.concatenate(rows) if rows else np.zeros((0, 7))), bad


def evaluate(predict: Predict, params: dict[str, Tensor], buffers: dict[str, Tensor], index: CocoIndex,
             spec: ExperimentSpec, backend: Backend, dist: distributed.Context,
             progress: Progress | None = None, pr_curves: bool = False, workers: int | None = None
             ) -> tuple[dict, np.ndarray]:
    """COCO metrics of a model on `index`, over every rank of the job: each rank predicts its shard of the
    images, rank 0 gathers all detections and runs COCOeval. Returns, on rank 0, the metrics (with
    `bad_images`, the unreadable images skipped) and every rank's detection rows (n, 7); elsewhere
    ({}, no rows). The metrics equal a single-process evaluation's. `pr_curves`: the metrics also hold
    COCOeval's precision-recall curve per class under "pr_curves". progress, workers: `predict_split`'s."""
    rows, bad = predict_split(predict, params, buffers, index, spec, backend, dist.rank, dist.world_size,
                              progress=progress, workers=workers)
    parts = distributed.gather_objects((rows, bad), dist)
    if dist.rank != 0:
        return {}, np.zeros((0, 7))
    rows = np.concatenate([r for r, _ in parts])
    metrics = compute_metrics(index, rows, spec, pr_curves=pr_curves)
    metrics["bad_images"] = sum(b for _, b in parts)
    return metrics, rows


def evaluated_image_ids(index: CocoIndex, spec: ExperimentSpec) -> list[int]:
    """The image ids an evaluation covers (eval.max_images limits it to the first N)."""
    return list(index.image_ids[: spec.eval.max_images or len(index)])


def compute_metrics(index: CocoIndex, rows: np.ndarray, spec: ExperimentSpec, pr_curves: bool = False) -> dict:
    """COCOeval bbox metrics (12 numbers + per-class AP; PR curves per class if asked) of detection rows on
    `index`."""
    return coco_bbox_metrics(index.coco, rows, backend=spec.eval.backend,
                             img_ids=evaluated_image_ids(index, spec), pr_curves=pr_curves)


def rows_to_results(rows: np.ndarray) -> list[dict]:
    """Detection rows -> COCO results json entries."""
    return [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [round(float(v), 2) for v in r[1:5]],
             "score": round(float(r[5]), 5)} for r in rows]


def write_results(path: Path, rows: np.ndarray) -> None:
    """Save detections as a COCO results json (atomically)."""
    import json

    from centerpoint.io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(rows_to_results(rows)))
