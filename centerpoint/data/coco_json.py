"""COCO annotation files: loading one into a pycocotools index, and the one check of its content, run when
it is loaded, before any training.

Everything the project (and COCOeval) later relies on is checked here, so a foreign file fails at load
time with the file and the entry named, never mid-run: the three lists, integer ids without repeats,
references to known images and categories, images with a file name and a positive integer size,
category names, boxes of 4 numbers, numeric areas, 0/1 crowd flags. Boxes with NaN or infinite numbers
pass: the index drops and counts them like boxes of zero size.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from centerpoint.errors import CenterpointError

SECTIONS = ("images", "annotations", "categories")
_REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "area"),
    "categories": ("id", "name"),
}


_MAX_ID = 2**53  # ids travel through float64 detection rows (COCO results) and int64 tensors: exact up to here


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass, and True == 1 would pass as an id


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _check_ids(source: str, section: str, entries: list) -> set[int]:
    """Every entry an object with the required keys and a unique integer id; returns the ids."""
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CenterpointError(f"{source}: {section}[{i}] must be an object, got {type(entry).__name__}")
        lacking = [key for key in _REQUIRED[section] if key not in entry]
        if lacking:
            raise CenterpointError(f"{source}: {section}[{i}] lacks {', '.join(map(repr, lacking))}")
        ident = entry["id"]
        if not _is_int(ident) or not 0 <= ident <= _MAX_ID:
            raise CenterpointError(f"{source}: {section}[{i}]: id must be an integer from 0 to 2**53, got {ident!r} "
                                   "(COCO ids are integers; renumber the entries and the references to them)")
        # pycocotools indexes by id, so a duplicate would silently replace the earlier entry.
        if ident in seen:
            raise CenterpointError(f"{source}: {section}[{i}] repeats id {ident!r}")
        seen.add(ident)
    return seen


def _check_image(source: str, i: int, image: dict) -> None:
    name = image["file_name"]
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CenterpointError(f"{source}: images[{i}] (id {image['id']}): file_name must be a non-empty string, "
                               f"got {name!r}")
    for key in ("width", "height"):
        value = image[key]
        if not _is_number(value) or not float(value).is_integer() or value < 1:
            raise CenterpointError(f"{source}: images[{i}] ({name}, id {image['id']}): {key} must be a positive "
                                   f"whole number of pixels, got {value!r}")


def _check_annotation(source: str, i: int, ann: dict, images: set[int], categories: set[int]) -> None:
    # A dangling reference would just drop the object from evaluation and inflate the scores.
    for key, known in (("image_id", images), ("category_id", categories)):
        if not _is_int(ann[key]) or ann[key] not in known:
            raise CenterpointError(f"{source}: annotations[{i}] refers to unknown {key} {ann[key]!r} "
                                   f"(annotation id {ann['id']})")
    where = f"{source}: annotation id {ann['id']}"
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise CenterpointError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    if not _is_number(ann["area"]):
        raise CenterpointError(f"{where}: area must be a number, got {ann['area']!r}")
    crowd = ann.get("iscrowd", 0)
    if type(crowd) not in (int, bool) or crowd not in (0, 1):
        raise CenterpointError(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")


def validate_coco(data: Any, source: str) -> None:
    """Raise a CenterpointError naming `source` and the first bad entry of a parsed COCO json."""
    if not isinstance(data, dict):
        raise CenterpointError(f"{source}: top level must be a JSON object, got {type(data).__name__}")
    missing = [key for key in SECTIONS if key not in data]
    if missing:
        raise CenterpointError(f"{source}: missing required key(s) {', '.join(missing)} (not a COCO file?)")
    for section in SECTIONS:
        if not isinstance(data[section], list):
            raise CenterpointError(f"{source}: '{section}' must be a list, got {type(data[section]).__name__}")
    ids = {section: _check_ids(source, section, data[section]) for section in SECTIONS}
    for i, image in enumerate(data["images"]):
        _check_image(source, i, image)
    for i, category in enumerate(data["categories"]):
        if not isinstance(category["name"], str):
            raise CenterpointError(f"{source}: categories[{i}] (id {category['id']}): name must be a string, "
                                   f"got {category['name']!r}")
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(source, i, ann, ids["images"], ids["categories"])


def load_coco(ann_file: Path | str) -> COCO:
    """Load and validate a COCO annotation file into a pycocotools ``COCO`` without its stdout chatter.

    Raises:
        CenterpointError: the file is missing, is not JSON, or its content fails `validate_coco`.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise CenterpointError(f"COCO annotation file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CenterpointError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from e
    except UnicodeDecodeError as e:
        raise CenterpointError(f"{path} is not UTF-8 text; expected a COCO JSON file") from e
    validate_coco(data, str(path))
    return build_coco(COCO, data)


def build_coco(coco_cls: type, dataset: dict) -> Any:
    """Index ``dataset`` with ``coco_cls`` (either backend's COCO) without re-reading any file."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco = coco_cls()
        coco.dataset = dataset
        coco.createIndex()
    return coco
