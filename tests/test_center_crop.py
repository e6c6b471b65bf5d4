"""mmdetection's RandomCenterCropPad (train mode, zero padding) + keep-ratio Resize + RandomFlip as one
affine map: against a direct crop-and-paste reference written from the rule, the window rule's invariants
over many draws, the border formula by hand, and the spec field that turns it on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from centerpoint.data.transforms import (
    CENTRE_TRIES,
    center_crop_affine,
    center_crop_window,
    crop_border,
    transform_boxes,
    warp,
)
from centerpoint.errors import CenterpointError
from centerpoint.spec import CenterCropSpec, DataSpec, ExperimentSpec
from centerpoint.spec_io import load_spec

ROOT = Path(__file__).resolve().parents[1]
RATIOS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)


def reference_crop(
    image: np.ndarray, boxes: np.ndarray, side: int, cx: int, cy: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The rule done directly, one box at a time: paste the image into a zero side x side canvas with
    original pixel (cx, cy) at (side // 2, side // 2), keep the boxes centred strictly inside the pasted
    part, shift them, clip them to the canvas and drop empty ones. Returns (crop, boxes in crop pixels,
    indices of the kept boxes)."""
    h, w = image.shape[:2]
    half = side // 2
    x0, x1, y0, y1 = max(0, cx - half), min(cx + half, w), max(0, cy - half), min(cy + half, h)
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    crop[half - (cy - y0) : half + (y1 - cy), half - (cx - x0) : half + (x1 - cx)] = image[y0:y1, x0:x1]
    out, kept = [], []
    for j, (bx0, by0, bx1, by1) in enumerate(boxes.tolist()):
        mx, my = (bx0 + bx1) / 2, (by0 + by1) / 2
        if not (x0 < mx < x1 and y0 < my < y1):
            continue
        shifted = [bx0 - cx + half, by0 - cy + half, bx1 - cx + half, by1 - cy + half]
        b = [min(max(v, 0.0), float(side)) for v in shifted]
        if b[2] > b[0] and b[3] > b[1]:
            out.append(b)
            kept.append(j)
    return crop, np.array(out, dtype=np.float64).reshape(-1, 4), kept


def resize_flip(boxes: np.ndarray, side: int, size: int, flip: bool) -> np.ndarray:
    """mmdetection's keep-ratio Resize of a side x side crop to size x size, then its horizontal flip."""
    out = boxes * (size / side)
    if flip:
        out = np.stack([size - out[:, 2], out[:, 1], size - out[:, 0], out[:, 3]], axis=1)
    return out


def scene(seed: int, lo: int = 20, hi: int = 240, n_max: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A random image of values 1..255 (0 is the padding) and boxes in it, plus degenerate ones."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
    image = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
    n = int(rng.integers(1, n_max + 1))
    xy = rng.uniform(-10, [w, h], (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 0.6 * max(w, h), (n, 2))], axis=1)
    boxes = np.clip(boxes, 0, [w, h, w, h])
    # Edge cases: zero width, and centres on the left and right image edges (never strictly inside a patch).
    edge = [[-6.0, 0.3 * h, 6.0, 0.5 * h], [w - 5.0, 0.4 * h, w + 5.0, 0.6 * h]]
    boxes = np.concatenate([boxes, edge]).astype(np.float32)
    boxes[0, 2] = boxes[0, 0]
    return image, boxes


# ---- against the direct reference ---------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_ratio_one_warp_equals_reference_crop(flip: bool) -> None:
    size = 64
    for k in range(40):
        image, boxes = scene(k)
        h, w = image.shape[:2]
        window = center_crop_window(np.random.default_rng([5, k]), w, h, boxes, size, (1.0,), 128)
        a, keep = center_crop_affine(np.random.default_rng([5, k]), w, h, boxes, size, (1.0,), 128, float(flip))
        assert window.side == size and abs(a[0, 0]) == 1.0
        crop, want_boxes, kept = reference_crop(image, boxes, window.side, window.cx, window.cy)
        got = warp(Image.fromarray(image), a, (size, size))
        assert np.array_equal(got, crop[:, ::-1] if flip else crop), k
        got_boxes, keep2 = transform_boxes(boxes[keep], a, (size, size), 0.0)
        assert np.flatnonzero(keep)[keep2].tolist() == kept
        np.testing.assert_allclose(got_boxes, resize_flip(want_boxes, size, size, flip), atol=1e-4)


