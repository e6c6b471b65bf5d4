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

Ownership: a dataset directory is the project's only when its ``DONE`` manifest lists every file in it
with the size and sha256 it was written with. Only such a directory (or an empty one) is ever replaced;
anything else at the target path is refused with an error, so a user's own data is never touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from centerpoint.errors import CenterpointError

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
_JPEG_QUALITY = 90
_MANIFEST = "DONE"
_TMP_MARKER = ".centerpoint-tmp"  # written first into each temp dir: only marked ones are ever cleaned up
_STALE_TMP_S = 3600.0  # temp dirs older than this are leftovers of crashed runs, s

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), px


def default_cache_dir() -> Path:
    """Return the cache root: ``$CENTERPOINT_CACHE`` or ``~/.cache/centerpoint``.

    Callers append the dataset name (e.g. ``shapes-v1-seed0``) themselves.
    """
    env = os.environ.get("CENTERPOINT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "centerpoint"


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


# ----------------------------------------------------------------------------------------------------
# Writing the cached COCO dataset


Digest = tuple[int, str]  # a file's size (bytes) and sha256 hex digest


def _digest(path: Path) -> Digest:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _write_one(job: tuple[str, int, str, int]) -> tuple[int, int, list[tuple[int, list[float]]], Digest]:
    """Render one image and save it as JPEG; returns (width, height, objects, file digest). Runs in workers."""
    out_dir, seed, split, index = job
    image, objects = render_sample(seed, split, index)
    path = Path(out_dir) / split / f"{index:06d}.jpg"
    image.save(path, quality=_JPEG_QUALITY)
    return image.width, image.height, objects, _digest(path)


def _identity(seed: int, num_train: int, num_val: int) -> dict:
    """What a dataset is: the manifest minus its file list."""
    return {"name": "shapes", "version": VERSION, "seed": seed, "num_train": num_train,
            "num_val": num_val, "classes": list(CLASSES)}


def _read_manifest(root: Path) -> dict | None:
    try:
        found = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _is_complete(root: Path, identity: dict) -> bool:
    found = _read_manifest(root)
    return found is not None and {k: v for k, v in found.items() if k != "files"} == identity and all(
        (root / "annotations" / f"instances_{s}.json").is_file() for s in ("train", "val")
    )


def is_shapes_dataset(root: Path, seed: int, num_train: int, num_val: int) -> bool:
    """Whether ``root`` holds the complete dataset for (seed, counts); reads only."""
    return _is_complete(Path(root).expanduser(), _identity(seed, num_train, num_val))


def _is_ours(root: Path) -> bool:
    """Whether ``root`` holds exactly the files its manifest lists, each with the listed size and sha256."""
    files = (_read_manifest(root) or {}).get("files")
    if not isinstance(files, dict):
        return False
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()} - {_MANIFEST}
    if present != set(files):
        return False
    return all(list(_digest(root / rel)) == list(want) for rel, want in files.items())


def _refuse(root: Path) -> CenterpointError:
    return CenterpointError(
        f"{root} is not empty and is not a synthetic dataset written by centerpoint (its DONE manifest and "
        "file hashes do not match), so it is left alone: data.dataset=shapes generates only into an empty "
        "directory or the cache. For your own COCO-format data there use data.dataset=coco (what --data-dir "
        "means); otherwise choose another data.root")


