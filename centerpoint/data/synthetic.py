"""The built-in "shapes" dataset: procedurally drawn shapes on noisy backgrounds, cached as COCO.

Each image is a pure function of ``(seed, split, index)``: its RNG is
``np.random.default_rng([seed, split_id, index])``, so any image can be regenerated on its own, in any
order, by any number of workers, and comes out pixel-identical.

What an image contains (all sizes in pixels):

* Width and height drawn independently from [160, 320].
* One of three background kinds -- a linear two-colour gradient, low-frequency colour blobs
  (a 2..6 cell random grid upsampled bicubically), or soft stripes (a sinusoid between two nearby
  colours, 16..64 px period) -- then gaussian noise (sigma 3..18 grey levels) over the whole image,
  objects included, so objects are not flat-coloured giveaways.
* 1..10 objects, classes drawn uniformly from ``CLASSES``. Box sides lie in [S/10, S/2] with S the
  image's shorter side; the side length is uniform in that range and the aspect ratio h/w in
  [0.8, 1.25] (ellipses for "circle", rectangles for "square"). Triangles, stars and crosses are
  rotated by any angle and squares by up to 15 degrees; a rotated outline is then stretched to fill
  its box, so every shape touches all four sides of its box. Classes differ by outline only: colours
  are random and independent of the class.
* Colours are chosen so that the mean RGB distance between the object colour and the pixels it
  covers is at least ``_MIN_CONTRAST`` (the best of 20 tries if none reaches it), so every object is
  visible against its local background (including objects drawn earlier).
* Occlusion rule: objects are drawn in order, later on top. A placement is rejected when, after
  adding it, any object's box would be covered more than 40% (by area) by the union of the boxes of
  objects drawn after it. After 30 rejected placements the object is dropped, so an image may hold
  fewer objects than drawn (never fewer than one: the first object always fits).
* Boxes are amodal (the whole shape, even where a later object covers it) and tight around every
  pixel the anti-aliased shape touches, COCO ``[x, y, w, h]`` with integer pixel-edge coordinates;
  ``area`` is ``w * h``. Using any coverage (not >= 50%) keeps sharp star and triangle tips inside
  the box, so the box is the shape's geometric extent rounded out to whole pixels.

Writing the dataset into the cache, and owning it there, is ``shapes_cache.py``'s part.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Bump whenever rendering changes, so stale caches are regenerated rather than silently reused.
VERSION = 1

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_MIN_SIDE, _MAX_SIDE = 160, 320  # image side range, px
_MAX_OBJECTS = 10
_MAX_COVER = 0.4  # max fraction of an object's box covered by boxes drawn after it
_PLACE_TRIES = 30
_COLOUR_TRIES = 20
_MIN_CONTRAST = 100.0  # mean RGB euclidean distance to covered background, grey levels (max ~441)
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down for anti-aliased edges

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), px


# ----------------------------------------------------------------------------------------------------
# Rendering


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3).astype(np.float32)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Noise-free background, float32 ``(height, width, 3)`` in grey levels [0, 255]."""
    kind = int(rng.integers(3))
    # Broadcast row/column coordinates instead of full grids: half the memory traffic.
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    if kind == 0:  # linear gradient between two random colours in a random direction
        c0, c1 = _random_colour(rng), _random_colour(rng)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        return c0 + (c1 - c0) * t[..., None]
    if kind == 1:  # low-frequency blobs: a coarse random colour grid, upsampled smoothly
        gh, gw = (int(v) for v in rng.integers(2, 7, size=2))
        grid = rng.uniform(0.0, 255.0, size=(gh, gw, 3)).astype(np.uint8)
        up = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
        return np.asarray(up, dtype=np.float32)
    # Soft stripes between two nearby colours: texture with edges, but weaker than object edges.
    c0 = _random_colour(rng)
    c1 = np.clip(c0 + rng.uniform(-80.0, 80.0, size=3), 0.0, 255.0).astype(np.float32)
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(16.0, 64.0)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    t = 0.5 + 0.5 * np.sin(2.0 * math.pi * proj / period + phase)
    return c0 + (c1 - c0) * t[..., None]


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _outline(rng: np.random.Generator, cls: int) -> np.ndarray | None:
    """Polygon of class ``cls`` (0-based) in arbitrary units, or None for the ellipse."""
    name = CLASSES[cls]
    if name == "circle":
        return None
    if name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        return _rotate(pts, rng.uniform(-1.0, 1.0) * math.radians(15.0))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if name == "triangle":
        a = np.arange(3) * (2.0 * math.pi / 3.0)
        pts = np.stack([np.cos(a), np.sin(a)], axis=1)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)  # inner/outer radius; keeps five clear points
        a = np.arange(10) * (math.pi / 5.0)
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    else:  # cross: a plus sign with arm half-thickness t
        t = rng.uniform(0.3, 0.4)
        pts = np.array(
            [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t],
             [-1, -t], [-t, -t]],
            dtype=np.float64,
        )
    return _rotate(pts, angle)


