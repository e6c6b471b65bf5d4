"""Photometric distortion with mmdetection's parameters: brightness +-32, contrast and saturation x0.5-1.5,
hue +-18 degrees, random channel swap; each applied with probability 0.5, contrast before or after the
colour-space steps at random. Works on (H, W, 3) RGB arrays; the result is clipped back to uint8.

All arithmetic is float32, in this order: brightness (add, 0..255 units), contrast (multiply) if first,
RGB -> HSV, saturation (multiply S), hue (add to H, degrees), HSV -> RGB, contrast if last, channel
swap, clip to [0, 255] and truncate to uint8. Intermediate values are not clipped (as in mmdetection).

HSV: V = max(R, G, B), S = (V - min) / V (0 where V <= 0), H = 60 * (offset + ratio) % 360 degrees with
offset 0 / 2 / 4 and ratio (G - B) / (V - min), (B - R) / ..., (R - G) / ... when V is R / G / B (in that
order of precedence; H = 0 for grey pixels); back: C = V * S, H' = H / 60, X = C * (1 - |H' % 2 - 1|),
(C, X, 0) placed by the sector floor(H') % 6, plus V - C. `tests/test_pipeline.py` keeps that direct
form on (..., 3) arrays as the reference; `apply_distortion` computes the same values bit for bit, only
cheaper (`benchmarks/data_pipeline.py`): an image without saturation/hue steps is one 256-entry uint8
table lookup (every other step acts on each channel value alone); otherwise the colour-space steps run
branch-free on cache-sized blocks of rows (see `_hsv_round_trip` for why each step is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0
BLOCK_PIXELS = 1 << 14  # pixels per block of the colour-space steps: 64 KB per float32 plane

_F32 = np.float32


@dataclass(frozen=True)
class Distortion:
    """One image's draw; a field left None is a step not applied.

    brightness: added to every channel, 0..255 units; contrast, saturation: factors; hue: degrees added;
    contrast_first: contrast before the HSV steps (else after); channel_order: output channel j is input
    channel channel_order[j].
    """

    brightness: float | None = None
    contrast: float | None = None
    contrast_first: bool = True
    saturation: float | None = None
    hue: float | None = None
    channel_order: tuple[int, int, int] | None = None


def draw_distortion(rng: np.random.Generator) -> Distortion:
    """Draw one image's distortion (mmdetection's PhotoMetricDistortion order of draws)."""
    brightness = rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA) if rng.random() < 0.5 else None
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(*CONTRAST_RANGE) if contrast_first and rng.random() < 0.5 else None
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    saturation = rng.uniform(*SATURATION_RANGE) if do_sat else None
    hue = rng.uniform(-HUE_DELTA, HUE_DELTA) if do_hue else None
    if not contrast_first and rng.random() < 0.5:
        contrast = rng.uniform(*CONTRAST_RANGE)
    order = tuple(int(c) for c in rng.permutation(3)) if rng.random() < 0.5 else None
    return Distortion(brightness, contrast, contrast_first, saturation, hue, order)  # type: ignore[arg-type]


def _bits(members: tuple[int, ...]) -> np.uint8:
    """A bit set of hue sectors, for `_in_sectors`."""
    return np.uint8(sum(1 << k for k in members))


# Which of (c, x) each output channel takes in each hue sector 0..6 (sector 6, reached when H rounds to
# 360 degrees, is sector 0); a channel taking neither is 0 (before the common `+ (v - c)`).
_TAKES_C = (_bits((0, 5, 6)), _bits((1, 2)), _bits((3, 4)))
_TAKES_X = (_bits((1, 4)), _bits((0, 3, 6)), _bits((2, 5)))


def _in_sectors(bits: np.uint8, sector: np.ndarray) -> np.ndarray:
    """float32 1 where `sector` (uint8 0..6) is in the bit set, else 0."""
    return ((bits >> sector) & 1).astype(_F32)


def _hsv_round_trip(r: np.ndarray, g: np.ndarray, b: np.ndarray, saturation: float | None,
                    hue: float | None) -> list[np.ndarray]:
    """RGB -> HSV, S *= saturation, H += hue, HSV -> RGB on float32 planes, bit for bit as the direct form.

    Why it is exact: max/min/compare pick values without rounding; every +, -, *, / of the direct form
    is the same float32 operation on the same operands here. A selection among values is written as a
    sum of products with 0/1 masks of which exactly one is 1: exact for finite values (the others add
    signed zeros), and without branches to mispredict (np.where is several times slower here); a
    denominator that does not matter (S where V <= 0, H of grey pixels) is replaced by a nonzero one
    without a select. The three `%` are replaced by
    what they give on their known input ranges (fmod is exact; the replacements are exact subtractions
    by Sterbenz' lemma, or the same rounded `+ 360`): 60 * H0 in [-60, 300] with H0 = offset + ratio in
    [-1, 5], H in [-18, 378] after the hue shift, and H / 60 in [0, 6]. Signed zeros may differ from the
    direct form but never reach the uint8 result.
    """
    v = np.maximum(np.maximum(r, g), b)
    delta = v - np.minimum(np.minimum(r, g), b)
    positive = v > 0
    s = delta / (v - ~positive)  # v, or a v - 1 <= -1 that is never used: S = 0 where V <= 0
    s *= positive
    is_r = v == r
    is_g = (v == g) & ~is_r
    is_b = ~(is_r | is_g)
    grey = delta <= 0
    h = (g - b) * is_r + (b - r) * is_g + (r - g) * is_b  # numerator of the ratio, selected
    h /= delta + grey  # delta, or 1 for grey pixels
    h += _F32(2) * is_g + _F32(4) * is_b  # the sector offset (0 for red)
    h *= 60.0
    h += _F32(360) * (h < 0)  # (60 H0) % 360
    h *= ~grey  # no hue for grey pixels
    if saturation is not None:
        s *= saturation
    if hue is not None:
        h += hue
        h += _F32(360) * (h < 0) - _F32(360) * (h >= 360)  # H % 360, H in [-18, 378]
    else:
        h -= _F32(360) * (h >= 360)  # H % 360, H in [0, 360]
    c = v * s
    hp = h / 60.0
    x = c * (1 - np.abs(hp - 2 * np.floor(hp * 0.5) - 1))  # hp - 2 floor(hp / 2) == hp % 2
    sector = np.floor(hp).astype(np.uint8)
    m = v - c
    return [c * _in_sectors(tc, sector) + x * _in_sectors(tx, sector) + m
            for tc, tx in zip(_TAKES_C, _TAKES_X, strict=True)]


def apply_distortion(image: np.ndarray, d: Distortion, channels_first: bool = False,
                     block_pixels: int = BLOCK_PIXELS) -> np.ndarray:
    """Apply `d` to an (H, W, 3) uint8 RGB image; returns a new uint8 array, (3, H, W) when
    `channels_first` (C-contiguous), else an (H, W, 3) view of such an array.

    The colour-space steps run on blocks of whole rows of about `block_pixels` pixels, so their
    float32 temporaries stay in the CPU cache (pixels are independent, so the result does not depend on
    the block size)."""
    height, width, _ = image.shape
    order = d.channel_order or (0, 1, 2)
    contrast_last = d.contrast if not d.contrast_first else None
    out = np.empty((3, height, width), dtype=np.uint8)
    if d.saturation is None and d.hue is None:  # per-value steps only: one uint8 table
        lut = _value_steps(np.arange(256, dtype=_F32), d)
        if contrast_last is not None:
            lut *= contrast_last
        table = np.clip(lut, 0, 255).astype(np.uint8)
        for j, k in enumerate(order):
            np.take(table, image[..., k], out=out[j])
        return out if channels_first else out.transpose(1, 2, 0)
    block_rows = max(1, block_pixels // max(1, width))
    for top in range(0, height, block_rows):
        rows = slice(top, top + block_rows)
        planes = _value_steps(image[rows].transpose(2, 0, 1).astype(_F32, order="C"), d)  # contiguous planes
        rgb = _hsv_round_trip(planes[0], planes[1], planes[2], d.saturation, d.hue)
        for j, k in enumerate(order):
            plane = rgb[k]
            if contrast_last is not None:
                plane *= contrast_last
            out[j, rows] = np.clip(plane, 0, 255, out=plane)
    return out if channels_first else out.transpose(1, 2, 0)


def _value_steps(values: np.ndarray, d: Distortion) -> np.ndarray:
    """Brightness, then contrast if it comes first, in place on a float32 array."""
    if d.brightness is not None:
        values += d.brightness
    if d.contrast_first and d.contrast is not None:
        values *= d.contrast
    return values


def photometric_distort(image: np.ndarray, rng: np.random.Generator, channels_first: bool = False) -> np.ndarray:
    """Randomly distort an (H, W, 3) uint8 RGB image; returns a new uint8 array, (3, H, W) when
    `channels_first`, else (H, W, 3) (a strided view of the channels-first array)."""
    return apply_distortion(image, draw_distortion(rng), channels_first)
