"""Detections of RGB images: the spec's test transform (`export.prepost.preprocess`), the predict step in
batches of one input size, and `export.prepost.postprocess`. `centerpoint predict` and
`centerpoint.Detector` both run this, so they give the same detections; a batch never mixes input sizes
(no padding to another image's size), so the batch size does not change them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from centerpoint.export.prepost import letterbox_size, postprocess, preprocess
from centerpoint.spec import DataSpec

# One image's detections, best first: boxes (n, 4) float64 x1 y1 x2 y2 in its pixels, clipped to it;
# scores (n,) float32 in 0..1; labels (n,) int64 class indices.
Found = tuple[np.ndarray, np.ndarray, np.ndarray]


def detect_images(predict: Callable, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                  device: torch.device, images: Sequence[Image.Image], data: DataSpec, batch_size: int,
                  score_thr: float) -> list[Found]:
    """Each image's detections scoring at least `score_thr`, in the images' order. predict: a predict step
    (`evaluation.predict.load_model`) taking (params, buffers, uint8 (B, 3, H, W) on `device`);
    batch_size: images per forward at most."""
    size = letterbox_size(data)
    inputs = [preprocess(img, size) for img in images]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (pixels, _) in enumerate(inputs):
        groups.setdefault(pixels.shape, []).append(i)
    out: list[Found | None] = [None] * len(images)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            batch = torch.from_numpy(np.stack([inputs[i][0] for i in chunk])).to(device)
            with torch.no_grad():
                boxes, scores, labels = (t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                                         for t in predict(params, buffers, batch))
            for j, i in enumerate(chunk):
                w, h = images[i].size
                out[i] = postprocess(boxes[j], scores[j], labels[j], inputs[i][1], w, h, score_thr)
    return out  # type: ignore[return-value]
