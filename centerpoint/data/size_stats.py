"""Sizes in a dataset, to choose `data.input_size` and `data.test_size` from: percentiles of image and box
sizes and of objects per image, and a suggestion with its reasons (for `centerpoint data check`).

The rules, for CenterNet's stride-4 output: at test time (`test_mode: resize`) the longer image side is
scaled to `test_size`, so that side should keep the small objects at least MIN_OBJECT pixels wide (2
feature cells: below that, neighbouring centres merge) without enlarging the typical image; the training
crop (`input_size`) should hold the large objects at that scale with some context, and need not be
larger than the scaled images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
MIN_OBJECT = 8.0  # input pixels: 2 cells of the stride-4 heatmap
CONTEXT = 1.25  # training crop side per side of a large (95th percentile) object
SIZE_RANGE = (128, 1024)  # suggestions stay in this range (multiples of 32)


@dataclass(frozen=True)
class SplitSizes:
    """Raw sizes of one split: images (width, height), usable boxes (width, height after clipping to the
    image), objects per image. Pixels."""

    image_wh: np.ndarray  # (N, 2)
    box_wh: np.ndarray  # (M, 2)
    per_image: np.ndarray  # (N,) usable boxes per image


def percentile_rows(sizes: SplitSizes) -> list[tuple[str, list[float]]]:
    """(what, values at PERCENTILES) rows: image width/height/longer side, box width/height/side
    (sqrt of area), objects per image."""
    img, box = sizes.image_wh.astype(np.float64), sizes.box_wh.astype(np.float64)
    rows = [("image width", img[:, 0]), ("image height", img[:, 1]), ("image longer side", img.max(axis=1)),
            ("box width", box[:, 0]), ("box height", box[:, 1]), ("box side (sqrt area)", np.sqrt(box.prod(axis=1))),
            ("objects per image", sizes.per_image.astype(np.float64))]
    return [(name, [float(v) for v in np.percentile(values, PERCENTILES)]) for name, values in rows if len(values)]


def _up32(x: float) -> int:
    return int(min(max(32 * math.ceil(x / 32), SIZE_RANGE[0]), SIZE_RANGE[1]))


@dataclass(frozen=True)
class Suggestion:
    input_size: int
    test_size: int
    reasons: tuple[str, ...]


def suggest(sizes: SplitSizes) -> Suggestion | None:
    """input_size and test_size for a train split (None when it has no usable box), with the reasons."""
    if not len(sizes.box_wh) or not len(sizes.image_wh):
        return None
    longer = float(np.median(sizes.image_wh.max(axis=1)))
    small = float(np.percentile(sizes.box_wh.min(axis=1), 5))  # shorter side of the small objects
    large = float(np.percentile(sizes.box_wh.max(axis=1), 95))
    test = _up32(longer)
    reasons = [f"test_size {test}: the median image's longer side is {longer:.0f} px"]
    if small * test / longer < MIN_OBJECT:
        need = _up32(MIN_OBJECT / max(small, 1e-6) * longer)
        p95 = float(np.percentile(sizes.image_wh.max(axis=1), 95))
        test = max(test, min(need, _up32(p95)))
        reasons[0] = (f"test_size {test}: small objects (5th percentile shorter box side {small:.0f} px) stay "
                      f"{small * test / longer:.1f} px or more at that scale (2 heatmap cells = {MIN_OBJECT:.0f} px; "
                      f"images at most enlarged to their 95th percentile longer side, {p95:.0f} px)")
    scale = test / longer
    crop = min(_up32(CONTEXT * large * scale), test)
    reasons.append(f"input_size {crop}: a large object (95th percentile longer box side {large:.0f} px, "
                   f"{large * scale:.0f} px at test scale) with context; at most test_size")
    return Suggestion(crop, test, tuple(reasons))
