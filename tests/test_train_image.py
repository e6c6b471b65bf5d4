"""The workers path's OpenCV image steps (`data/train_image.py`) against the PIL + numpy forms they
replaced: decoding gives the same pixels; the warp samples the same positions and rounds to the nearest
level where PIL truncated; the photometric distortion is within one grey level of the exact numpy form."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from centerpoint.data.loader import read_image
from centerpoint.data.photometric import Distortion, apply_distortion, draw_distortion
from centerpoint.data.train_image import decode_bgr, jpeg_reduction, to_planes, warp_bgr, zero_outside_
from centerpoint.data.transforms import inside_mask, scale_translate, warp, zero_padding_
from centerpoint.errors import CenterpointError
from tests.test_pipeline import _test_image


def _smooth_image(seed: int, h: int = 90, w: int = 120) -> np.ndarray:
    """Bicubic-upsampled random colours: neighbouring pixels differ by a few levels, as in photos."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def exact_bilinear(pixels: np.ndarray, a: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """The warp's exact values (float64): bilinear at each output pixel centre mapped through inverse(a),
    with edge pixels repeated beyond the image (what PIL computes before truncating)."""
    out_w, out_h = out_size
    inv = np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2]
    h, w = pixels.shape[:2]
    u = inv[0, 0] * (np.arange(out_w) + 0.5) + inv[0, 2] - 0.5
    v = inv[1, 1] * (np.arange(out_h) + 0.5) + inv[1, 2] - 0.5
    x0, y0 = np.floor(u).astype(int), np.floor(v).astype(int)
    dx, dy = (u - x0)[None, :, None], (v - y0)[:, None, None]
    xa, xb = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    ya, yb = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    p = pixels.astype(np.float64)
    top = p[ya][:, xa] + (p[ya][:, xb] - p[ya][:, xa]) * dx
    bottom = p[yb][:, xa] + (p[yb][:, xb] - p[yb][:, xa]) * dx
    return top + (bottom - top) * dy


AFFINES = [scale_translate(0.9, -20.3, 10.7), scale_translate(1.37, -31.21, -7.77),
           scale_translate(0.61, 3.4, 2.2, flip_width=64.0), scale_translate(2.5, -120.6, -90.1),
           scale_translate(0.43, 7.7, 1.25)]


@pytest.mark.parametrize("a", AFFINES)
def test_warp_rounds_the_exact_bilinear_value_where_pil_truncated(a: np.ndarray) -> None:
    rgb = _smooth_image(1)
    exact = exact_bilinear(rgb, a, (64, 64))
    inside = (np.abs(exact - exact.round()) > 1e-6)  # values next to a tie may round either way
    got = warp_bgr(np.ascontiguousarray(rgb[..., ::-1]), a, (64, 64))[..., ::-1].astype(np.float64)
    pil = warp(Image.fromarray(rgb), a, (64, 64)).astype(np.float64)
    # Where PIL samples inside the image (it fills 0 beyond), it truncates the exact value.
    cols, rows = inside_mask(a, 120, 90, (64, 64))
    shown = rows[:, None] & cols[None, :]
    assert ((pil - exact)[shown] > -1).all() and ((pil - exact)[shown] < 1e-6).all()
    # OpenCV rounds to nearest; version 4.x first moves the sample position onto a 1/32-pixel grid, which
    # changes the value by at most 1/64 of the neighbours' difference along each axis (here under 3 levels).
    grad = max(np.abs(np.diff(rgb.astype(int), axis=0)).max(), np.abs(np.diff(rgb.astype(int), axis=1)).max())
    bound = 0.5 + 2 * grad / 64 + 1e-6
    assert np.abs(got - exact).max() <= bound
    assert np.abs(got - exact)[inside].mean() < 0.3  # centred on the exact value ...
    assert abs((got - exact).mean()) < 0.1 and (pil - exact)[shown].mean() < -0.35  # ... PIL half a level below
    assert np.abs(got - pil)[shown].max() <= math.ceil(bound + 1)


def test_warp_integer_shift_and_flip_are_exact() -> None:
    rgb = _test_image(2, 12, 16)
    shifted = warp_bgr(rgb, scale_translate(1.0, 3.0, 2.0), (20, 16))
    assert np.array_equal(shifted[2:14, 3:19], rgb) and shifted[:2].max() == 0 and shifted[:, :3].max() == 0
    flipped = warp_bgr(rgb, scale_translate(1.0, 0.0, 0.0, flip_width=16.0), (16, 12))
    assert np.array_equal(flipped, rgb[:, ::-1])
    assert np.array_equal(warp_bgr(rgb, scale_translate(1.0, -20.0, 0.0), (8, 8)), np.zeros((8, 8, 3), np.uint8))


def _all_levels() -> np.ndarray:
    levels = np.arange(0, 256, 5, dtype=np.uint8)  # 52^3 colours
    return np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 52, 3)


@pytest.mark.parametrize("d", [
    Distortion(saturation=1.5), Distortion(saturation=0.5), Distortion(hue=18.0), Distortion(hue=-18.0),
    Distortion(-32.0, 1.5, True, 1.5, -18.0, (2, 1, 0)), Distortion(32.0, 0.5, False, 0.5, 18.0, (1, 2, 0)),
    Distortion(-31.9, 1.49, False, 1.37, 0.001, None), Distortion(7.5, None, True, None, -17.99, (0, 2, 1)),
    Distortion(-32.0, 0.5, True, 1.5, 5.0, None),  # many pixels at V <= 0 before the HSV steps
])  # fmt: skip
def test_distortion_within_one_level_of_the_exact_form_on_all_colour_levels(d: Distortion) -> None:
    cube = _all_levels()
    want = apply_distortion(cube, d, channels_first=True).astype(int)
    got = to_planes(np.ascontiguousarray(cube[..., ::-1]), d).astype(int)
    assert np.abs(got - want).max() <= 1
    assert (got != want).mean() < 0.07  # a level apart where the exact value is a whole level (see train_image)


def test_distortion_per_value_steps_and_none_are_exact() -> None:
    img = _test_image(7, 40, 23)
    bgr = np.ascontiguousarray(img[..., ::-1])
    assert np.array_equal(to_planes(bgr, None), img.transpose(2, 0, 1))
    for d in (Distortion(-20.0, 1.3, False, None, None, (1, 0, 2)), Distortion(31.0, 0.7, True, None, None, None),
              Distortion(contrast_first=True)):
        assert np.array_equal(to_planes(bgr, d), apply_distortion(img, d, channels_first=True)), d
    for seed in range(200):  # drawn distortions on a photo-like image
        d = draw_distortion(np.random.default_rng(seed))
        rgb = _smooth_image(seed, 30, 40)
        diff = to_planes(np.ascontiguousarray(rgb[..., ::-1]), d).astype(int) - apply_distortion(rgb, d, True)
        assert np.abs(diff).max() <= 1, (seed, d)


def test_decode_matches_pil_full_and_reduced(tmp_path: Path) -> None:
    rgb = Image.fromarray(_smooth_image(4, 64, 96))
    rgb.save(tmp_path / "c.jpg", quality=90)
    rgb.convert("L").save(tmp_path / "g.jpg", quality=90)
    rgb.save(tmp_path / "c.png")
    for name in ("c.jpg", "g.jpg", "c.png"):
        for shrink in (None, 0.6, 0.45, 0.25, 0.2, 0.1):
            want = np.asarray(read_image(str(tmp_path / name), shrink_to=shrink))
            got = decode_bgr(str(tmp_path / name), (96, 64), shrink_to=shrink)
            assert got.shape == want.shape and np.array_equal(got[..., ::-1], want), (name, shrink)
    assert [jpeg_reduction(640, 480, s) for s in (None, 0.5, 0.49, 0.25, 0.2, 0.124, 0.01)] == [1, 1, 2, 4, 4, 8, 8]


def test_decode_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(CenterpointError, match="not found"):
        decode_bgr(str(tmp_path / "missing.jpg"), (4, 4))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(CenterpointError, match="cannot decode"):
        decode_bgr(str(tmp_path / "bad.jpg"), (4, 4))
    whole = tmp_path / "whole.jpg"
    Image.fromarray(_smooth_image(2)).save(whole, quality=90)
    (tmp_path / "cut.jpg").write_bytes(whole.read_bytes()[:1500])  # cut short: PIL refuses it, so do we
    with pytest.raises(CenterpointError, match="cannot decode"):
        decode_bgr(str(tmp_path / "cut.jpg"), (120, 90))
    (tmp_path / "tail.jpg").write_bytes(whole.read_bytes() + b"trailing bytes")  # decoded (by PIL)
    assert np.array_equal(decode_bgr(str(tmp_path / "tail.jpg"), (120, 90), 0.3)[..., ::-1],
                          np.asarray(read_image(str(whole), 0.3)))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(CenterpointError, match="cannot decode"):
        decode_bgr(str(tmp_path / "bad.png"), (4, 4))


def test_zero_outside_sets_the_same_pixels_as_zero_padding() -> None:
    rng = np.random.default_rng(5)
    for k in range(40):
        w, h = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        flip = 64.0 if k % 2 else None
        a = scale_translate(float(rng.uniform(0.1, 3.0)), float(rng.uniform(-200, 60)), float(rng.uniform(-200, 60)),
                            flip)
        planes = rng.integers(1, 256, (3, 64, 64), dtype=np.uint8)
        assert np.array_equal(zero_outside_(planes.copy(), a, w, h), zero_padding_(planes.copy(), a, w, h)), k