def _check_target(root: Path) -> None:
    """Refuse, before any work, a target that holds something this module may not replace."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise _refuse(root)
    if root.is_dir() and any(root.iterdir()) and not _is_ours(root):
        raise _refuse(root)


def _remove_ours(root: Path) -> None:
    """Remove an empty directory or a dataset this module wrote (checked file by file); refuse anything else."""
    if not root.exists():
        return
    _check_target(root)
    if any(root.iterdir()):
        shutil.rmtree(root)
    else:
        root.rmdir()


def _clean_stale_tmp(root: Path) -> None:
    """Remove temp dirs that crashed runs left next to ``root`` (marked as ours, old enough not to be in use)."""
    now = time.time()
    for tmp in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            if (tmp / _TMP_MARKER).is_file() and now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _coco_json(split: str, results: list[tuple[int, int, list[tuple[int, list[float]]], Digest]]) -> dict:
    images, annotations = [], []
    for index, (width, height, objects, _) in enumerate(results):
        image_id = index + 1  # 1-based: some tools treat id 0 as "missing"
        images.append({"id": image_id, "file_name": f"{index:06d}.jpg", "width": width, "height": height})
        for category_id, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    info = {"description": f"centerpoint synthetic shapes v{VERSION} ({split})", "version": str(VERSION)}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def _generate(tmp: Path, seed: int, counts: dict[str, int], workers: int,
              progress: Callable[[int, int], None] | None) -> dict[str, Digest]:
    """Write every image and the annotation files into ``tmp``; returns each file's digest by relative path."""
    jobs = [(str(tmp), seed, split, i) for split, n in counts.items() for i in range(n)]
    total, done = len(jobs), 0
    results: list[tuple[int, int, list[tuple[int, list[float]]], Digest]] = []
    if progress is not None:
        progress(0, total)
    if workers > 1:
        # spawn, not fork: the parent may hold torch thread pools that a forked child must not inherit.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_write_one, jobs, chunksize=16):  # imap keeps job order
                results.append(result)
                done += 1
                if progress is not None:
                    progress(done, total)
    else:
        for job in jobs:
            results.append(_write_one(job))
            done += 1
            if progress is not None:
                progress(done, total)
    files = {f"{split}/{index:06d}.jpg": r[3] for (_, _, split, index), r in zip(jobs, results, strict=True)}
    start = 0
    for split, n in counts.items():
        coco = _coco_json(split, results[start:start + n])
        start += n
        path = tmp / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(coco))
        files[f"annotations/{path.name}"] = _digest(path)
    return files


def ensure_shapes_dataset(
    root: Path,
    seed: int = 0,
    num_train: int = 3000,
    num_val: int = 300,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Make sure the shapes dataset for (seed, counts) is at ``root`` as COCO; return ``root``.

    Layout: ``root/{train,val}/NNNNNN.jpg`` and ``root/annotations/instances_{train,val}.json``.
    A complete dataset (its ``DONE`` manifest matches seed, counts and version) is reused as is.
    Otherwise it is generated in a temp dir next to ``root``, the manifest (with every file's size and
    sha256) is written last and the directory renamed into place, so a crash never leaves a half-written
    dataset that looks complete. ``root`` must be absent, empty, or a dataset this module wrote (checked
    against its manifest); anything else raises a CenterpointError before any work, and is left as it is.
    ``progress(done, total)`` is called as images are written. ``workers`` defaults to up to 2
    processes; the output is identical for any worker count.
    """
    _check_args(seed, "train")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    root = Path(root).expanduser()
    identity = _identity(seed, num_train, num_val)
    if _is_complete(root, identity):
        return root
    _check_target(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)
    if workers is None:
        # Spawning workers costs about a second; not worth it for small sets.
        workers = 1 if num_train + num_val < 200 else min(2, os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / _TMP_MARKER).write_text("")
        for sub in ("train", "val", "annotations"):
            (tmp / sub).mkdir()
        files = _generate(tmp, seed, {"train": num_train, "val": num_val}, workers, progress)
        (tmp / _TMP_MARKER).unlink()
        manifest = {**identity, "files": {rel: list(d) for rel, d in sorted(files.items())}}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks tmp complete
        if _is_complete(root, identity):  # another process finished first
            return root
        _remove_ours(root)
        try:
            tmp.rename(root)
        except OSError:
            # Lost a race with a concurrent generator between removal and rename; theirs is as good.
            if not _is_complete(root, identity):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
