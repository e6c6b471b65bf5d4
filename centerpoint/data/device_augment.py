"""The second half of the training pipeline, batched on the training device (`data.augment_on: device`).

Workers then only decode images and draw each sample's augmentation (the same draws, from the same
(seed, epoch, index) generators, as `augment_on: workers`); the batch that crosses to the device holds
the decoded images and the draws, about a sixth of the bytes of finished 512-pixel samples with their
80-class heatmaps. Here, for the whole batch at once: the affine warp (bilinear `grid_sample`, zero
padding), the photometric distortion, the padding set back to 0, and the CenterNet targets.

Same semantics as the worker path (`loader.DetectionDataset`): the same geometry (output pixel centres
map through the same affine; outside the image is 0), the same distortion formulas in float32
(`photometric.py`), the same targets. Only rounding differs: the worker path rounds the warped image to
uint8 (PIL) and truncates the distorted one; here images stay float32 in 0..255 (`tests/test_device_augment.py`
bounds the difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from centerpoint.data.targets import make_targets

# Columns of the per-image distortion vector `collate_source` ships ("distortion", (B, 9) float32).
BRIGHTNESS, CONTRAST_FIRST, SATURATION, HUE, CONTRAST_LAST, HSV, ORDER = 0, 1, 2, 3, 4, 5, slice(6, 9)


def warp_batch(source: Tensor, to_source: Tensor, source_hw: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Warp decoded images into the network input.

    source: (B, H, W, 3) uint8 decoded images, each in the top-left corner of a zero canvas.
    to_source: (B, 2, 3) float32 affine from input pixels to source pixels (continuous coordinates:
        pixel (i, j) covers [j, j + 1) x [i, i + 1)). source_hw: (B, 2) float32 each image's decoded
        (height, width). out_hw: the input's (height, width), pixels.
    Returns images (B, 3, h, w) float32 0..255: bilinear samples at the output pixel centres. Pixels whose
    centre maps outside the image hold edge pixels; `window_mask` tells which they are.
    """
    b, height, width, _ = source.shape
    h, w = out_hw
    dev = source.device
    ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5).view(1, 1, w)
    m = to_source.to(torch.float32)
    sx = m[:, 0, 0, None, None] * xs + m[:, 0, 1, None, None] * ys + m[:, 0, 2, None, None]  # (B, h, w)
    sy = m[:, 1, 0, None, None] * xs + m[:, 1, 1, None, None] * ys + m[:, 1, 2, None, None]
    src_h, src_w = source_hw[:, 0, None, None], source_hw[:, 1, None, None]
    # Within half a pixel of its edge an image repeats its edge pixels (as PIL's and OpenCV's bilinear
    # warps do) instead of fading into the canvas: sample positions are clamped to the outermost pixel
    # centres of each image. Pixels whose centre maps outside are set to 0 by the caller via `inside`.
    sx = torch.minimum(torch.clamp(sx, min=0.5), src_w - 0.5)
    sy = torch.minimum(torch.clamp(sy, min=0.5), src_h - 0.5)
    # grid_sample's align_corners=False coordinates: -1 and 1 are the outer edges of the canvas.
    grid = torch.stack([sx * (2.0 / width) - 1.0, sy * (2.0 / height) - 1.0], dim=-1)
    pixels = source.permute(0, 3, 1, 2).to(torch.float32)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def window_mask(window: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """(B, 4) int64 windows (columns [x0, x1), rows [y0, y1) that show the image) -> (B, 1, h, w) bool."""
    h, w = out_hw
    xs = torch.arange(w, device=window.device).view(1, 1, w)
    ys = torch.arange(h, device=window.device).view(1, h, 1)
    x0, x1, y0, y1 = (window[:, k, None, None] for k in range(4))
    return ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))[:, None]


def hsv_round_trip(rgb: Tensor, saturation: Tensor, hue: Tensor) -> Tensor:
    """RGB -> HSV, S *= saturation, H += hue (degrees), -> RGB, on (B, 3, H, W) float32 (0..255 units,
    unclipped); saturation, hue: (B,) per image. The direct form of `photometric.py`'s formulas."""
    r, g, b = rgb.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    positive, grey = v > 0, delta <= 0
    s = torch.where(positive, delta / torch.where(positive, v, torch.ones_like(v)), torch.zeros_like(v))
    safe = torch.where(grey, torch.ones_like(delta), delta)
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(grey, torch.zeros_like(h), torch.remainder(h * 60.0, 360.0))
    s = s * saturation.view(-1, 1, 1)
    h = torch.remainder(h + hue.view(-1, 1, 1), 360.0)
    c = v * s
    hp = h / 60.0
    x = c * (1 - torch.abs(torch.remainder(hp, 2.0) - 1))
    sector = torch.floor(hp).to(torch.int64) % 6
    zero, m = torch.zeros_like(c), v - c

    def channel(takes_c: tuple[int, int], takes_x: tuple[int, int]) -> Tensor:
        """c in the sectors `takes_c`, x in `takes_x`, else 0; plus v - c."""
        is_c = (sector == takes_c[0]) | (sector == takes_c[1])
        is_x = (sector == takes_x[0]) | (sector == takes_x[1])
        return torch.where(is_c, c, torch.where(is_x, x, zero)) + m

    # Sectors 0..5 give (R, G, B) = (c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x).
    return torch.stack([channel((0, 5), (1, 4)), channel((1, 2), (0, 3)), channel((3, 4), (2, 5))], dim=1)


def distort_batch(images: Tensor, distortion: Tensor) -> Tensor:
    """mmdetection's photometric distortion of each image by its own draw (see `photometric.Distortion`;
    `loader.distortion_vector` packs it): (B, 3, H, W) float32 0..255 -> the same, clipped to 0..255.
    Steps not drawn are identities (brightness 0, factors 1), the colour-space round trip is selected
    per image."""
    d = distortion.to(torch.float32)
    col = lambda j: d[:, j].view(-1, 1, 1, 1)  # noqa: E731
    x = (images + col(BRIGHTNESS)) * col(CONTRAST_FIRST)
    x = torch.where(col(HSV) > 0, hsv_round_trip(x, d[:, SATURATION], d[:, HUE]), x)
    x = x * col(CONTRAST_LAST)
    order = d[:, ORDER].to(torch.int64).view(-1, 3, 1, 1).expand(x.shape)
    return torch.gather(x, 1, order).clamp_(0.0, 255.0)


def augment_batch(batch: dict[str, Tensor], max_radius: int, input_size: int, num_classes: int, stride: int,
                  min_overlap: float) -> dict[str, Tensor]:
    """A `collate_source` batch (its tensors on the device; `max_radius`, its host-side entry, as an int)
    -> the train step's batch: "images" (B, 3, S, S) float32 0..255 and the targets of `make_targets`
    (feature-map cells), S = input_size. No host sync."""
    out_hw = (input_size, input_size)
    images = warp_batch(batch["source"], batch["to_source"], batch["source_hw"], out_hw)
    if "distortion" in batch:
        images = distort_batch(images, batch["distortion"])
    # Padding is 0, also after the distortion (mmdetection distorts before it pads).
    images = images * window_mask(batch["window"], out_hw)
    feat = (input_size // stride, input_size // stride)
    targets = make_targets(batch["boxes"], batch["labels"], num_classes, feat, stride, min_overlap,
                           max_radius=max_radius, check_labels=False)
    return {"images": images, **targets}
