"""The image geometry around the network: what goes in (letterbox or pad) and how boxes come back.

The exported graphs and `centerpoint.Detector` share these two functions, so an ONNX model fed through them
gives the Python API's detections. They need only numpy and Pillow (no torch): with an exported graph,
`preprocess`, run the graph, `postprocess` is the whole program.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from centerpoint.data.transforms import invert, pad_affine, resize_affine, warp
from centerpoint.spec import DataSpec


def letterbox_size(data: DataSpec) -> int | None:
    """The letterbox side the spec tests at (test_mode=resize), or None: each image at its own resolution,
    padded (test_mode=pad)."""
    return (data.test_size or data.input_size) if data.test_mode == "resize" else None


def preprocess(image: Image.Image, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image -> the network's input (3, H, W) uint8 RGB and the (2, 3) affine from input pixels back
    to image pixels.

    size: letterbox, the longer side resized to `size` (bilinear) and centred on a size x size canvas of
    zeros (what an export of that --size takes); None: the image at its own resolution, centre-padded to
    (side | 31) + 1 per side (mmdetection's test padding)."""
    w, h = image.size
    a, out = resize_affine(w, h, size) if size else pad_affine(w, h)
    pixels = np.ascontiguousarray(warp(image, a, out).transpose(2, 0, 1))
    return pixels, invert(a)


def postprocess(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, to_image: np.ndarray, width: int,
                height: int, score_thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's decoded detections -> (boxes (n, 4) x1 y1 x2 y2 in image pixels clipped to the image,
    scores (n,), labels (n,)): those scoring at least `score_thr` with area left after clipping.

    boxes (k, 4) x1 y1 x2 y2 in input pixels, scores (k,), labels (k,): one image of the graph's outputs;
    to_image: `preprocess`'s affine (scale and shift only, so mapping the two corners is exact)."""
    b = np.asarray(boxes, dtype=np.float64)
    xs = np.clip(b[:, 0::2] * to_image[0, 0] + to_image[0, 2], 0, width)
    ys = np.clip(b[:, 1::2] * to_image[1, 1] + to_image[1, 2], 0, height)
    out = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    keep = (scores >= score_thr) & (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], np.asarray(scores)[keep], np.asarray(labels)[keep]
