"""Photometric distortion with mmdetection's parameters: brightness +-32, contrast and saturation x0.5-1.5,
hue +-18 degrees, random channel swap; each applied with probability 0.5, contrast before or after the
colour-space steps at random. Works on (H, W, 3) RGB arrays; the result is clipped back to uint8.
"""

from __future__ import annotations

import numpy as np

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float RGB in 0..255 -> HSV with H in degrees [0, 360), S in [0, 1], V in 0..255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0.0)
    safe = np.where(delta > 0, delta, 1)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = np.where(delta > 0, (h * 60.0) % 360.0, 0.0)
    return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv`."""
    h, s, v = hsv[..., 0] % 360.0, hsv[..., 1], hsv[..., 2]
    c = v * s
    hp = h / 60.0
    x = c * (1 - np.abs(hp % 2 - 1))
    zero = np.zeros_like(c)
    sector = np.floor(hp).astype(np.int64) % 6
    choices = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    rgb = np.zeros(hsv.shape, dtype=hsv.dtype)
    for k, (rr, gg, bb) in enumerate(choices):
        sel = sector == k
        rgb[..., 0] = np.where(sel, rr, rgb[..., 0])
        rgb[..., 1] = np.where(sel, gg, rgb[..., 1])
        rgb[..., 2] = np.where(sel, bb, rgb[..., 2])
    return rgb + (v - c)[..., None]


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomly distort an (H, W, 3) uint8 RGB image; returns a new uint8 array."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img += rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img *= rng.uniform(*CONTRAST_RANGE)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = rgb_to_hsv(img)
        if do_sat:
            hsv[..., 1] *= rng.uniform(*SATURATION_RANGE)
        if do_hue:
            hsv[..., 0] += rng.uniform(-HUE_DELTA, HUE_DELTA)
        img = hsv_to_rgb(hsv)
    if not contrast_first and rng.random() < 0.5:
        img *= rng.uniform(*CONTRAST_RANGE)
    if rng.random() < 0.5:
        img = img[..., rng.permutation(3)]
    return np.clip(img, 0, 255).astype(np.uint8)
