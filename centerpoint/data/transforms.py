"""Image transforms as affine maps (scale, translate, mirror) from original to input pixels.

A sample's geometry is one 2x3 matrix A with [x_in, y_in] = A @ [x, y, 1]; the image is warped once
(PIL, bilinear) and the boxes are mapped through the same A, so evaluation can map detections back with
its inverse. Randomness comes from a numpy Generator the caller derives from (seed, epoch, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from centerpoint.spec import DataSpec

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


# mmdetection retries a ratio 50 times before drawing another, and draws ratios forever; the cap only
# matters when no box can ever be kept (a crop much smaller than the border), where it would hang.
CENTRE_TRIES = 50
MAX_RATIO_DRAWS = 100


def crop_border(border: int, size: int) -> int:
    """Margin (original pixels) kept between a crop centre and the edges of an image side of `size` pixels.

    mmdetection's RandomCenterCropPad rule: `border` divided by the smallest power of two above
    k = 2 * border / size (twice that when k is an integer), so the margin stays below size / 2 and a
    centre can always be drawn: 128 for sides above 256, 64 for sides in (128, 256], 32 for (64, 128], ...
    """
    if border == 0:
        return 0
    k = 2 * border / size
    return border // 2 ** (math.ceil(math.log2(math.ceil(k))) + int(k == int(k)))


@dataclass(frozen=True)
class CropWindow:
    """A square training window of `side` original pixels centred on original pixel (cx, cy).

    The window's image part (the "patch") is x in [max(0, cx - side // 2), min(cx + side // 2, width)),
    likewise for y; keep (n,) bool marks the boxes whose centre lies strictly inside the patch and whose
    width and height are positive.
    """

    side: int
    cx: int
    cy: int
    keep: np.ndarray


def center_crop_window(
    rng: np.random.Generator,
    width: int,
    height: int,
    boxes: np.ndarray,
    size: int,
    ratios: tuple[float, ...],
    border: int,
) -> CropWindow:
    """Draw mmdetection's RandomCenterCropPad window (train mode, crop_size `size`) for an image.

    A ratio is drawn from `ratios` (window side int(size * ratio) original pixels), then up to 50 centres,
    each uniform over the integers at least `crop_border` from the edges; the first centre whose patch
    holds a box centre wins, otherwise another ratio is drawn. An image without boxes takes the first
    centre. The 50 candidate centres of a ratio are drawn at once: the same distribution as one by one.
    boxes: (n, 4) xyxy original pixels.
    """
    w_border, h_border = crop_border(border, width), crop_border(border, height)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # empty after clipping otherwise
    for _ in range(MAX_RATIO_DRAWS):
        side = int(size * float(rng.choice(ratios)))
        cxs = rng.integers(w_border, width - w_border, CENTRE_TRIES)
        cys = rng.integers(h_border, height - h_border, CENTRE_TRIES)
        half = side // 2
        x0, x1 = np.maximum(0, cxs - half), np.minimum(cxs + half, width)
        y0, y1 = np.maximum(0, cys - half), np.minimum(cys + half, height)
        mx, my = centres[:, None, 0], centres[:, None, 1]
        inside = (mx > x0) & (mx < x1) & (my > y0) & (my < y1)  # (n boxes, tries): strictly inside the patch
        hit = inside.any(0)
        if len(boxes) == 0 or hit.any():
            t = int(np.argmax(hit)) if len(boxes) else 0
            return CropWindow(side, int(cxs[t]), int(cys[t]), inside[:, t] & positive)
    # No box centre can fall inside any patch: use the last draw, keeping no box.
    return CropWindow(side, int(cxs[-1]), int(cys[-1]), np.zeros(len(boxes), dtype=bool))


def window_affine(window: CropWindow, size: int, flip: bool) -> Affine:
    """Original -> input pixels for a window resized to `size` x `size`: original pixel (cx, cy) lands on
    crop pixel (side // 2, side // 2), the crop is scaled by size / side and mirrored when `flip`.

    On odd sides mmdetection's crop leaves its last row and column at 0 (the patch spans 2 * (side // 2)
    pixels); the warp samples the image there instead, a difference of under one crop pixel at the edge.
    """
    scale = size / window.side
    tx = scale * (window.side // 2 - window.cx)
    ty = scale * (window.side // 2 - window.cy)
    return scale_translate(scale, tx, ty, float(size) if flip else None)


def center_crop_affine(
    rng: np.random.Generator,
    width: int,
    height: int,
    boxes: np.ndarray,
    size: int,
    ratios: tuple[float, ...],
    border: int,
    flip_prob: float,
) -> tuple[Affine, np.ndarray]:
    """mmdetection's RandomCenterCropPad (train mode, zero padding), keep-ratio Resize to `size` and
    RandomFlip(flip_prob) as one affine map from original to input pixels.

    Returns (affine, keep (n,) bool): the boxes RandomCenterCropPad keeps; `transform_boxes` then maps and
    clips them to the `size` x `size` input.
    """
    window = center_crop_window(rng, width, height, boxes, size, ratios, border)
    flip = bool(rng.random() < flip_prob)
    return window_affine(window, size, flip), window.keep


def resize_affine(width: int, height: int, size: int) -> tuple[Affine, tuple[int, int]]:
    """Keep-ratio resize of the longer side to `size`, centred in a `size` x `size` input."""
    scale = size / max(width, height)
    a = scale_translate(scale, (size - width * scale) / 2, (size - height * scale) / 2)
    return a, (size, size)


def pad_affine(width: int, height: int) -> tuple[Affine, tuple[int, int]]:
    """Original resolution in an input of (side | 31) + 1 pixels, mmdetection's test padding
    (RandomCenterCropPad, test mode, `logical_or` 31 plus one pixel): the image's pixel side // 2 sits on
    the input's pixel out // 2, so it starts at out // 2 - side // 2 (one pixel further right or down than
    (out - side) // 2 for odd sides)."""
    out_w, out_h = (width | 31) + 1, (height | 31) + 1
    return scale_translate(1.0, out_w // 2 - width // 2, out_h // 2 - height // 2), (out_w, out_h)


def eval_affine(width: int, height: int, spec: DataSpec) -> tuple[Affine, tuple[int, int]]:
    """The test-time map of an image of `width` x `height` pixels and the input size (W, H) it gives:
    `resize_affine` to test_size (input_size when unset) or `pad_affine`, as `spec.test_mode` says."""
    if spec.test_mode == "resize":
        return resize_affine(width, height, spec.test_size or spec.input_size)
    return pad_affine(width, height)


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


def inside_mask(a: Affine, width: int, height: int, out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Which output columns (W,) and rows (H,) of a warp by `a` (scale, translate, mirror) sample the image:
    those whose pixel centre maps back into [0, width) x [0, height) original pixels. The rest is padding."""
    inv = invert(a)
    cols = inv[0, 0] * (np.arange(out_size[0]) + 0.5) + inv[0, 2]
    rows = inv[1, 1] * (np.arange(out_size[1]) + 0.5) + inv[1, 2]
    return (cols >= 0) & (cols < width), (rows >= 0) & (rows < height)


def inside_window(a: Affine, width: int, height: int, out_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """`inside_mask` as the rectangle it is: output columns [x0, x1) and rows [y0, y1) (empty: x0 == x1)."""
    cols, rows = inside_mask(a, width, height, out_size)

    def span(m: np.ndarray) -> tuple[int, int]:
        idx = np.flatnonzero(m)
        return (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)

    (x0, x1), (y0, y1) = span(cols), span(rows)
    return x0, x1, y0, y1


def zero_padding_(planes: np.ndarray, a: Affine, width: int, height: int) -> np.ndarray:
    """Set the padding of a warped (3, H, W) image to 0, in place: every pixel whose centre maps outside
    the original image (`inside_mask`).

    PIL's bilinear warp repeats the edge pixels half a pixel beyond the image; and mmdetection distorts
    colours before it crops and pads, so its padding stays 0, while the pipeline here distorts after the
    warp (on the smaller image), which would shift the padding too (brightness)."""
    cols, rows = inside_mask(a, width, height, (planes.shape[2], planes.shape[1]))
    if not cols.all():
        planes[:, :, ~cols] = 0
    if not rows.all():
        planes[:, ~rows, :] = 0
    return planes


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
