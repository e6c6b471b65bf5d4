"""Tests for centerpoint.evaluation.coco_metrics: exact values on hand-checkable cases, backend parity, input errors."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from centerpoint.data.coco_json import load_coco
from centerpoint.errors import CenterpointError
from centerpoint.evaluation.coco_metrics import (
    METRIC_KEYS,
    coco_bbox_metrics,
    format_metrics_table,
    results_to_json,
)

BACKENDS = ["pycocotools", "faster-coco-eval"]
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]

# (image_id, category_id, [x, y, w, h]): small (<32^2), medium and large (>96^2) boxes for every class,
# so all 12 metrics are defined (none is -1).
GT_BOXES = [
    (1, 1, [10.0, 10.0, 20.0, 20.0]),  # small
    (1, 5, [100.0, 50.0, 60.0, 40.0]),  # medium
    (1, 9, [200.0, 200.0, 150.0, 120.0]),  # large
    (2, 1, [300.0, 30.0, 120.0, 110.0]),  # large
    (2, 5, [20.0, 300.0, 15.0, 25.0]),  # small
    (2, 9, [50.0, 60.0, 45.0, 70.0]),  # medium
    (3, 1, [400.0, 200.0, 50.0, 50.0]),  # medium
    (3, 5, [30.0, 40.0, 200.0, 150.0]),  # large
    (3, 9, [500.0, 400.0, 12.0, 9.0]),  # small
    (3, 9, [250.0, 100.0, 80.0, 90.0]),  # medium, second bird in the same image
]


def make_gt(boxes: list = GT_BOXES, n_images: int = 3) -> dict:
    """A COCO ground-truth dict with non-contiguous category ids 1, 5, 9."""
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(1, n_images + 1)]
    annotations = [
        {"id": k, "image_id": img, "category_id": cat, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0}
        for k, (img, cat, b) in enumerate(boxes, start=1)
    ]
    return {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}


def write_json(tmp_path: Path, data: object, name: str = "gt.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def gt(tmp_path: Path):
    return load_coco(write_json(tmp_path, make_gt()))


def gt_as_detections(boxes: list = GT_BOXES) -> list[dict]:
    return [{"image_id": img, "category_id": cat, "bbox": list(b), "score": 1.0} for img, cat, b in boxes]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_score_one(gt, backend: str) -> None:
    m = coco_bbox_metrics(gt, gt_as_detections(), backend=backend)
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
                "bbox_AR_10", "bbox_AR_100", "bbox_AR_s", "bbox_AR_m", "bbox_AR_l"):  # fmt: skip
        assert m[key] == pytest.approx(1.0, abs=1e-12), key
    # Image 3 holds two birds, so one detection per image (AR_1) cannot recall both.
    assert m["bbox_AR_1"] < 1.0
    assert m["per_class_AP"] == {"cat": 1.0, "dog": 1.0, "bird": 1.0}
    assert set(m) == {*METRIC_KEYS, "per_class_AP"}
    assert all(isinstance(m[k], float) for k in METRIC_KEYS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_found_matches_hand_computed_ap(gt, backend: str) -> None:
    # Birds: 4 objects; dets exactly on 2 of them. Precision is 1 up to recall 0.5 and 0 beyond, so with
    # 101-point interpolation AP = 51/101 at every IoU threshold. Same for dogs (3 objects, 1 found -> 34/101,
    # recall points 0, 0.01, ..., 0.33). Cats are all found.
    birds = [b for b in GT_BOXES if b[1] == 9]
    dogs = [b for b in GT_BOXES if b[1] == 5]
    kept = [b for b in GT_BOXES if b[1] == 1] + birds[:2] + dogs[:1]
    m = coco_bbox_metrics(gt, gt_as_detections(kept), backend=backend)
    assert m["per_class_AP"]["bird"] == pytest.approx(51 / 101, abs=1e-12)
    assert m["per_class_AP"]["dog"] == pytest.approx(34 / 101, abs=1e-12)
    assert m["per_class_AP"]["cat"] == pytest.approx(1.0, abs=1e-12)
    assert m["bbox_mAP"] == pytest.approx((1 + 51 / 101 + 34 / 101) / 3, abs=1e-12)
    assert m["bbox_mAP_50"] == pytest.approx(m["bbox_mAP"], abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_detections_score_between_zero_and_one(gt, backend: str) -> None:
    dets = gt_as_detections()
    for i, d in enumerate(dets):
        x, y, w, h = d["bbox"]
        d["bbox"] = [x + 0.15 * w * (i % 3), y + 0.1 * h, w * 1.1, h]  # IoU from ~0.5 to ~0.9
        d["score"] = 0.9 - 0.05 * i
    m = coco_bbox_metrics(gt, dets, backend=backend)
    assert 0.0 < m["bbox_mAP"] < 1.0
    assert m["bbox_mAP_75"] < m["bbox_mAP_50"]
    assert all(0.0 < ap < 1.0 for ap in m["per_class_AP"].values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", [[], np.zeros((0, 7))])
def test_empty_detections_give_zeros(gt, backend: str, empty) -> None:
    m = coco_bbox_metrics(gt, empty, backend=backend)
    assert all(m[k] == 0.0 for k in METRIC_KEYS)
    assert m["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0}


def random_case(seed: int = 0, n_images: int = 20) -> tuple[dict, list[dict]]:
    """Random gt on ``n_images`` images and noisy, partly mislabelled, partly spurious detections."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in CATEGORIES]
    boxes = []
    for img in range(1, n_images + 1):
        for _ in range(rng.integers(1, 9)):
            w, h = rng.uniform(4, 300, 2).tolist()
            xy = [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)]
            boxes.append((img, int(rng.choice(cat_ids)), [*xy, w, h]))
    dets = []
    for img, cat, b in boxes:
        for _ in range(rng.integers(0, 4)):
            jitter = rng.normal(0, 0.1, 4) * [b[2], b[3], b[2], b[3]]
            label = cat if rng.random() < 0.8 else int(rng.choice(cat_ids))
            bbox = (np.array(b) + jitter).tolist()
            dets.append({"image_id": img, "category_id": label, "bbox": bbox, "score": float(rng.random())})
    for _ in range(5 * n_images):  # background false positives
        w, h = rng.uniform(4, 200, 2).tolist()
        img, cat = int(rng.integers(1, n_images + 1)), int(rng.choice(cat_ids))
        bbox = [rng.uniform(0, 600), rng.uniform(0, 400), w, h]
        dets.append({"image_id": img, "category_id": cat, "bbox": bbox, "score": float(rng.random())})
    return make_gt(boxes, n_images), dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_backend_matches_pycocotools(tmp_path: Path, seed: int) -> None:
    gt_dict, dets = random_case(seed)
    gt = load_coco(write_json(tmp_path, gt_dict))
    ref = coco_bbox_metrics(gt, dets, backend="pycocotools")
    fast = coco_bbox_metrics(gt, dets, backend="faster-coco-eval")
    assert 0.0 < ref["bbox_mAP"] < 1.0
    for key in METRIC_KEYS:
        assert fast[key] == pytest.approx(ref[key], abs=1e-12), key
    assert fast["per_class_AP"].keys() == ref["per_class_AP"].keys()
    for name, ap in ref["per_class_AP"].items():
        assert fast["per_class_AP"][name] == pytest.approx(ap, abs=1e-12), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_array_input_equals_dict_input_and_input_is_not_mutated(tmp_path: Path, backend: str) -> None:
    gt_dict, dets = random_case(3)
    gt = load_coco(write_json(tmp_path, gt_dict))
    snapshot = copy.deepcopy(dets)
    arr = np.array([[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in dets])
    from_dicts = coco_bbox_metrics(gt, dets, backend=backend)
    from_array = coco_bbox_metrics(gt, arr, backend=backend)
    assert dets == snapshot  # loadRes adds id/area/segmentation to the dicts it gets; ours must not leak
    assert from_dicts == from_array
    assert results_to_json(arr) == results_to_json(dets)
    json.dumps(results_to_json(arr))  # plain Python types, writable as a results file


@pytest.mark.parametrize("backend", BACKENDS)
def test_img_ids_restricts_evaluation(gt, backend: str) -> None:
    # Only image 1's detections are given: on image 1 alone that is perfect, on all images it is not.
    dets = gt_as_detections([b for b in GT_BOXES if b[0] == 1])
    assert coco_bbox_metrics(gt, dets, backend=backend, img_ids=[1])["bbox_mAP"] == pytest.approx(1.0)
    assert coco_bbox_metrics(gt, dets, backend=backend)["bbox_mAP"] < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_without_gt_is_minus_one(tmp_path: Path, backend: str) -> None:
    gt = load_coco(write_json(tmp_path, make_gt([b for b in GT_BOXES if b[1] != 9])))
    m = coco_bbox_metrics(gt, gt_as_detections([b for b in GT_BOXES if b[1] != 9]), backend=backend)
    assert m["per_class_AP"]["bird"] == -1.0
    assert m["bbox_mAP"] == pytest.approx(1.0)  # the empty class does not drag the mean down


def test_quiet_silences_and_loud_prints(gt, capsys) -> None:
    capsys.readouterr()
    coco_bbox_metrics(gt, gt_as_detections(), quiet=True)
    coco_bbox_metrics(gt, gt_as_detections(), backend="faster-coco-eval", quiet=True)
    assert capsys.readouterr().out == ""
    coco_bbox_metrics(gt, gt_as_detections(), quiet=False)
    assert "Average Precision" in capsys.readouterr().out


def test_load_coco_is_silent(tmp_path: Path, capsys) -> None:
    load_coco(write_json(tmp_path, make_gt()))
    assert capsys.readouterr().out == ""


def test_gt_can_be_a_path(tmp_path: Path) -> None:
    m = coco_bbox_metrics(write_json(tmp_path, make_gt()), gt_as_detections())
    assert m["bbox_mAP"] == pytest.approx(1.0)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CenterpointError, match="not found"):
        load_coco(tmp_path / "nope.json")


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [], "annotations": [')
    with pytest.raises(CenterpointError, match="not valid JSON"):
        load_coco(path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    data = make_gt()
    del data[key]
    with pytest.raises(CenterpointError, match=f"missing required key.*{key}"):
        load_coco(write_json(tmp_path, data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["annotations"][0].pop("area"), "lacks 'area'"),
        (lambda d: d["annotations"][1].update(id=1), "repeats id 1"),
        (lambda d: d["annotations"][0].update(image_id=99), "unknown image_id 99"),
        (lambda d: d["annotations"][0].update(category_id=2), "unknown category_id 2"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox must be"),
        (lambda d: d.update(images={}), "'images' must be a list"),
    ],
)
def test_malformed_entries(tmp_path: Path, mutate, message: str) -> None:
    data = make_gt()
    mutate(data)
    with pytest.raises(CenterpointError, match=message):
        load_coco(write_json(tmp_path, data))


def test_top_level_not_object(tmp_path: Path) -> None:
    with pytest.raises(CenterpointError, match="JSON object"):
        load_coco(write_json(tmp_path, [1, 2]))


@pytest.mark.parametrize(
    ("dets", "message"),
    [
        ([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}], "image_id"),
        ([{"image_id": 1, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 1}], r"category_id\(s\) \[0\]"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}], "lacks key 'score'"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 1}], "bbox must be"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": float("nan")}], "nan"),
        (np.zeros((3, 6)), r"shape \(N, 7\)"),
        (np.array([[1.5, 0, 0, 5, 5, 1, 1]]), "non-integer"),
        ("dets.json", "list of dicts"),
    ],
)
def test_bad_detections(gt, dets, message: str) -> None:
    with pytest.raises(CenterpointError, match=message):
        coco_bbox_metrics(gt, dets)