def _shape_alpha(rng: np.random.Generator, cls: int, w: int, h: int) -> np.ndarray:
    """Anti-aliased coverage mask, float32 ``(h, w)`` in [0, 1], of a shape that fills a w x h box."""
    ss = _SUPERSAMPLE
    big = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(big)
    outline = _outline(rng, cls)
    if outline is None:
        draw.ellipse([0, 0, w * ss - 1, h * ss - 1], fill=255)
    else:
        # Stretch the (rotated) outline so its extent is exactly the box: every shape touches all four
        # sides, which is what makes the box tight by construction.
        lo, hi = outline.min(axis=0), outline.max(axis=0)
        unit = (outline - lo) / (hi - lo)
        pts = unit * np.array([w * ss - 1, h * ss - 1])
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255)
    small = big.reduce(ss)  # box filter: the mean coverage of each output pixel
    return np.asarray(small, dtype=np.float32) / 255.0


def _tight(alpha: np.ndarray) -> Box:
    """Tight box (x0, y0, x1, y1 exclusive) of all pixels the shape touches, in mask coordinates."""
    on = alpha > 0.0
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


class _Occlusion:
    """Tracks, per placed object, which pixels of its box are covered by boxes placed after it."""

    def __init__(self) -> None:
        self.boxes: list[Box] = []
        self.covered: list[np.ndarray] = []  # bool (h, w) per box

    def _overlaps(self, box: Box) -> list[tuple[np.ndarray, np.ndarray]]:
        """(covered mask, view of it under ``box``) for every placed box that ``box`` overlaps."""
        bx0, by0, bx1, by1 = box
        out = []
        for (ax0, ay0, ax1, ay1), cov in zip(self.boxes, self.covered, strict=True):
            x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
            if x0 < x1 and y0 < y1:
                out.append((cov, cov[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]))
        return out

    def fits(self, box: Box) -> bool:
        """Whether placing ``box`` on top keeps every placed box at most _MAX_COVER covered."""
        for cov, under in self._overlaps(box):
            newly = under.size - int(np.count_nonzero(under))
            if (int(np.count_nonzero(cov)) + newly) / cov.size > _MAX_COVER:
                return False
        return True

    def add(self, box: Box) -> None:
        for _, under in self._overlaps(box):
            under[...] = True
        self.boxes.append(box)
        self.covered.append(np.zeros((box[3] - box[1], box[2] - box[0]), dtype=bool))


def _pick_colour(rng: np.random.Generator, under: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Colour whose weighted mean RGB distance to the ``under`` pixels is >= _MIN_CONTRAST if possible."""
    best, best_score = _random_colour(rng), -1.0
    for _ in range(_COLOUR_TRIES):
        colour = _random_colour(rng)
        dist = np.linalg.norm(under - colour, axis=-1)
        score = float((dist * weight).sum() / max(float(weight.sum()), 1e-6))
        if score > best_score:
            best, best_score = colour, score
        if score >= _MIN_CONTRAST:
            break
    return best


def _check_args(seed: int, split: str) -> int:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    return _SPLIT_IDS[split]


def render_sample(seed: int, split: str, index: int) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """Render image ``index`` of ``split`` deterministically from ``seed``.

    Returns the RGB image (before JPEG compression) and its objects as ``(category_id, [x, y, w, h])``
    with category ids 1-based into ``CLASSES`` and boxes in pixels (COCO xywh, integer-valued).
    """
    split_id = _check_args(seed, split)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, split_id, index])
    width, height = (int(v) for v in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, size=2))
    canvas = _background(rng, width, height)
    short = min(width, height)
    lo_side, hi_side = math.ceil(short / 10), short // 2

    occlusion = _Occlusion()
    objects: list[tuple[int, list[float]]] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        cls = int(rng.integers(len(CLASSES)))
        side = rng.uniform(lo_side, hi_side)
        aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
        w = int(np.clip(round(side / math.sqrt(aspect)), lo_side, hi_side))
        h = int(np.clip(round(side * math.sqrt(aspect)), lo_side, hi_side))
        alpha = _shape_alpha(rng, cls, w, h)
        tx0, ty0, tx1, ty1 = _tight(alpha)
        alpha = alpha[ty0:ty1, tx0:tx1]
        bw, bh = tx1 - tx0, ty1 - ty0
        for _ in range(_PLACE_TRIES):
            x0, y0 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            if occlusion.fits(box):
                break
        else:
            continue  # no acceptable spot: drop this object rather than hide another one
        region = canvas[y0:y0 + bh, x0:x0 + bw]
        colour = _pick_colour(rng, region, alpha)
        region += (colour - region) * alpha[..., None]  # alpha-composite in place (view into canvas)
        occlusion.add(box)
        objects.append((cls + 1, [float(x0), float(y0), float(bw), float(bh)]))

    sigma = rng.uniform(3.0, 18.0)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * sigma
    np.clip(canvas, 0.0, 255.0, out=canvas)
    pixels = (canvas + 0.5).astype(np.uint8)  # round half up; values are already non-negative
    return Image.fromarray(pixels, "RGB"), objects
