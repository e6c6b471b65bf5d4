"""Load a trained model from a checkpoint and run it: evaluation on a split, prediction on image files."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from centerpoint.checkpoint import Checkpoint, check_compatible, require_single_model
from centerpoint.classes import align
from centerpoint.data.coco import CocoIndex
from centerpoint.data.loader import read_image
from centerpoint.data.paths import data_root, load_split
from centerpoint.data.transforms import eval_affine, invert, warp
from centerpoint.errors import CenterpointError, warn
from centerpoint.evaluation.decode import boxes_to_original
from centerpoint.evaluation.evaluate import detections_to_rows, evaluate
from centerpoint.model import build_model
from centerpoint.runtime import distributed
from centerpoint.runtime.devices import Backend, resolve_precision, select_backend
from centerpoint.runtime.memory_format import channels_last
from centerpoint.spec import ExperimentSpec
from centerpoint.step import make_predict_step

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def load_model(spec: ExperimentSpec, ckpt: Checkpoint, backend: Backend) -> tuple[Callable, dict, dict]:
    """(predict_fn, params, buffers) on the backend's device, checked against the spec's architecture."""
    require_single_model(ckpt, "evaluation and prediction")
    model = build_model(spec.model, backend.device)
    got = {"params." + k: v for k, v in ckpt.group("params").items()}
    got.update({"buffers." + k: v for k, v in ckpt.group("buffers").items()})
    want = {"params." + k: v for k, v in model.params.items()}
    want.update({"buffers." + k: v for k, v in model.buffers.items()})
    check_compatible(str(ckpt.path), got, want)
    dev = backend.device
    params = {k: v.to(dev) for k, v in ckpt.group("params").items()}
    buffers = {k: v.to(dev) for k, v in ckpt.group("buffers").items()}
    if spec.runtime.channels_last:
        params = {k: channels_last(v) for k, v in params.items()}
    precision = resolve_precision(backend, spec.runtime.precision)
    return make_predict_step(model.apply, spec, lambda: backend.autocast(precision)), params, buffers


def evaluate_checkpoint(spec: ExperimentSpec, ckpt: Checkpoint, progress: Callable[[int], None] | None = None
                        ) -> tuple[dict, np.ndarray]:
    """COCO metrics of the checkpoint on the spec's val split, and the detection rows (`evaluate`).

    In a launched job (`centerpoint eval --nproc-per-node N`, torchrun, srun) each rank predicts its shard
    of the images on its own device and rank 0 runs COCOeval on everyone's detections; other ranks return
    ({}, no rows). The metrics equal a single-process evaluation's."""
    ctx = distributed.context()
    backend = select_backend(spec.runtime.device, ctx.local_rank)
    distributed.init_process_group(ctx, backend)
    try:
        predict, params, buffers = load_model(spec, ckpt, backend)
        root = data_root(spec) if ctx.rank == 0 else None  # rank 0 makes a synthetic set first, alone
        distributed.barrier(ctx)
        index = split_for(ckpt, spec, root or data_root(spec))
        metrics, rows = evaluate(predict, params, buffers, index, spec, backend, ctx, progress)
    finally:
        distributed.destroy(ctx)
    if ctx.rank == 0:
        metrics["images"] = min(len(index), spec.eval.max_images or len(index))
    return metrics, rows


def split_for(ckpt: Checkpoint, spec: ExperimentSpec, root: Path) -> CocoIndex:
    """The val split in the checkpoint's label order. Its classes must be the checkpoint's (by name; in
    another order they are mapped by name, with a warning); a checkpoint that does not record its classes
    is checked by their count."""
    if ckpt.classes is None:
        return load_split(spec, root, train=False)
    index = load_split(spec.model_copy(update={"model": spec.model.model_copy(update={"num_classes": None})}),
                       root, train=False)
    index, mapped = align(index, ckpt.classes, str(ckpt.path))
    if mapped and distributed.context().rank == 0:
        warn(f"{index.ann_file}: the checkpoint's classes in another order; detections are mapped by class name")
    return index


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly or found (non-recursively) in the given directories, sorted."""
    files: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise CenterpointError(f"no such image or directory: {p}")
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise CenterpointError(f"no images ({kinds}) found in {', '.join(map(str, inputs))}")
    return files


def predict_files(spec: ExperimentSpec, ckpt: Checkpoint, files: Sequence[Path], out_dir: Path,
                  score_thr: float, class_names: Sequence[str], names: dict[Path, str] | None = None) -> list[dict]:
    """Detect objects in each image, write `out_dir/<names[file]>` with boxes drawn (default `<stem>.jpg`)
    and `out_dir/detections.json`, recording what it wrote in the directory's manifest (`predict_out`);
    returns the detections (original pixels, xywh)."""
    import io

    from PIL import Image

    from centerpoint.evaluation.predict_out import RESULTS, record, sha256
    from centerpoint.evaluation.visualize import draw_boxes, rows_to_boxes
    from centerpoint.io.atomic import atomic_write_bytes

    names = names or {f: f.stem + ".jpg" for f in files}
    backend = select_backend(spec.runtime.device)
    predict, params, buffers = load_model(spec, ckpt, backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    labels_of = dict(enumerate(class_names))
    written: dict[str, str] = {}
    try:
        for i, path in enumerate(files):
            img = read_image(str(path), max_pixels=spec.data.max_image_pixels)
            w, h = img.size
            a, size = eval_affine(w, h, spec.data)
            pixels = torch.from_numpy(np.ascontiguousarray(warp(img, a, size).transpose(2, 0, 1)))[None]
            with torch.no_grad():
                boxes, scores, labels = predict(params, buffers, pixels.to(backend.device))
            boxes = boxes_to_original(boxes.float(), torch.from_numpy(invert(a))[None].float().to(boxes.device))
            rows = detections_to_rows(boxes, scores, labels, torch.tensor([i]), np.array([[h, w]]),
                                      tuple(range(len(class_names))), score_thr, clip=True)
            drawn = io.BytesIO()
            drawing = draw_boxes(np.asarray(img), rows_to_boxes(rows), rows[:, 6].astype(int), class_names, rows[:, 5],
                                 min_side=0)
            Image.fromarray(drawing).save(drawn, format="JPEG", quality=92)
            atomic_write_bytes(out_dir / names[path], drawn.getvalue())
            written[names[path]] = sha256(drawn.getvalue())
            for r in rows:
                results.append({"file": str(path), "drawing": names[path], "label": labels_of[int(r[6])],
                                "score": round(float(r[5]), 5), "bbox": [round(float(v), 2) for v in r[1:5]]})
        text = json.dumps(results, indent=1).encode()
        atomic_write_bytes(out_dir / RESULTS, text)
        written[RESULTS] = sha256(text)
    finally:
        record(out_dir, written)
    return results