@pytest.mark.parametrize("ratio", RATIOS)
def test_boxes_and_placement_equal_reference_for_every_ratio(ratio: float) -> None:
    size = 64
    for k in range(30):
        image, boxes = scene(100 + k)
        h, w = image.shape[:2]
        flip = k % 2 == 1
        window = center_crop_window(np.random.default_rng([6, k]), w, h, boxes, size, (ratio,), 128)
        a, keep = center_crop_affine(np.random.default_rng([6, k]), w, h, boxes, size, (ratio,), 128, float(flip))
        side = window.side
        assert side == int(size * ratio)
        crop, want_boxes, kept = reference_crop(image, boxes, side, window.cx, window.cy)
        got_boxes, keep2 = transform_boxes(boxes[keep], a, (size, size), 0.0)
        assert np.flatnonzero(keep)[keep2].tolist() == kept, k  # the same boxes, so labels stay aligned
        np.testing.assert_allclose(got_boxes, resize_flip(want_boxes, side, size, flip), atol=1e-4)
        # Pixels: an input pixel whose centre maps more than one crop pixel inside the pasted image is image
        # (values >= 1 blend to >= 1), more than one outside is padding (0).
        got = warp(Image.fromarray(image), a, (size, size))
        got = got[:, ::-1] if flip else got
        u = (np.arange(size) + 0.5) * side / size  # crop coordinate of each input pixel centre
        filled = crop.max(-1) > 0
        cols, rows = np.flatnonzero(filled.any(0)), np.flatnonzero(filled.any(1))
        px0, px1, py0, py1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
        inside = ((u > py0 + 1) & (u < py1 - 1))[:, None] & ((u > px0 + 1) & (u < px1 - 1))[None]
        outside = ((u < py0 - 1) | (u > py1 + 1))[:, None] | ((u < px0 - 1) | (u > px1 + 1))[None]
        assert (got[inside] > 0).all() and (got[outside] == 0).all(), k
        assert inside.any()


# ---- the window rule ------------------------------------------------------------------------------------


def patch_of(window, width: int, height: int) -> tuple[int, int, int, int]:
    half = window.side // 2
    return (
        max(0, window.cx - half),
        max(0, window.cy - half),
        min(window.cx + half, width),
        min(window.cy + half, height),
    )


def test_window_rule_over_many_draws() -> None:
    sides = {int(512 * r) for r in RATIOS}
    seen = set()
    for k in range(400):
        rng = np.random.default_rng([2, k])
        w, h = int(rng.integers(60, 900)), int(rng.integers(60, 900))
        n = int(rng.integers(0, 5))  # some images without boxes
        xy = rng.uniform(0, [w, h], (n, 2))
        boxes = np.clip(np.concatenate([xy, xy + rng.uniform(1, 40, (n, 2))], 1), 0, [w, h, w, h])
        boxes = boxes.astype(np.float32)
        window = center_crop_window(np.random.default_rng([3, k]), w, h, boxes, 512, RATIOS, 128)
        assert window.side in sides
        seen.add(window.side)
        wb, hb = crop_border(128, w), crop_border(128, h)
        assert wb <= window.cx < w - wb and hb <= window.cy < h - hb
        x0, y0, x1, y1 = patch_of(window, w, h)
        mx, my = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        centred = (mx > x0) & (mx < x1) & (my > y0) & (my < y1)
        assert np.array_equal(window.keep, centred)  # every box centred in the patch, and only those
        assert window.keep.any() or n == 0
    assert seen == sides  # every ratio is drawn


