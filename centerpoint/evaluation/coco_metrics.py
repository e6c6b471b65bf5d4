"""COCO bbox evaluation (the 12 COCOeval numbers plus per-class AP) with two interchangeable backends.

``pycocotools`` is the reference implementation; ``faster-coco-eval`` runs the same protocol in C++ and is
much faster on large validation sets. Both see the exact same, already validated detections, so they
agree to floating-point precision.

Conventions (identical to COCOeval's own): a metric whose bucket holds no ground truth (e.g. ``bbox_mAP_s``
on a set without small objects, or the AP of a category absent from the evaluated images) is ``-1.0``,
never ``nan``; ``per_class_AP`` always lists every category of the ground truth, so its keys are stable.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from centerpoint.data.coco_json import build_coco, load_coco
from centerpoint.errors import CenterpointError

METRIC_KEYS = (
    "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
    "bbox_AR_1", "bbox_AR_10", "bbox_AR_100", "bbox_AR_s", "bbox_AR_m", "bbox_AR_l",
)  # fmt: skip
"""The 12 ``COCOeval.stats`` entries, in COCOeval's order."""

Backend = Literal["pycocotools", "faster-coco-eval"]
BACKENDS: tuple[str, ...] = ("pycocotools", "faster-coco-eval")

def _detections_array(detections: Sequence[dict] | np.ndarray) -> np.ndarray:
    """Validate detections and return them as an (N, 7) float64 array [image_id, x, y, w, h, score, cat]."""
    if isinstance(detections, np.ndarray):
        if detections.size == 0:
            return np.zeros((0, 7))
        if detections.ndim != 2 or detections.shape[1] != 7:
            raise CenterpointError(
                "detections array must have shape (N, 7) = [image_id, x, y, w, h, score, category_id], "
                f"got {detections.shape}"
            )
        try:
            arr = detections.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise CenterpointError(f"detections array must be numeric, got dtype {detections.dtype}") from e
    elif isinstance(detections, (list, tuple)):
        rows = []
        for i, det in enumerate(detections):
            if not isinstance(det, dict):
                raise CenterpointError(f"detections[{i}] must be a dict in COCO results format")
            try:
                x, y, w, h = det["bbox"]
                rows.append((det["image_id"], x, y, w, h, det["score"], det["category_id"]))
            except KeyError as e:
                raise CenterpointError(f"detections[{i}] lacks key {e}") from e
            except (TypeError, ValueError) as e:
                bbox = det["bbox"]
                raise CenterpointError(f"detections[{i}] bbox must be [x, y, w, h], got {bbox!r}") from e
        try:
            arr = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
        except (TypeError, ValueError) as e:
            raise CenterpointError("detections: image_id, bbox, score, category_id must be numbers") from e
    else:
        raise CenterpointError(
            f"detections must be a list of dicts or an (N, 7) array, got {type(detections).__name__}"
        )
    if not np.isfinite(arr).all():
        raise CenterpointError("detections contain nan or inf (in a box or a score)")
    ids = arr[:, [0, 6]]
    if not np.array_equal(ids, np.round(ids)):
        raise CenterpointError("detections have a non-integer image_id or category_id")
    return arr


def results_to_json(detections: Sequence[dict] | np.ndarray) -> list[dict]:
    """Detections (dict list or (N, 7) array) as fresh, JSON-serialisable COCO results dicts.

    Fresh dicts matter: both backends' ``loadRes`` write ``id``/``area``/... into the dicts they get.
    """
    arr = _detections_array(detections)
    # Column-wise tolist() beats per-row int()/slicing noticeably at COCO-val scale (500k detections).
    columns = (
        arr[:, 0].astype(np.int64).tolist(),
        arr[:, 6].astype(np.int64).tolist(),
        arr[:, 1:5].tolist(),
        arr[:, 5].tolist(),
    )
    return [
        {"image_id": img, "category_id": cat, "bbox": bbox, "score": score}
        for img, cat, bbox, score in zip(*columns, strict=True)
    ]


