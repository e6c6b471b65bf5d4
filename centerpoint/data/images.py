"""The one door image files come in through: open, check the header, decode; every failure is a project error.

Image files are foreign data: a missing file, bytes that are no image, a truncated one, or a header that
claims more pixels than `data.max_image_pixels` (a decompression bomb: a few kilobytes that would decode
into gigabytes) all raise a `CenterpointError` naming the file, which `data.on_bad_image` turns into a
stop or a skipped and counted image. The pixel count is checked from the header, before any decoding.
"""

from __future__ import annotations

import re
import warnings
from typing import BinaryIO

from PIL import Image

from centerpoint.errors import CenterpointError


def _raise_pillow_limit(max_pixels: int) -> None:
    # Pillow refuses (and warns below twice) its own process-wide limit; this module's check replaces it, so
    # a larger data.max_image_pixels raises Pillow's limit to match, never lowers it.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(path: str, max_pixels: int, source: BinaryIO | None = None) -> Image.Image:
    """The image at `path` (or read from `source`, the file's bytes, when given), opened lazily (header read,
    pixels not decoded), at most `max_pixels` pixels."""
    _raise_pillow_limit(max_pixels)
    try:
        with warnings.catch_warnings():  # Pillow's DecompressionBombWarning: the check below says it better
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source if source is not None else path)
    except FileNotFoundError:
        raise CenterpointError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as err:  # over twice Pillow's limit: it refuses before we can look
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_big(path, claimed.group(1) if claimed else "more", max_pixels) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse foreign bytes means "not an image"
        raise CenterpointError(f"cannot decode image {path}: {_reason(err, path)}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise _too_big(path, f"{w} x {h} = {w * h}", max_pixels)
    return img


def _too_big(path: str, pixels: str, max_pixels: int) -> CenterpointError:
    return CenterpointError(f"image {path} is {pixels} pixels, more than data.max_image_pixels={max_pixels} (a "
                            "decompression-bomb guard; raise it if the image is genuine)")


def decode(img: Image.Image, path: str) -> Image.Image:
    """Decode the pixels of an image from `open_image` (in place), as RGB."""
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data: Pillow raises many kinds
        raise CenterpointError(f"cannot decode image {path}: {_reason(err, path)}") from None


def verify(img: Image.Image, path: str) -> None:
    """Pillow's quick integrity check of an image from `open_image`, without decoding its pixels."""
    try:
        img.verify()
    except Exception as err:  # noqa: BLE001
        raise CenterpointError(f"cannot decode image {path}: {_reason(err, path)}") from None


def _reason(err: BaseException, path: str) -> str:
    """An exception's first line without the path Pillow repeats, or its type when it has no message."""
    text = str(err).replace(f" '{path}'", "").strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
