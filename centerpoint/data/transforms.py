"""Image transforms as affine maps (scale, translate, mirror) from original to input pixels.

A sample's geometry is one 2x3 matrix A with [x_in, y_in] = A @ [x, y, 1]; the image is warped once
(PIL, bilinear) and the boxes are mapped through the same A, so evaluation can map detections back with
its inverse. Randomness comes from a numpy Generator the caller derives from (seed, epoch, index).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

Affine = np.ndarray  # (2, 3) float64


def scale_translate(scale: float, tx: float, ty: float, flip_width: float | None = None) -> Affine:
    """x' = scale * x + tx (mirrored as flip_width - x' when flip_width is given), y' = scale * y + ty."""
    a = np.array([[scale, 0.0, tx], [0.0, scale, ty]])
    if flip_width is not None:
        a[0] = [-scale, 0.0, flip_width - tx]
    return a


def invert(a: Affine) -> Affine:
    """Inverse of a (2, 3) affine map."""
    m = np.vstack([a, [0.0, 0.0, 1.0]])
    return np.linalg.inv(m)[:2]


def train_affine(rng: np.random.Generator, width: int, height: int, size: int,
                 scale_range: tuple[float, float], flip_prob: float, fit: int | None = None) -> Affine:
    """Random keep-ratio rescale (relative to fitting the longer side in `fit` pixels, default `size`),
    random placement of the `size` x `size` window (a crop when the image is larger, a random pad offset
    when smaller) and a horizontal mirror with probability `flip_prob`."""
    scale = (fit or size) / max(width, height) * rng.uniform(*scale_range)
    tx = _place(rng, size - width * scale)
    ty = _place(rng, size - height * scale)
    flip = rng.random() < flip_prob
    return scale_translate(scale, tx, ty, float(size) if flip else None)


def _place(rng: np.random.Generator, slack: float) -> float:
    """Offset of the scaled image inside the window: uniform over all positions that keep the overlap."""
    return float(rng.uniform(min(0.0, slack), max(0.0, slack)))


def resize_affine(width: int, height: int, size: int) -> tuple[Affine, tuple[int, int]]:
    """Keep-ratio resize of the longer side to `size`, centred in a `size` x `size` input."""
    scale = size / max(width, height)
    a = scale_translate(scale, (size - width * scale) / 2, (size - height * scale) / 2)
    return a, (size, size)


def pad_affine(width: int, height: int) -> tuple[Affine, tuple[int, int]]:
    """Original resolution, centred in an input of (side | 31) + 1 pixels (mmdetection's test padding)."""
    out_w, out_h = (width | 31) + 1, (height | 31) + 1
    return scale_translate(1.0, (out_w - width) // 2, (out_h - height) // 2), (out_w, out_h)


def warp(image: Image.Image, a: Affine, out_size: tuple[int, int]) -> np.ndarray:
    """Warp an RGB image by `a` into an (H, W, 3) uint8 array of out_size = (W, H); outside is 0."""
    inv = invert(a)
    if np.allclose(a, [[1, 0, a[0, 2]], [0, 1, a[1, 2]]]) and float(a[0, 2]).is_integer() \
            and float(a[1, 2]).is_integer():
        # Pure integer shift: paste instead of resampling (exact, and much faster).
        canvas = Image.new("RGB", out_size)
        canvas.paste(image, (int(a[0, 2]), int(a[1, 2])))
        return np.asarray(canvas)
    coeffs = tuple(inv.reshape(-1))
    out = image.transform(out_size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


def transform_boxes(boxes: np.ndarray, a: Affine, out_size: tuple[int, int],
                    min_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Map (n, 4) xyxy boxes through `a` and clip them to the (W, H) input.

    Returns (boxes (m, 4) float32, keep (n,) bool): boxes narrower or shorter than `min_size` pixels after
    clipping are dropped.
    """
    xs = boxes[:, [0, 2]] * a[0, 0] + a[0, 2]
    ys = boxes[:, [1, 3]] * a[1, 1] + a[1, 2]
    out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    w, h = out_size
    out = np.clip(out, 0, [w, h, w, h])
    keep = ((out[:, 2] - out[:, 0]) >= min_size) & ((out[:, 3] - out[:, 1]) >= min_size)
    return out[keep].astype(np.float32), keep