def _result_dataset(coco_gt: Any, arr: np.ndarray) -> dict:
    """The detections as the dataset ``loadRes`` builds for bbox results (same values: ids from 1, area
    w * h in float64, iscrowd 0), made in one pass over the rows; ``loadRes`` also adds a polygon per
    box, which bbox evaluation never reads. Images and categories are shared with ``coco_gt``."""
    areas = (arr[:, 3] * arr[:, 4]).tolist()
    columns = (arr[:, 0].astype(np.int64).tolist(), arr[:, 6].astype(np.int64).tolist(), arr[:, 1:5].tolist(),
               arr[:, 5].tolist(), areas)
    annotations = [
        {"image_id": img, "category_id": cat, "bbox": bbox, "score": score, "area": area, "id": n, "iscrowd": 0}
        for n, (img, cat, bbox, score, area) in enumerate(zip(*columns, strict=True), start=1)
    ]
    return {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
            "annotations": annotations}


def _check_against_gt(arr: np.ndarray, coco_gt: Any, img_ids: list[int] | None) -> list[int]:
    """Reject ids unknown to the ground truth; return the image ids to evaluate. arr: (N, 7) rows."""
    gt_imgs, gt_cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    unknown_imgs = set(np.unique(arr[:, 0]).astype(np.int64).tolist()) - gt_imgs
    if unknown_imgs:
        raise CenterpointError(
            f"{len(unknown_imgs)} detection image_id(s) are not in the ground truth, e.g. {min(unknown_imgs)}"
        )
    # COCOeval would silently ignore these, hiding e.g. a contiguous-index vs COCO-id mix-up.
    unknown_cats = set(np.unique(arr[:, 6]).astype(np.int64).tolist()) - gt_cats
    if unknown_cats:
        raise CenterpointError(
            f"detection category_id(s) {sorted(unknown_cats)[:5]} are not in the ground truth "
            f"(its ids: {sorted(gt_cats)[:10]}{'...' if len(gt_cats) > 10 else ''})"
        )
    if img_ids is None:
        return sorted(gt_imgs)
    # An empty list would mean "all annotations" inside getAnnIds yet "no images" in the loop.
    if len(img_ids) == 0:
        raise CenterpointError("img_ids is empty; pass None to evaluate every image")
    missing = set(img_ids) - gt_imgs
    if missing:
        raise CenterpointError(f"{len(missing)} of img_ids are not in the ground truth, e.g. {min(missing)}")
    return sorted(set(img_ids))


def _load_results(coco_gt: Any, results: list[dict]) -> Any:
    """``coco_gt.loadRes(results)``, also for an empty list (pycocotools' loadRes indexes anns[0])."""
    if results:
        return coco_gt.loadRes(results)
    dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    return build_coco(type(coco_gt), dataset)


def _silenced(quiet: bool) -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def _evaluate(coco_gt: Any, arr: np.ndarray, img_ids: list[int], backend: str, quiet: bool) -> Any:
    """Run evaluate/accumulate/summarize with ``backend``; return the evaluator."""
    if backend == "pycocotools":
        coco_cls, eval_cls, kwargs = COCO, COCOeval, {}
    else:
        try:
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError as e:
            raise CenterpointError(
                "backend 'faster-coco-eval' needs the faster_coco_eval package: "
                "pip install faster-coco-eval, or use backend 'pycocotools'"
            ) from e
        noop = lambda *args, **kwargs: None  # noqa: E731
        coco_cls, eval_cls = FasterCOCO, COCOeval_faster
        kwargs = {"print_function": noop if quiet else print}
    with _silenced(quiet):
        # Re-index the same dicts with the backend's COCO class: each backend expects its own.
        gt = coco_gt if type(coco_gt) is coco_cls else build_coco(coco_cls, coco_gt.dataset)
        if backend == "pycocotools":  # the reference path, exactly as pycocotools users run it
            dt = _load_results(gt, results_to_json(arr))
        else:  # ~2 s less at 500k detections than building dicts for loadRes to rewrite
            dt = build_coco(coco_cls, _result_dataset(gt, arr))
        evaluator = eval_cls(gt, dt, iouType="bbox", **kwargs)
        evaluator.params.imgIds = img_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _per_class_ap(evaluator: Any, coco_gt: Any) -> dict[str, float]:
    """AP@[.5:.95] per category (area 'all', 100 dets), -1.0 for a category without ground truth."""
    precision = np.asarray(evaluator.eval["precision"])  # [IoU thr, recall thr, category, area, maxDets]
    cats = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
    name_count = Counter(cats.values())
    out: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = cats[cat_id] if name_count[cats[cat_id]] == 1 else f"{cats[cat_id]} (id {cat_id})"
        out[name] = float(p.mean()) if p.size else -1.0
    return out