def test_bad_backend_and_img_ids(gt) -> None:
    with pytest.raises(CenterpointError, match="unknown COCO eval backend"):
        coco_bbox_metrics(gt, [], backend="detectron")  # type: ignore[arg-type]
    with pytest.raises(CenterpointError, match="img_ids"):
        coco_bbox_metrics(gt, [], img_ids=[42])
    with pytest.raises(CenterpointError, match="img_ids is empty"):
        coco_bbox_metrics(gt, [], img_ids=[])


def test_missing_faster_backend_is_a_clear_error(gt, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # makes the import raise ImportError
    with pytest.raises(CenterpointError, match="pip install faster-coco-eval"):
        coco_bbox_metrics(gt, [], backend="faster-coco-eval")
    assert coco_bbox_metrics(gt, [])["bbox_mAP"] == 0.0  # pycocotools still works


def test_format_metrics_table(gt) -> None:
    m = coco_bbox_metrics(gt, gt_as_detections([b for b in GT_BOXES if b[1] != 9]))
    table = format_metrics_table(m)
    lines = table.splitlines()
    assert all(key in table for key in METRIC_KEYS)
    assert any("bbox_mAP " in line and "0.667" in line for line in lines)
    assert any("bird" in line and "0.000" in line for line in lines)
    assert any("cat" in line and "1.000" in line for line in lines)
    assert table.index("bbox_AR_l") < table.index("bird")  # the 12 numbers first, then per-class AP
    assert "\x1b" not in table  # plain text, no ANSI colour codes
    m["bbox_mAP_s"] = -1.0
    assert any("bbox_mAP_s" in line and "n/a" in line for line in format_metrics_table(m).splitlines())