def test_window_retries_until_a_box_centre_is_inside() -> None:
    # A 640x480 image with one small box in its corner: a uniform centre in [128, 512) x [128, 352) puts the
    # box centre (4, 4) inside a 0.6 x 512 window only about 1% of the time, yet every draw keeps it.
    w, h, size = 640, 480, 512
    box = np.array([[0.0, 0.0, 8.0, 8.0]], dtype=np.float32)
    none = np.zeros((0, 4), dtype=np.float32)
    first_keeps = 0
    for k in range(60):
        window = center_crop_window(np.random.default_rng([9, k]), w, h, box, size, (0.6,), 128)
        x0, y0, _, _ = patch_of(window, w, h)
        assert window.keep.tolist() == [True] and x0 < 4 and y0 < 4
        # Without boxes the first centre is taken: ratio, then the candidate x and y centres, in that order.
        rng = np.random.default_rng([9, k])
        side = int(size * rng.choice((0.6,)))
        cxs, cys = rng.integers(128, w - 128, CENTRE_TRIES), rng.integers(128, h - 128, CENTRE_TRIES)
        empty = center_crop_window(np.random.default_rng([9, k]), w, h, none, size, (0.6,), 128)
        assert (empty.side, empty.cx, empty.cy) == (side, cxs[0], cys[0]) and empty.keep.shape == (0,)
        first_keeps += int(cxs[0] - side // 2 < 4 and cys[0] - side // 2 < 4)
    assert first_keeps < 5  # so the kept box above came from retries, not from the first centre


def test_window_gives_up_when_no_box_can_be_kept() -> None:
    # A 38-pixel window centred at least 128 pixels from the edges never reaches a box centred at (4, 4).
    box = np.array([[0.0, 0.0, 8.0, 8.0]], dtype=np.float32)
    window = center_crop_window(np.random.default_rng(0), 640, 480, box, 64, (0.6,), 128)
    assert window.side == 38 and window.keep.tolist() == [False]


def test_crop_border_by_hand() -> None:
    # k = 2 * 128 / size; 2 ** (ceil(log2(ceil(k))) + [k is an integer]); border // that.
    cases = {1000: 128, 640: 128, 480: 128, 257: 128, 256: 64, 200: 64, 129: 64, 128: 32, 100: 32, 64: 16, 1: 0}
    assert {s: crop_border(128, s) for s in cases} == cases
    assert crop_border(0, 100) == 0 and crop_border(64, 200) == 64 and crop_border(64, 128) == 32
    for size in range(1, 1200):  # a centre can always be drawn: the margin leaves at least one pixel
        assert 0 <= 2 * crop_border(128, size) < size


# ---- the spec field -------------------------------------------------------------------------------------


def test_spec_field_defaults_validation_and_recipes() -> None:
    assert ExperimentSpec().data.center_crop is None  # the default experiment keeps the uniform rescale
    assert CenterCropSpec() == CenterCropSpec(ratios=RATIOS, border=128)
    for bad in ({"ratios": []}, {"ratios": [0.5, -1.0]}, {"ratios": [float("nan")]}, {"border": -1}):
        with pytest.raises(ValueError):
            CenterCropSpec(**bad)
    with pytest.raises(ValueError, match="under one pixel"):
        DataSpec(input_size=32, center_crop={"ratios": [0.01]})
    spec = load_spec(None, ["data.center_crop.border=64"])  # an optional section is reachable by --set
    assert spec.data.center_crop == CenterCropSpec(border=64)
    with pytest.raises(CenterpointError, match="ratios"):
        load_spec(None, ["data.center_crop.ratios=[]"])
    for name in ("centernet_r18_coco.yaml", "centernet_r18_dcn_coco.yaml"):
        d = load_spec(ROOT / "experiments" / name).data
        assert d.center_crop == CenterCropSpec(ratios=RATIOS, border=128)
        assert (d.input_size, d.flip_prob) == (512, 0.5)
        assert "RandomCenterCropPad" in (ROOT / "experiments" / name).read_text()
