"""`centerpoint predict` (the real CLI, in this process): spec overrides with --set, batches that do not
change the detections, recursive folders and glob patterns, COCO results beside the drawings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from centerpoint.evaluation.predict_in import collect_images
from tests.detector_checkpoint import photos, write_checkpoint
from tests.helpers import call_cli


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("predict_inputs")
    return {"resize": write_checkpoint(d / "resize.safetensors"),
            "pad": write_checkpoint(d / "pad.safetensors", "data.test_mode=pad")}


def _predict(ckpt: Path, out: Path, *args: str) -> list[dict]:
    code, _, err = call_cli("predict", "--checkpoint", str(ckpt), *args, "--out", str(out), "--device", "cpu")
    assert code == 0, err
    return json.loads((out / "detections.json").read_text())


def _by_file(dets: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in dets:
        out.setdefault(d["file"], []).append(d)
    return out


def test_batches_of_one_input_size_give_the_detections_of_batch_one(checkpoints: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """pad mode: 4 images, two of each of 2 input sizes, interleaved; batch 4 vs batch 1."""
    files = photos(tmp_path / "in", ((70, 50), (40, 80), (70, 50), (40, 80)))
    one = _predict(checkpoints["pad"], tmp_path / "b1", *map(str, files), "--batch-size", "1", "--score-thr", "0.1")
    four = _predict(checkpoints["pad"], tmp_path / "b4", *map(str, files), "--batch-size", "4", "--score-thr", "0.1")
    assert len(one) == len(four) > 20
    for a, b in zip(one, four, strict=True):
        assert (a["file"], a["image_id"], a["label"], a["category_id"]) == (b["file"], b["image_id"], b["label"],
                                                                             b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.011)


def test_set_changes_what_predict_runs(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    files = [str(f) for f in photos(tmp_path / "in", ((70, 50), (40, 80)))]
    ckpt = checkpoints["resize"]
    base = _predict(ckpt, tmp_path / "base", *files, "--score-thr", "0")
    assert max(len(v) for v in _by_file(base).values()) > 3
    top3 = _predict(ckpt, tmp_path / "top3", *files, "--set", "eval.topk=3", "--score-thr", "0")
    assert all(len(v) <= 3 for v in _by_file(top3).values()) and len(top3) > len(files)  # (a box clipped to
    # nothing is dropped)
    assert all(d in base for d in top3)  # the same best three
    for key, value in (("eval.flip_test", "false"), ("data.test_size", "96")):
        other = _predict(ckpt, tmp_path / key, *files, "--set", f"{key}={value}", "--score-thr", "0")
        assert [d["score"] for d in other] != [d["score"] for d in base], key
    strict = _predict(ckpt, tmp_path / "thr", *files, "--set", "eval.score_threshold=0.25")
    assert strict and min(d["score"] for d in strict) >= 0.25 and len(strict) < len(base)
    code, _, err = call_cli("predict", "--checkpoint", str(ckpt), *files, "--out", str(tmp_path / "x"),
                            "--score-thr", "0.2", "--set", "eval.score_threshold=0.1")
    assert code == 2 and err.count("\n") == 1 and "give one of them" in err and not (tmp_path / "x").exists()


def test_folders_recursively_and_patterns_in_sorted_order_as_coco_results(checkpoints: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    shots = tmp_path / "shots"
    deep = photos(shots / "b" / "deeper", ((40, 80),))
    top = photos(shots, ((70, 50), (96, 64)))
    (shots / "notes.txt").write_text("not an image")
    assert collect_images([shots]) == sorted([*top, *deep])
    assert collect_images([shots / "**" / "*.jpg"]) == sorted([*deep, *top])
    assert collect_images([shots / "*.jpg", shots]) == [*top, *deep]  # a file reached twice is read once
    dets = _predict(checkpoints["resize"], tmp_path / "out", str(shots / "**" / "*.jpg"), "--score-thr", "0.05")
    images = json.loads((tmp_path / "out" / "images.json").read_text())
    files = sorted([*deep, *top])
    assert [(i["id"], i["file_name"]) for i in images["images"]] == [(k + 1, str(f)) for k, f in enumerate(files)]
    assert [c["name"] for c in images["categories"]] == ["circle", "square", "triangle", "star", "cross"]
    from pycocotools.coco import COCO

    results = COCO(str(tmp_path / "out" / "images.json")).loadRes(str(tmp_path / "out" / "detections.json"))
    assert len(results.getAnnIds()) == len(dets) > 10
    size = {i["id"]: (i["width"], i["height"]) for i in images["images"]}
    for d in dets:  # boxes clipped to their image, with area
        w, h = size[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert d["file"] == str(files[d["image_id"] - 1])
        assert x >= 0 and y >= 0 and bw > 0 and bh > 0 and x + bw <= w + 0.01 and y + bh <= h + 0.01
    touching = [d for d in dets if d["bbox"][0] == 0 or d["bbox"][1] == 0]
    assert touching  # wide boxes near the border do get clipped (the test can see clipping)


def test_bad_inputs_are_one_line_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    shots = tmp_path / "shots"
    photos(shots)
    ckpt = str(checkpoints["resize"])
    cases = [
        ([str(shots / "**" / "*.jpg"), "--out", str(shots / "sub" / "pred")], "a folder of input images"),
        ([str(tmp_path / "none" / "*.jpg"), "--out", str(tmp_path / "p1")], "no images"),
        ([str(shots), "--batch-size", "0", "--out", str(tmp_path / "p2")], "--batch-size"),
        ([str(shots), "--set", "eval.topk=0", "--out", str(tmp_path / "p3")], "eval.topk"),
    ]
    for args, fragment in cases:
        code, _, err = call_cli("predict", "--checkpoint", ckpt, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shots"]
    assert Image.open(shots / "photo1.jpg").size == (70, 50)