def _pr_curves(evaluator: Any, coco_gt: Any) -> dict[str, list[float]]:
    """Per category with ground truth: COCOeval's interpolated precision at IoU 0.5 (area 'all', 100 dets) at
    recall 0, 0.01, ..., 1, keyed as `per_class_AP` is."""
    precision = np.asarray(evaluator.eval["precision"])
    names = list(_per_class_ap(evaluator, coco_gt))
    return {names[k]: [float(v) for v in precision[0, :, k, 0, -1]]
            for k in range(len(names)) if (precision[0, :, k, 0, -1] > -1).any()}


def coco_bbox_metrics(
    coco_gt: Any,
    detections: Sequence[dict] | np.ndarray,
    backend: Backend = "pycocotools",
    img_ids: list[int] | None = None,
    quiet: bool = True,
    pr_curves: bool = False,
) -> dict:
    """COCO bbox metrics of ``detections`` against ``coco_gt``.

    Args:
        coco_gt: a ``COCO`` of either backend (e.g. from :func:`load_coco`), or a path to a COCO JSON.
        detections: COCO results dicts (image_id, category_id, bbox [x, y, w, h] in original pixels, score),
            or an (N, 7) array [image_id, x, y, w, h, score, category_id]. Never modified.
        backend: "pycocotools" (reference) or "faster-coco-eval" (same numbers, much faster).
        img_ids: evaluate only these images (default: every image of the ground truth).
        quiet: swallow the evaluators' progress prints.
        pr_curves: also return ``"pr_curves": {category name: precision at IoU 0.5 at recall 0, 0.01, .., 1}``
            (COCOeval's own precision array; categories without ground truth left out).

    Returns:
        ``{key: float for key in METRIC_KEYS}`` plus ``"per_class_AP": {category name: AP@[.5:.95]}``.
        -1.0 marks "no ground truth in this bucket" (COCOeval's convention); a category name shared by
        several ids gets an " (id N)" suffix.
    """
    if backend not in BACKENDS:
        raise CenterpointError(f"unknown COCO eval backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if isinstance(coco_gt, (str, os.PathLike)):
        coco_gt = load_coco(Path(coco_gt))
    elif not hasattr(coco_gt, "dataset") or not hasattr(coco_gt, "getImgIds"):
        raise CenterpointError(f"coco_gt must be a COCO object or a path, got {type(coco_gt).__name__}")
    arr = _detections_array(detections)
    eval_img_ids = _check_against_gt(arr, coco_gt, img_ids)
    evaluator = _evaluate(coco_gt, arr, eval_img_ids, backend, quiet)
    metrics: dict = {key: float(v) for key, v in zip(METRIC_KEYS, evaluator.stats, strict=True)}
    metrics["per_class_AP"] = _per_class_ap(evaluator, coco_gt)
    if pr_curves:
        metrics["pr_curves"] = _pr_curves(evaluator, coco_gt)
    return metrics


def _fmt(value: float) -> str:
    return "n/a" if value == -1.0 else f"{value:.3f}"


def format_metrics_table(metrics: dict) -> str:
    """Plain-text tables (ASCII borders, no colour) of the 12 metrics and the per-class AP, for the CLI.

    "n/a" stands for -1.0 (no ground truth in that bucket).
    """
    summary = Table(box=box.ASCII)
    summary.add_column("COCO bbox metric")
    summary.add_column("value", justify="right")
    for key in METRIC_KEYS:
        summary.add_row(key, _fmt(metrics[key]))
    per_class = Table(box=box.ASCII)
    per_class.add_column("class")
    per_class.add_column(Text("AP@[.5:.95]"), justify="right")
    for name, ap in metrics.get("per_class_AP", {}).items():
        per_class.add_row(Text(str(name)), _fmt(ap))  # Text: a name like "[x]" is not rich markup
    buffer = io.StringIO()
    # Fixed width and no terminal detection so the text is identical in a log file and a terminal.
    console = Console(file=buffer, width=100, color_system=None, force_terminal=False, highlight=False)
    console.print(summary)
    console.print(per_class)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"
