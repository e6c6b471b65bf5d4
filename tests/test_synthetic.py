"""Tests for the synthetic shapes dataset (centerpoint.data.synthetic)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from centerpoint.data.shapes_cache import ensure_shapes_dataset
from centerpoint.data.synthetic import (
    CLASSES,
    _shape_alpha,
    _tight,
    render_sample,
)
from centerpoint.errors import CenterpointError
from centerpoint.io.cache import default_cache_dir

NUM_TRAIN, NUM_VAL = 20, 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small dataset shared by the read-only tests (generation is the slow part)."""
    return ensure_shapes_dataset(tmp_path_factory.mktemp("cache") / "shapes", seed=3,
                                 num_train=NUM_TRAIN, num_val=NUM_VAL)


def test_render_is_deterministic_and_order_independent() -> None:
    later_first = [render_sample(7, "train", i) for i in (5, 2)]
    for i, (image, objects) in zip((5, 2), later_first, strict=True):
        again_image, again_objects = render_sample(7, "train", i)
        assert np.array_equal(np.asarray(image), np.asarray(again_image))
        assert objects == again_objects


def test_render_differs_across_seeds_splits_and_indices() -> None:
    base = np.asarray(render_sample(0, "train", 0)[0])
    for other in (render_sample(1, "train", 0), render_sample(0, "val", 0), render_sample(0, "train", 1)):
        arr = np.asarray(other[0])
        assert arr.shape != base.shape or not np.array_equal(arr, base)


def test_render_geometry_invariants() -> None:
    seen: set[int] = set()
    for i in range(60):
        image, objects = render_sample(11, "train", i)
        width, height = image.size
        assert image.mode == "RGB"
        assert 160 <= width <= 320 and 160 <= height <= 320
        assert 1 <= len(objects) <= 10
        short = min(width, height)
        for category_id, (x, y, w, h) in objects:
            seen.add(category_id)
            assert 1 <= category_id <= len(CLASSES)
            # Tight boxes are rounded out to whole pixels: allow 1 px either way.
            assert short / 10 - 1 <= w <= short / 2 + 1
            assert short / 10 - 1 <= h <= short / 2 + 1
            assert x >= 0 and y >= 0 and x + w <= width and y + h <= height
    assert seen == set(range(1, len(CLASSES) + 1))


def test_shapes_fill_their_boxes() -> None:
    # Tightness: every class, at every rotation, touches all four sides of the box it is drawn in,
    # and still covers a sizeable part of it (so it is not a sliver).
    rng = np.random.default_rng(0)
    for cls in range(len(CLASSES)):
        for w, h in ((16, 16), (17, 21), (80, 64), (160, 160)):
            for _ in range(10):
                alpha = _shape_alpha(rng, cls, w, h)
                assert alpha.shape == (h, w)
                assert _tight(alpha) == (0, 0, w, h)
                assert alpha.mean() > 0.25


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        render_sample(0, "bogus", 0)
    with pytest.raises(ValueError):
        render_sample(-1, "train", 0)


def test_coco_files_load_and_match_images(dataset: Path) -> None:
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        coco = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == list(range(1, len(CLASSES) + 1))
        assert [c["name"] for c in cats] == list(CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            path = dataset / split / img["file_name"]
            with Image.open(path) as im:
                im.load()
                assert im.size == (img["width"], img["height"])
                assert im.format == "JPEG"
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 10
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(w * h)
                assert x + w <= img["width"] and y + h <= img["height"]


def test_annotations_equal_render_sample(dataset: Path) -> None:
    coco = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    for index, img in enumerate(coco["images"]):
        _, objects = render_sample(3, "val", index)
        anns = [(a["category_id"], a["bbox"]) for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert anns == objects


def test_cache_is_reused(dataset: Path) -> None:
    marker = dataset / "DONE"
    before = marker.stat().st_mtime_ns
    calls: list[tuple[int, int]] = []
    again = ensure_shapes_dataset(dataset, seed=3, num_train=NUM_TRAIN, num_val=NUM_VAL,
                                  progress=lambda d, t: calls.append((d, t)))
    assert again == dataset
    assert marker.stat().st_mtime_ns == before
    assert calls == []  # nothing was generated


def test_a_set_of_ours_is_replaced_only_while_its_manifest_vouches_for_every_file(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    root.mkdir()  # an empty directory may be filled
    calls: list[tuple[int, int]] = []
    ensure_shapes_dataset(root, seed=1, num_train=4, num_val=2, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 6) and calls[-1] == (6, 6)
    manifest = json.loads((root / "DONE").read_text())
    assert len(manifest["files"]) == 4 + 2 + 2  # every image and both annotation files, with size and sha256

    # Different counts under the same root: our own set (every file as the manifest lists it) is replaced.
    ensure_shapes_dataset(root, seed=1, num_train=3, num_val=1)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert json.loads((root / "DONE").read_text())["num_train"] == 3
    assert not list(tmp_path.glob(".shapes.tmp-*"))  # temp dirs cleaned up

    # A file that is not as written (or one added) makes the directory not ours any more: refused, kept.
    for change in (lambda: (root / "train" / "000000.jpg").write_bytes(b"edited"),
                   lambda: (root / "val" / "mine.jpg").write_bytes(b"added")):
        change()
        before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        with pytest.raises(CenterpointError, match="is not a synthetic dataset written by centerpoint"):
            ensure_shapes_dataset(root, seed=1, num_train=2, num_val=1)
        assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_a_manifest_without_its_files_does_not_make_a_directory_ours(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    (root / "train").mkdir(parents=True)
    (root / "train" / "photo.jpg").write_bytes(b"a user's photo")
    (root / "DONE").write_text(json.dumps({"name": "shapes", "version": 1, "seed": 0, "num_train": 1,
                                           "num_val": 1, "classes": ["circle"]}))
    with pytest.raises(CenterpointError, match=str(root)):
        ensure_shapes_dataset(root, num_train=1, num_val=1)
    assert (root / "train" / "photo.jpg").read_bytes() == b"a user's photo"


def test_only_our_stale_temp_dirs_are_cleaned_up(tmp_path: Path) -> None:
    old = time.time() - 2 * 3600
    ours, theirs = tmp_path / ".shapes.tmp-crashed", tmp_path / ".shapes.tmp-someone-elses"
    for d in (ours, theirs):
        d.mkdir()
        (d / "file").write_text("x")
    (ours / ".centerpoint-tmp").write_text("")
    for d in (ours, theirs):
        os.utime(d, (old, old))
    ensure_shapes_dataset(tmp_path / "shapes", num_train=1, num_val=1)
    assert not ours.exists() and (theirs / "file").read_text() == "x"


def test_worker_count_does_not_change_output(tmp_path: Path) -> None:
    serial = ensure_shapes_dataset(tmp_path / "a", seed=2, num_train=3, num_val=1, workers=1)
    pooled = ensure_shapes_dataset(tmp_path / "b", seed=2, num_train=3, num_val=1, workers=2)
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json", "train/000002.jpg",
                "val/000000.jpg"):
        assert (serial / rel).read_bytes() == (pooled / rel).read_bytes()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CENTERPOINT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CENTERPOINT_CACHE")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "centerpoint"
