"""Evaluation end to end with expectations derived independently of the code under test.

A "perfect model" reads the boxes off the pixels it is given (pure-colour rectangles on black, one colour
per class) and answers with the heatmap, sizes and offsets that describe them; through the predict step,
decode, the inverse transform and COCOeval it must score mAP 1.0, whatever the test mode, the image sizes
(odd and even) and flip test. A mirror-equivariant network must give the same detections with flip test on
and off. The batch size must never change a detection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from centerpoint.data.coco import load_index
from centerpoint.evaluation.evaluate import compute_metrics, detections_to_rows, predict_split
from centerpoint.model import build_network, init, make_apply
from centerpoint.runtime.devices import make_backend
from centerpoint.spec import ExperimentSpec
from centerpoint.spec_io import load_spec
from centerpoint.step import make_predict_step
from tests.helpers import write_coco

COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))  # class c is pure channel c
STRIDE = 4
# (width, height) and boxes [x, y, w, h, class] in original pixels: odd and even sizes, boxes of odd sides
# (centres on half pixels, never on a cell boundary after an integer shift), 6+ pixels apart.
IMAGES = [
    ((75, 61), [(4, 5, 21, 17, 0), (40, 30, 25, 23, 1)]),
    ((64, 96), [(10, 8, 19, 27, 2), (30, 50, 23, 21, 0), (6, 60, 15, 17, 1)]),
    ((97, 50), [(60, 12, 29, 25, 1)]),
    ((128, 80), [(2, 2, 31, 21, 0), (50, 40, 27, 33, 2), (90, 10, 25, 19, 1)]),
    ((33, 70), [(5, 20, 21, 25, 2)]),
]


def write_rectangles_coco(root: Path) -> tuple[Path, Path]:
    """PNG images (lossless: colours stay pure) with the boxes of IMAGES and their COCO json."""
    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i, ((w, h), boxes) in enumerate(IMAGES):
        pixels = np.zeros((h, w, 3), np.uint8)
        for j, (x, y, bw, bh, c) in enumerate(boxes):
            pixels[y:y + bh, x:x + bw] = COLOURS[c]
            anns.append({"id": 10 * i + j + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(3)]
    return write_coco(root / "ann.json", images, anns, cats), root / "img"


def edges(profile: Tensor) -> tuple[float, float]:
    """Where a 0..1 coverage profile sampled at pixel centres (i + 0.5) crosses 1/2 on its way up and down,
    by linear interpolation between neighbouring centres: a box's edges, to a fraction of a pixel even
    after bilinear resampling."""
    p = profile.double()
    on = torch.nonzero(p >= 0.5).flatten()
    first, last = int(on[0]), int(on[-1])
    left = float(first) if first == 0 else first - 0.5 + (0.5 - p[first - 1]) / (p[first] - p[first - 1])
    n = len(p)
    right = float(n) if last == n - 1 else last + 0.5 + (p[last] - 0.5) / (p[last] - p[last + 1])
    return float(left), float(right)


def perfect_apply(spec: ExperimentSpec):  # noqa: ANN201
    """apply(params, buffers, normalised images, train) answering what the pixels show (see module doc)."""
    mean = torch.tensor(spec.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.data.std).view(1, 3, 1, 1)

    def apply(params: dict, buffers: dict, x: Tensor, train: bool) -> tuple[dict[str, Tensor], dict]:
        pixels = x.float() * std + mean
        b, _, h, w = pixels.shape
        fh, fw = h // STRIDE, w // STRIDE
        heat = torch.full((b, 3, fh, fw), -20.0)
        wh, offset = torch.zeros(b, 2, fh, fw), torch.zeros(b, 2, fh, fw)
        cols, rows = torch.arange(fw).view(1, -1), torch.arange(fh).view(-1, 1)
        for i in range(b):
            for c in range(3):
                cover = (pixels[i, c] / 255).clamp(0, 1)  # only class c's rectangle has channel c
                if float(cover.max()) < 0.5:
                    continue
                x1, x2 = edges(cover.amax(0))
                y1, y2 = edges(cover.amax(1))
                cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE  # cells
                # A centre on a cell boundary would give a mirrored twin peak under flip test: bad test data.
                assert min(abs(cx - round(cx)), abs(cy - round(cy))) > 1e-3, (cx, cy)
                jc, ic = int(cx), int(cy)
                near = ((cols - jc).abs() <= 2) & ((rows - ic).abs() <= 2)
                heat[i, c] = torch.maximum(heat[i, c], 12.0 - 4.0 * ((cols - jc) ** 2 + (rows - ic) ** 2))
                # every cell near the centre decodes the exact box, so whichever peaks, the box is right
                wh[i, 0][near], wh[i, 1][near] = (x2 - x1) / STRIDE, (y2 - y1) / STRIDE
                offset[i, 0] = torch.where(near, cx - cols.float(), offset[i, 0])
                offset[i, 1] = torch.where(near, cy - rows.float(), offset[i, 1])
        return {"heatmap": heat, "wh": wh, "offset": offset}, buffers

    return apply


@pytest.fixture(scope="module")
def rectangles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_rectangles_coco(tmp_path_factory.mktemp("rectangles"))


def eval_spec(mode: str, flip: bool, batch: int, **more: str) -> ExperimentSpec:
    sets = [f"data.test_mode={mode}", "data.test_size=96", "data.dataset=coco", "model.num_classes=3",
            f"eval.flip_test={str(flip).lower()}", f"eval.batch_size={batch}", "runtime.precision=fp32"]
    return load_spec(None, sets + [f"{k}={v}" for k, v in more.items()])


def evaluate(spec: ExperimentSpec, ann_dir: tuple[Path, Path], predict) -> tuple[dict, np.ndarray]:  # noqa: ANN001
    index = load_index(*ann_dir, train=False)
    rows, bad = predict_split(predict, {}, {}, index, spec, make_backend("cpu"))
    assert bad == 0
    return compute_metrics(index, rows, spec), rows


@pytest.mark.parametrize("mode", ["pad", "resize"])
@pytest.mark.parametrize("flip", [False, True])
def test_perfect_model_scores_one(rectangles: tuple[Path, Path], mode: str, flip: bool) -> None:
    spec = eval_spec(mode, flip, batch=2)
    metrics, rows = evaluate(spec, rectangles, make_predict_step(perfect_apply(spec), spec))
    assert metrics["bbox_mAP"] == pytest.approx(1.0, abs=1e-9), metrics
    assert metrics["bbox_mAP_75"] == pytest.approx(1.0, abs=1e-9)
    # each ground-truth box is found with IoU >= 0.95 by a detection scoring above every false one
    assert len(rows) == 100 * len(IMAGES)


def test_perfect_model_boxes_are_the_ground_truth_in_pad_mode(rectangles: tuple[Path, Path]) -> None:
    """No resampling in pad mode: the found boxes are the annotations, to float precision."""
    spec = eval_spec("pad", False, batch=3)
    _, rows = evaluate(spec, rectangles, make_predict_step(perfect_apply(spec), spec))
    top = rows[rows[:, 5] > 0.5]
    found = {(int(r[0]), int(r[6])): r[1:5] for r in top}
    expected = {(i + 1, c + 1): (x, y, w, h) for i, (_, boxes) in enumerate(IMAGES) for x, y, w, h, c in boxes}
    assert found.keys() == expected.keys()
    for key, box in expected.items():
        assert np.allclose(found[key], box, atol=1e-4), key


def mirror_equivariant_apply(num_classes: int):  # noqa: ANN201
    """A network whose outputs for a mirrored image are the mirrored outputs (inputs whose width is a
    multiple of 4): 4x4 average pooling, a left-right symmetric 3x3 blur, per-cell nonlinear mixing."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(num_classes + 4, 3, generator=g)
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 5.0, 2.0], [1.0, 2.0, 1.0]]) / 17  # symmetric
    kernel = kernel.expand(3, 1, 3, 3)

    def apply(params: dict, buffers: dict, x: Tensor, train: bool) -> tuple[dict[str, Tensor], dict]:
        f = F.conv2d(F.avg_pool2d(x.float(), STRIDE), kernel, padding=1, groups=3)
        out = torch.einsum("oc,bchw->bohw", mix, torch.tanh(f)) * 3
        return {"heatmap": out[:, :num_classes], "wh": F.softplus(out[:, num_classes:num_classes + 2]) * 4,
                "offset": torch.sigmoid(out[:, num_classes + 2:])}, buffers

    return apply


