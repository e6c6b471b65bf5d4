"""Load a trained model from a checkpoint and run it: evaluation on a split, prediction on image files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from centerpoint.checkpoint import Checkpoint, check_compatible, require_single_model
from centerpoint.classes import align
from centerpoint.data.coco import CocoIndex
from centerpoint.data.loader import read_image
from centerpoint.data.paths import data_root, load_split
from centerpoint.errors import warn
from centerpoint.evaluation.evaluate import Progress, evaluate
from centerpoint.model import build_model
from centerpoint.optim.ema import with_ema
from centerpoint.runtime import distributed
from centerpoint.runtime.devices import Backend, resolve_precision, resolve_workers, select_backend
from centerpoint.runtime.memory_format import channels_last
from centerpoint.spec import ExperimentSpec
from centerpoint.step import make_predict_step


def load_model(spec: ExperimentSpec, ckpt: Checkpoint, backend: Backend, raw: bool = False
               ) -> tuple[Callable, dict, dict]:
    """(predict_fn, params, buffers) on the backend's device, checked against the spec's architecture: the
    EMA of the weights where the checkpoint holds one (train.ema_decay), unless `raw` asks for the trained
    weights themselves."""
    require_single_model(ckpt, "evaluation and prediction")
    model = build_model(spec.model, backend.device)
    got = {"params." + k: v for k, v in ckpt.group("params").items()}
    got.update({"buffers." + k: v for k, v in ckpt.group("buffers").items()})
    want = {"params." + k: v for k, v in model.params.items()}
    want.update({"buffers." + k: v for k, v in model.buffers.items()})
    check_compatible(str(ckpt.path), got, want)
    dev = backend.device
    params, buffers = with_ema(ckpt.group("params"), ckpt.group("buffers"), {} if raw else ckpt.group("ema"))
    params, buffers = {k: v.to(dev) for k, v in params.items()}, {k: v.to(dev) for k, v in buffers.items()}
    if spec.runtime.channels_last:
        params = {k: channels_last(v) for k, v in params.items()}
    precision = resolve_precision(backend, spec.runtime.precision)
    return make_predict_step(model.apply, spec, lambda: backend.autocast(precision)), params, buffers


def evaluate_checkpoint(spec: ExperimentSpec, ckpt: Checkpoint, progress: Progress | None = None,
                        raw: bool = False) -> tuple[dict, np.ndarray]:
    """COCO metrics of the checkpoint on the spec's val split, and the detection rows (`evaluate`); of its
    EMA weights where it holds them, unless `raw` (`load_model`).

    In a launched job (`centerpoint eval --nproc-per-node N`, torchrun, srun) each rank predicts its shard
    of the images on its own device and rank 0 runs COCOeval on everyone's detections; other ranks return
    ({}, no rows). The metrics equal a single-process evaluation's. progress: `evaluate.predict_split`'s.
    The loader workers are this machine's (`devices.resolve_workers`), not those the checkpoint's run
    recorded; rank 0 says so when it caps them."""
    ctx = distributed.context()
    backend = select_backend(spec.runtime.device, ctx.local_rank)
    distributed.init_process_group(ctx, backend)
    try:
        predict, params, buffers = load_model(spec, ckpt, backend, raw)
        root = data_root(spec) if ctx.rank == 0 else None  # rank 0 makes a synthetic set first, alone
        distributed.barrier(ctx)
        index = split_for(ckpt, spec, root or data_root(spec))
        workers, capped = resolve_workers(backend, spec.data.workers)
        if capped and ctx.rank == 0:
            warn(capped)
        metrics, rows = evaluate(predict, params, buffers, index, spec, backend, ctx, progress, workers=workers)
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


def predict_files(spec: ExperimentSpec, ckpt: Checkpoint, files: Sequence[Path], out_dir: Path,
                  score_thr: float, names: dict[Path, str] | None = None, batch_size: int | None = None,
                  progress: Progress | None = None, raw: bool = False) -> list[dict]:
    """Detect objects in each image (`detect.detect_images`: `batch_size` images of one input size per
    forward, default the spec's eval.batch_size), write `out_dir/<names[file]>` with boxes drawn (default
    `<stem>.jpg`), detections.json and images.json (`predict_out`), recording what it wrote in the
    directory's manifest; returns the detections. The EMA weights where the checkpoint holds them, unless
    `raw` (`load_model`).

    Images are read `_WINDOW` batches at a time, so memory does not grow with the number of files.
    progress(images done now, images in all): (0, all) once the model is ready, then after each window."""
    from centerpoint.classes import checkpoint_classes
    from centerpoint.evaluation.detect import detect_images
    from centerpoint.evaluation.predict_out import detection_entry, lists_json, record, sha256
    from centerpoint.io.atomic import atomic_write_bytes

    names = names or {f: f.stem + ".jpg" for f in files}
    classes = checkpoint_classes(ckpt)
    batch_size = batch_size or spec.eval.batch_size
    backend = select_backend(spec.runtime.device)
    predict, params, buffers = load_model(spec, ckpt, backend, raw)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    images: list[dict] = []
    written: dict[str, str] = {}
    window = batch_size * _WINDOW
    if progress is not None:
        progress(0, len(files))
    try:
        for start in range(0, len(files), window):
            chunk = files[start:start + window]
            pictures = [read_image(str(path), max_pixels=spec.data.max_image_pixels) for path in chunk]
            found = detect_images(predict, params, buffers, backend.device, pictures, spec.data, batch_size,
                                  score_thr)
            for k, (path, picture, (boxes, scores, labels)) in enumerate(zip(chunk, pictures, found, strict=True)):
                image_id = start + k + 1
                drawn = _drawing(picture, boxes, scores, labels, classes.names)
                atomic_write_bytes(out_dir / names[path], drawn)
                written[names[path]] = sha256(drawn)
                images.append({"id": image_id, "file_name": str(path), "width": picture.size[0],
                               "height": picture.size[1]})
                results += [detection_entry(image_id, path, names[path], box, float(score), int(label),
                                            classes.names, classes.ids)
                            for box, score, label in zip(boxes, scores, labels, strict=True)]
            if progress is not None:
                progress(len(chunk), len(files))
        for name, text in lists_json(results, images, classes.names, classes.ids).items():
            atomic_write_bytes(out_dir / name, text)
            written[name] = sha256(text)
    finally:
        record(out_dir, written)
    return results


_WINDOW = 8  # batches of images read, detected and drawn at a time


def _drawing(picture: Image.Image, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
             names: Sequence[str]) -> bytes:
    """The image with its detections drawn (per-class colours, labelled scores), as JPEG bytes."""
    import io

    from centerpoint.evaluation.visualize import draw_boxes

    drawn = io.BytesIO()
    pixels = draw_boxes(np.asarray(picture), boxes, labels.astype(int), list(names), scores, min_side=0)
    Image.fromarray(pixels).save(drawn, format="JPEG", quality=92)
    return drawn.getvalue()
