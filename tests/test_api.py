"""`centerpoint.Detector`: the detections of `centerpoint predict`, from any kind of image, batched; the
README's example as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import centerpoint
from centerpoint.errors import CenterpointError
from tests.detector_checkpoint import photos, write_checkpoint
from tests.helpers import call_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("api")
    return {"resize": write_checkpoint(d / "resize.safetensors"),
            "pad": write_checkpoint(d / "pad.safetensors", "data.test_mode=pad")}


@pytest.mark.parametrize("mode", ["resize", "pad"])
def test_same_detections_as_centerpoint_predict(checkpoints: dict[str, Path], mode: str, tmp_path: Path) -> None:
    """Batched (4 images of 3 sizes; pad mode: 3 input sizes) against predict's one image at a time."""
    files = photos(tmp_path / "in", ((70, 50), (96, 64), (40, 80), (70, 50)))
    code, _, err = call_cli("predict", "--checkpoint", str(checkpoints[mode]), *map(str, files),
                            "--out", str(tmp_path / "out"), "--score-thr", "0.1", "--device", "cpu")
    assert code == 0, err
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    results = centerpoint.Detector.from_checkpoint(checkpoints[mode], device="cpu", score_thr=0.1)(files)
    assert len(results) == len(files) and sum(len(r) for r in results) == len(written) > 30
    for file, result in zip(files, results, strict=True):
        rows = [d for d in written if d["file"] == str(file)]
        assert [d["label"] for d in rows] == result.class_names
        np.testing.assert_allclose([d["score"] for d in rows], result.scores, atol=6e-6, rtol=0)
        xywh = np.concatenate([result.boxes[:, :2], result.boxes[:, 2:] - result.boxes[:, :2]], axis=1)
        np.testing.assert_allclose([d["bbox"] for d in rows], xywh, atol=0.006, rtol=0)
        w, h = Image.open(file).size
        assert (result.boxes >= 0).all() and (result.boxes[:, 2] <= w).all() and (result.boxes[:, 3] <= h).all()


def test_every_kind_of_image_gives_the_same_detections(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    det = centerpoint.Detector.from_checkpoint(checkpoints["resize"], device="cpu", batch_size=2)
    file = photos(tmp_path)[1]
    pil = Image.open(file).convert("RGB")
    hwc = np.array(pil)
    kinds = [str(file), file, pil, hwc, torch.from_numpy(hwc).permute(2, 0, 1).contiguous(), torch.from_numpy(hwc)]
    single = det(file)
    assert isinstance(single, centerpoint.Detections) and len(single) > 0
    for result in det(kinds) + det(tuple(kinds[:2])):
        np.testing.assert_array_equal(result.boxes, single.boxes)
        np.testing.assert_array_equal(result.scores, single.scores)
        assert result.class_names == single.class_names
    with pytest.raises(CenterpointError, match=r"cannot read an image from ndarray float64 \(4, 4\)"):
        det(np.zeros((4, 4)))


def test_to_coco_and_draw(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    det = centerpoint.Detector.from_checkpoint(checkpoints["resize"], device="cpu")
    file = photos(tmp_path)[0]
    result = det(file)
    entries = result.to_coco(7, category_ids=[1, 2, 3, 4, 5])
    assert len(entries) == len(result) > 0
    first = entries[0]
    x1, y1, x2, y2 = result.boxes[0]
    assert first["image_id"] == 7 and first["category_id"] == int(result.labels[0]) + 1
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1]) and first["score"] == pytest.approx(
        float(result.scores[0]))
    assert result.to_coco(7)[0]["category_id"] == int(result.labels[0])
    drawn = det.draw(file, result)
    original = np.asarray(Image.open(file).convert("RGB"))
    assert drawn.size == (original.shape[1], original.shape[0])
    changed = np.any(np.asarray(drawn) != original, axis=2)
    assert changed[int(y1) + 3, int(round(x1))] or changed[int(y1) + 3, int(x1)]  # the first box's left edge


def readme_python_example() -> str:
    """The README's Python API example (the first python block after the 'Python API' heading)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    code = readme_python_example()
    assert len(code.strip().splitlines()) == 5
    (tmp_path / "runs" / "shapes" / "checkpoints").mkdir(parents=True)
    os.link(checkpoints["resize"], tmp_path / "runs" / "shapes" / "checkpoints" / "best.safetensors")
    for src, name in zip(photos(tmp_path / "made", ((70, 50), (96, 64))), ("photo.jpg", "street.jpg"), strict=True):
        src.rename(tmp_path / name)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "photo_boxes.jpg").size == Image.open(tmp_path / "photo.jpg").size
    assert res.stdout.startswith("['"), res.stdout  # the first three class names
