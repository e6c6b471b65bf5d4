"""The test-time padding and the training rescale against numbers worked out by hand from mmdetection's
rules (RandomCenterCropPad test mode: `logical_or` 31 plus one pixel, the image's pixel side // 2 on the
input's pixel out // 2; training scale relative to the LONGER side), not from the code under test."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from centerpoint.data.transforms import eval_affine, pad_affine, resize_affine, train_affine, warp
from centerpoint.spec import DataSpec

# (width, height) -> (input width, input height, image's left column, image's top row), by hand:
#   640 | 31 = 671 -> 672, 672 // 2 - 640 // 2 = 336 - 320 = 16
#   427 | 31 = 447 -> 448, 448 // 2 - 427 // 2 = 224 - 213 = 11  ((448 - 427) // 2 would be 10)
#   333 | 31 = 351 -> 352, 176 - 166 = 10 ((352 - 333) // 2 would be 9)
#   64 | 31 = 95 -> 96, 48 - 32 = 16;   512 | 31 = 543 -> 544, 272 - 256 = 16
#   31 | 31 = 31 -> 32, 16 - 15 = 1 ((32 - 31) // 2 would be 0);   1 -> 32, 16 - 0 = 16
PADDING = {
    (640, 427): (672, 448, 16, 11),
    (333, 500): (352, 512, 10, 6),  # 500 | 31 = 511 -> 512, 256 - 250 = 6
    (64, 512): (96, 544, 16, 16),
    (31, 1): (32, 32, 1, 16),
    (97, 33): (128, 64, 16, 16),  # 97 | 31 = 127 -> 128, 64 - 48 = 16; 33 | 31 = 63 -> 64, 32 - 16 = 16
}


@pytest.mark.parametrize(("size", "expected"), PADDING.items())
def test_pad_affine_follows_mmdetection_rule(size: tuple[int, int], expected: tuple[int, int, int, int]) -> None:
    w, h = size
    out_w, out_h, left, top = expected
    a, out = pad_affine(w, h)
    assert out == (out_w, out_h)
    assert a.tolist() == [[1.0, 0.0, left], [0.0, 1.0, top]]
    spec = DataSpec(test_mode="pad")
    got, got_out = eval_affine(w, h, spec)
    assert got_out == out and np.array_equal(got, a)


def test_padded_image_lands_where_the_rule_says() -> None:
    """The warped input holds the image at (left, top) and zeros around it, pixel for pixel."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 256, (427, 333, 3), dtype=np.uint8)  # no zero pixel inside the image
    a, out = pad_affine(333, 427)
    got = warp(Image.fromarray(pixels), a, out)
    assert got.shape == (448, 352, 3)
    left, top = 10, 11  # 176 - 166, 224 - 213
    assert np.array_equal(got[top:top + 427, left:left + 333], pixels)
    inside = np.zeros(got.shape[:2], bool)
    inside[top:top + 427, left:left + 333] = True
    assert got[~inside].max() == 0


def test_resize_affine_hand_computed() -> None:
    # 300x150 into 192: scale 192 / 300 = 0.64, image 192 x 96 centred: y offset (192 - 96) / 2 = 48.
    a, out = resize_affine(300, 150, 192)
    assert out == (192, 192)
    assert np.allclose(a, [[0.64, 0, 0], [0, 0.64, 48]])
    got, got_out = eval_affine(300, 150, DataSpec(test_mode="resize", test_size=192))
    assert got_out == out and np.array_equal(got, a)
    # test_size None: input_size is the target
    got, got_out = eval_affine(150, 300, DataSpec(test_mode="resize", test_size=None, input_size=96))
    assert got_out == (96, 96) and np.allclose(got, [[0.32, 0, 24], [0, 0.32, 0]])


@pytest.mark.parametrize(("w", "h", "fit", "scale"), [
    (200, 100, 192, 0.96),   # longer side 200 -> 192
    (100, 200, 192, 0.96),
    (640, 480, 512, 0.8),
    (300, 300, 128, 128 / 300),
])
def test_train_rescale_is_relative_to_the_longer_side(w: int, h: int, fit: int, scale: float) -> None:
    a = train_affine(np.random.default_rng(0), w, h, 128, (1.0, 1.0), 0.0, fit)
    assert a[0, 0] == pytest.approx(scale, rel=1e-12) and a[1, 1] == pytest.approx(scale, rel=1e-12)
    # The scale range multiplies it: the extremes of a narrow range bracket every draw.
    draws = [train_affine(np.random.default_rng(k), w, h, 128, (0.5, 0.6), 0.0, fit)[0, 0] for k in range(20)]
    assert min(draws) >= 0.5 * scale - 1e-12 and max(draws) <= 0.6 * scale + 1e-12


def test_train_rescale_keeps_the_image_overlapping_the_window() -> None:
    # 200x100 at scale 0.96 is 192 x 96 in a 128 window: x offset in [-64, 0], y offset in [0, 32].
    for k in range(30):
        a = train_affine(np.random.default_rng(k), 200, 100, 128, (1.0, 1.0), 0.0, 192)
        assert -64 <= a[0, 2] <= 0 and 0 <= a[1, 2] <= 32
        mirrored = train_affine(np.random.default_rng(k), 200, 100, 128, (1.0, 1.0), 1.0, 192)
        # a mirror maps x to 128 - (0.96 x + tx): the same draw, reflected in the window
        assert mirrored[0, 0] == -a[0, 0] and mirrored[0, 2] == pytest.approx(128 - a[0, 2])
