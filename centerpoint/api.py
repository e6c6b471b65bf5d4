"""The Python API: a checkpoint in, detections of any images out.

    det = centerpoint.Detector.from_checkpoint("best.safetensors")
    result = det("photo.jpg")            # or a PIL image, an (H, W, 3) uint8 array, a (3, H, W) uint8 tensor,
    results = det([a, b, c])             # or a list of them: one result each, in order
    det.draw("photo.jpg", result).save("boxes.jpg")

The images go through `evaluation.detect.detect_images`, as in `centerpoint predict`: the spec's test
transform (`export.prepost.preprocess`), the predict step (same device and precision choice) in batches
of one input size, and `export.prepost.postprocess`: the same detections as `centerpoint predict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from centerpoint.checkpoint import Checkpoint, load_checkpoint
from centerpoint.classes import classes_of
from centerpoint.errors import CenterpointError
from centerpoint.runtime.devices import select_backend
from centerpoint.spec import ExperimentSpec
from centerpoint.spec_io import with_updates

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Detections:
    """One image's detections, best first: boxes (n, 4) float64 x1 y1 x2 y2 in the image's pixels, clipped to
    it; scores (n,) float32 in 0..1; labels (n,) int64 class indices; class_names (n,) their names."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None) -> list[dict]:
        """COCO results entries (`image_id`, `category_id`, `bbox` [x, y, w, h], `score`). category_ids: the
        dataset's category id of each label (its sorted category ids); default: the label itself."""
        cats = [int(c) for c in category_ids] if category_ids is not None else None
        return [{"image_id": int(image_id), "category_id": cats[int(label)] if cats else int(label),
                 "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)}
                for (x1, y1, x2, y2), score, label in zip(self.boxes, self.scores, self.labels, strict=True)]


class Detector:
    """A trained detector: call it on images (see the module docstring)."""

    def __init__(self, ckpt: Checkpoint, device: str = "auto", score_thr: float = 0.3,
                 batch_size: int | None = None) -> None:
        from centerpoint.evaluation.predict import load_model

        spec: ExperimentSpec = with_updates(ckpt.spec, {"runtime.device": device})
        self.spec, self.score_thr = spec, score_thr
        self.batch_size = batch_size or spec.eval.batch_size
        self.backend = select_backend(spec.runtime.device)
        self.predict, self.params, self.buffers = load_model(spec, ckpt, self.backend)
        self.names = classes_of(ckpt)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", score_thr: float = 0.3,
                        batch_size: int | None = None) -> Detector:
        """Load a `.safetensors` checkpoint. device: auto | cpu | cuda | sdaa (auto: as `centerpoint predict`);
        score_thr: the lowest score kept; batch_size: images per forward (default: the spec's eval.batch_size)."""
        return cls(load_checkpoint(Path(path)), device, score_thr, batch_size)

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> Detections | list[Detections]:
        """Detections of one image, or a list of them for a list (or tuple) of images."""
        if isinstance(images, (list, tuple)):
            return self.detect([self.image(i) for i in images])
        return self.detect([self.image(images)])[0]

    def image(self, image: ImageLike) -> Image.Image:
        """Any accepted image as an RGB PIL image: a file path (read as `predict` reads it), a PIL image, an
        (H, W, 3) uint8 numpy array or a (3, H, W) or (H, W, 3) uint8 tensor, RGB."""
        if isinstance(image, (str, Path)):
            from centerpoint.data.loader import read_image

            return read_image(str(image), max_pixels=self.spec.data.max_image_pixels)
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, torch.Tensor):
            t = image.detach().cpu()
            image = (t.permute(1, 2, 0) if t.ndim == 3 and t.shape[0] == 3 else t).numpy()
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            return Image.fromarray(np.ascontiguousarray(image))
        what = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
        raise CenterpointError(f"Detector: cannot read an image from {what.strip()}; give a path, a PIL image, an "
                               "(H, W, 3) uint8 array or a (3, H, W) uint8 tensor")

    def detect(self, images: Sequence[Image.Image]) -> list[Detections]:
        """Detections of RGB PIL images, batched by input size (`batch_size` at a time)."""
        from centerpoint.evaluation.detect import detect_images

        found = detect_images(self.predict, self.params, self.buffers, self.backend.device, images,
                              self.spec.data, self.batch_size, self.score_thr)
        return [Detections(b, s, lab, [self.names[int(c)] for c in lab]) for b, s, lab in found]

    def draw(self, image: ImageLike, result: Detections) -> Image.Image:
        """The image with the result's boxes, class names and scores drawn (as `centerpoint predict` draws)."""
        from centerpoint.evaluation.visualize import draw_boxes

        rgb = np.asarray(self.image(image))
        drawn = draw_boxes(rgb, result.boxes, result.labels.astype(int), self.names, result.scores, min_side=0)
        return Image.fromarray(drawn)