def test_flip_test_is_exact_for_a_mirror_equivariant_network() -> None:
    spec_on = eval_spec("pad", True, batch=4)
    spec_off = eval_spec("pad", False, batch=4)
    apply = mirror_equivariant_apply(3)
    images = torch.randint(0, 256, (4, 3, 64, 96), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert not torch.equal(images, images.flip(-1))
    on = make_predict_step(apply, spec_on)({}, {}, images)
    off = make_predict_step(apply, spec_off)({}, {}, images)
    assert torch.equal(on[2], off[2])  # labels
    assert torch.allclose(on[1], off[1], atol=1e-6, rtol=0)  # scores
    assert torch.allclose(on[0], off[0], atol=1e-4, rtol=0)  # boxes, input pixels


def tiny_network_predict(spec: ExperimentSpec):  # noqa: ANN201
    """A small randomly initialised CenterNet (eval mode) as the predict step and its state."""
    net_spec = spec.model
    params, buffers = init(net_spec, 0)
    g = torch.Generator().manual_seed(0)
    buffers = {k: (v + torch.rand(v.shape, generator=g) if "running_var" in k else
                   v + 0.1 * torch.randn(v.shape, generator=g) if "running_mean" in k else v)
               for k, v in buffers.items()}
    predict = make_predict_step(make_apply(build_network(net_spec), traced=False), spec)
    return predict, params, buffers


def test_batch_size_never_changes_a_detection(tmp_path: Path) -> None:
    """Images of mixed sizes (three share an input size), pad mode: batch 1 and batch 4 give the same
    detections; padding an image to another's size would change those near its right and bottom edges."""
    sizes = [(40, 50), (70, 90), (60, 33), (33, 64), (50, 40), (45, 61)]  # inputs 64x64 (x3), 96x96, 64x96...
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400,
                     "iscrowd": 0})
    write_coco(tmp_path / "ann.json", images, anns, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    index = load_index(tmp_path / "ann.json", tmp_path / "img", train=False)
    net = ["model.width=8", "model.neck_channels=[16,16,8]", "model.head_channels=8", "model.num_classes=2"]
    out = {}
    for batch in (1, 4):
        spec = load_spec(None, ["data.dataset=coco", "data.test_mode=pad", f"eval.batch_size={batch}",
                                "runtime.precision=fp32", "eval.flip_test=true", *net])
        predict, params, buffers = tiny_network_predict(spec)
        rows, _ = predict_split(predict, params, buffers, index, spec, make_backend("cpu"))
        out[batch] = rows[np.lexsort((-rows[:, 5], rows[:, 0]))]  # by image, then score
    assert len(out[1]) == len(out[4]) == 100 * len(sizes)
    assert np.array_equal(out[1][:, [0, 6]], out[4][:, [0, 6]])
    assert np.allclose(out[1][:, 1:6], out[4][:, 1:6], atol=1e-4, rtol=0)


def centre_box_apply(num_classes: int):  # noqa: ANN201
    """One confident detection per image: a box as large as the whole input, centred on it."""
    def apply(params: dict, buffers: dict, x: Tensor, train: bool) -> tuple[dict[str, Tensor], dict]:
        b, _, h, w = x.shape
        fh, fw = h // STRIDE, w // STRIDE
        heat = torch.full((b, num_classes, fh, fw), -10.0)
        heat[:, 0, fh // 2, fw // 2] = 10.0
        wh = torch.stack([torch.full((b, fh, fw), float(fw)), torch.full((b, fh, fw), float(fh))], 1)
        return {"heatmap": heat, "wh": wh, "offset": torch.zeros(b, 2, fh, fw)}, buffers

    return apply


@pytest.mark.parametrize("clip", [False, True])
def test_evaluation_scores_boxes_as_the_model_gives_them_unless_asked_to_clip(
        rectangles: tuple[Path, Path], clip: bool) -> None:
    spec = eval_spec("pad", False, batch=2, **{"eval.clip_boxes": str(clip).lower()})
    _, rows = evaluate(spec, rectangles, make_predict_step(centre_box_apply(3), spec))
    top = rows[rows[:, 5] > 0.5]
    assert len(top) == len(IMAGES)
    for r in top:
        (w, h), _ = IMAGES[int(r[0]) - 1]
        out_w, out_h = (w | 31) + 1, (h | 31) + 1  # the padded input, which the box covers
        left, top_row = out_w // 2 - w // 2, out_h // 2 - h // 2
        box = [0, 0, w, h] if clip else [-left, -top_row, out_w, out_h]
        assert np.allclose(r[1:5], box, atol=1e-4), (r, box)


def test_detections_to_rows_by_hand() -> None:
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 60.0], [-5.0, 2.0, 8.0, 12.0], [40.0, 5.0, 35.0, 9.0]],
                          [[95.0, 0.0, 130.0, 10.0], [1.0, 1.0, 2.0, 2.0], [120.0, 5.0, 140.0, 8.0]]])
    scores = torch.tensor([[0.875, 0.5, 0.375], [0.75, 0.0625, 0.25]])  # exact in float32
    labels = torch.tensor([[0, 2, 1], [1, 0, 2]])
    ids = torch.tensor([7, 9])
    sizes = np.array([[50, 100], [20, 110]])  # (height, width)
    cats = (1, 3, 5)
    rows = detections_to_rows(boxes, scores, labels, ids, sizes, cats, 0.1)
    assert rows.tolist() == [
        [7, 10, 20, 20, 40, 0.875, 1], [7, -5, 2, 13, 10, 0.5, 5], [7, 40, 5, -5, 4, 0.375, 3],
        [9, 95, 0, 35, 10, 0.75, 3], [9, 120, 5, 20, 3, 0.25, 5],
    ]
    clipped = detections_to_rows(boxes, scores, labels, ids, sizes, cats, 0.1, clip=True)
    # image 7 is 100 wide and 50 high: (10,20)-(30,60) -> (10,20)-(30,50); (-5,2)-(8,12) -> (0,2)-(8,12);
    # the inverted box has no area once clipped. Image 9 is 110 x 20: (95,0)-(130,10) -> (95,0)-(110,10);
    # (120,5)-(140,8) lies right of the image: dropped.
    assert clipped.tolist() == [[7, 10, 20, 20, 30, 0.875, 1], [7, 0, 2, 8, 10, 0.5, 5],
                                [9, 95, 0, 15, 10, 0.75, 3]]
    high = detections_to_rows(boxes, scores, labels, ids, sizes, cats, 0.875)  # the threshold is inclusive
    assert high.tolist() == [[7, 10, 20, 20, 40, 0.875, 1]]
