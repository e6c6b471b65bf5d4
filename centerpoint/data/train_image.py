"""A training image on the workers path (`data.augment_on: workers`), made with OpenCV: decode, affine
warp, photometric distortion, as (3, H, W) uint8 RGB planes.

Same geometry and formulas as `transforms.warp` (PIL) and `photometric.apply_distortion` (exact numpy
float32), about 4x cheaper per image (`benchmarks/data_pipeline.py`). What differs is rounding only:
- the warp samples bilinearly at the same positions (output pixel centres mapped through the affine,
  edge pixels repeated half a pixel beyond the image) but rounds to the nearest grey level, as OpenCV
  (and so mmdetection) does, where PIL truncates: PIL's image is on average half a level darker than the
  exact bilinear value, this one is centred on it (OpenCV 4.x also places sample positions on a 1/32-pixel
  grid, which moves a value by at most 1/64 of the local difference between neighbours);
- the colour-space round trip is OpenCV's float32 HSV conversion, the same formulas written differently,
  so a distorted value can differ from the numpy form's by one level where the exact result is a whole
  level, which float32 rounding puts just below in one form and not in the other.
`tests/test_train_image.py` bounds both.

The image is decoded in BGR (OpenCV's order) and stays so until the distortion writes the RGB planes;
the channel order is folded into that last copy instead of costing a pass of its own.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from centerpoint.data.images import open_image
from centerpoint.data.photometric import Distortion, _value_steps
from centerpoint.data.transforms import inside_window
from centerpoint.errors import CenterpointError
from centerpoint.spec import PILLOW_MAX_PIXELS

_NUDGE = np.float32(1e-3)  # levels added before truncating the colour-space result (see below)
_JPEG_MAGIC = b"\xff\xd8\xff"
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def jpeg_reduction(width: int, height: int, shrink_to: float | None) -> int:
    """The power-of-two DCT reduction (1, 2, 4 or 8) `loader.read_image` decodes a JPEG at: PIL's `draft`
    rule for a target of int(side * shrink_to) pixels, applied when the image is shrunk below half."""
    if shrink_to is None or shrink_to >= 0.5:
        return 1
    scale = min(width // max(1, int(width * shrink_to)), height // max(1, int(height * shrink_to)))
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def decode_bgr(path: str, size: tuple[int, int], shrink_to: float | None = None,
               max_pixels: int = PILLOW_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to (h, w, 3) uint8 BGR, ignoring EXIF orientation (as PIL does). size: the
    image's (width, height) from its annotations; `shrink_to`: the scale it will be warped by. JPEGs go
    through OpenCV's libjpeg-turbo at `jpeg_reduction` (the same pixels as PIL's draft decode, tested);
    other formats through PIL. The header is checked first (`images.open_image`): more than `max_pixels`
    pixels, or bytes that are no image, raise a CenterpointError before anything is decoded."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CenterpointError(f"image file not found: {path}") from None
    except OSError as err:
        raise CenterpointError(f"cannot read image {path}: {err}") from None
    open_image(path, max_pixels, io.BytesIO(data)).close()
    # A JPEG cut short decodes in OpenCV with a warning and grey rows; PIL refuses it, which is what
    # data.on_bad_image counts on: only a complete JPEG (ending in its EOI marker) goes to OpenCV.
    if data[:3] == _JPEG_MAGIC and data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
        flags = _REDUCED[jpeg_reduction(*size, shrink_to)] | cv2.IMREAD_IGNORE_ORIENTATION
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if pixels is None:
            raise CenterpointError(f"cannot decode image {path}: not a readable JPEG")
        return pixels
    try:  # PNG, BMP, ..., and JPEGs with anything after their end: PIL, as loader.read_image does
        with Image.open(io.BytesIO(data)) as img:
            if shrink_to is not None and shrink_to < 0.5 and img.format == "JPEG":
                img.draft("RGB", (max(1, int(img.width * shrink_to)), max(1, int(img.height * shrink_to))))
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise CenterpointError(f"cannot decode image {path}: {err}") from None
    return np.ascontiguousarray(rgb[..., ::-1])


def warp_bgr(pixels: np.ndarray, a: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Warp an (h, w, 3) uint8 image by the (2, 3) affine `a` (continuous pixel coordinates: pixel (i, j)
    covers [j, j + 1) x [i, i + 1), as `transforms.warp`) into (H, W, 3) uint8, out_size = (W, H).

    Bilinear at output pixel centres with the edge pixels repeated beyond the image: the caller zeroes
    the padding (`zero_outside_`), as for PIL's warp. A pure integer shift is a copy."""
    out_w, out_h = out_size
    if np.allclose(a[:, :2], np.eye(2)) and float(a[0, 2]).is_integer() and float(a[1, 2]).is_integer():
        canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
        tx, ty = int(a[0, 2]), int(a[1, 2])
        h, w = pixels.shape[:2]
        x0, y0, x1, y1 = max(0, tx), max(0, ty), min(out_w, tx + w), min(out_h, ty + h)
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = pixels[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
        return canvas
    # OpenCV puts pixel centres on integers: x_cv = x - 0.5 on both sides of the map.
    m = a.astype(np.float64).copy()
    m[:, 2] += m[:, :2].sum(1) * 0.5 - 0.5
    return cv2.warpAffine(pixels, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def zero_outside_(planes: np.ndarray, a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Set the padding of warped (3, H, W) planes to 0, in place: the pixels whose centre maps outside the
    `width` x `height` original image (`transforms.zero_padding_`'s pixels, as four slices rather than
    boolean masks: 6x cheaper)."""
    x0, x1, y0, y1 = inside_window(a, width, height, (planes.shape[2], planes.shape[1]))
    planes[:, :y0] = 0
    planes[:, y1:] = 0
    planes[:, :, :x0] = 0
    planes[:, :, x1:] = 0
    return planes


def value_table(d: Distortion) -> np.ndarray:
    """(256,) uint8: what the per-value steps (brightness, contrast) do to each grey level, clipped and
    truncated, for a draw without colour-space steps."""
    lut = _value_steps(np.arange(256, dtype=np.float32), d)
    if not d.contrast_first and d.contrast is not None:
        lut *= np.float32(d.contrast)
    return np.clip(lut, 0, 255).astype(np.uint8)


def to_planes(bgr: np.ndarray, d: Distortion | None) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> (3, H, W) uint8 RGB, photometrically distorted by `d` (None: not at all).

    The order of `photometric.py`: brightness, contrast first, HSV round trip with saturation and hue,
    contrast last, channel swap, clip to [0, 255] and truncate; intermediate values are not clipped."""
    height, width, _ = bgr.shape
    out = np.empty((3, height, width), dtype=np.uint8)
    order = (d.channel_order if d is not None else None) or (0, 1, 2)
    # Output plane j is RGB channel order[j], i.e. BGR channel 2 - order[j]: one split writes them all.
    planes = [out[order.index(2 - c)] for c in range(3)]
    if d is not None and (d.saturation is not None or d.hue is not None):
        cv2.split(_hsv_distorted_bgr(bgr, d), planes)
    elif d is not None:
        cv2.split(cv2.LUT(bgr, value_table(d)), planes)
    else:
        cv2.split(bgr, planes)
    return out


def _hsv_distorted_bgr(bgr: np.ndarray, d: Distortion) -> np.ndarray:
    """Brightness, contrast first, the HSV round trip, contrast last on float32, then clipped and truncated:
    (H, W, 3) uint8 BGR."""
    values = _value_steps(bgr.astype(np.float32), d)
    hsv = cv2.cvtColor(values, cv2.COLOR_BGR2HSV)  # H in degrees [0, 360], S, V
    # photometric.py sets S = 0 where V <= 0 (every channel <= 0 after the value steps), which makes the
    # pixel V everywhere, 0 once clipped; OpenCV divides by |V| there instead. V = 0 gives 0 as well.
    big = float(np.finfo(np.float32).max)
    cv2.max(hsv, (-big, -big, 0.0, 0.0), dst=hsv)
    if d.saturation is not None:
        cv2.multiply(hsv, (1.0, d.saturation, 1.0, 1.0), dst=hsv)
    if d.hue is not None:
        # OpenCV's vectorised HSV -> RGB takes the sector modulo 6 of H / 60 truncated towards 0: H must not
        # be negative, and H + hue is in [-18, 378]; a full turn more keeps it positive.
        cv2.add(hsv, (d.hue + 360.0, 0.0, 0.0, 0.0), dst=hsv)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not d.contrast_first and d.contrast is not None:
        rgb *= np.float32(d.contrast)
    # Many exact results are whole levels (a hue shift of a grey-level multiple, ...); float32 rounding puts
    # them a few steps below or above, and truncation then decides a level. OpenCV's order of operations
    # lands below more often than the numpy form's; a thousandth of a level added first turns most of those
    # into the whole level (on the test's colour cube: 1.5-5.6% of values a level apart instead of 8-19%).
    rgb += _NUDGE
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8)  # truncates
