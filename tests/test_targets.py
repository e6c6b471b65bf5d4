"""Tests for centerpoint.data.targets against hand-computed values and a slow mmdet-style reference."""

import math

import pytest
import torch

from centerpoint.data.targets import gaussian_radius, make_targets
from centerpoint.errors import CenterpointError

EPS32 = torch.finfo(torch.float32).eps


def radius_py(h: float, w: float, o: float = 0.3) -> float:
    """Plain-Python three-root gaussian radius (mmdet's corrected formula)."""
    a1, b1, c1 = 1.0, h + w, w * h * (1 - o) / (1 + o)
    r1 = (b1 - math.sqrt(b1**2 - 4 * a1 * c1)) / (2 * a1)
    a2, b2, c2 = 4.0, 2 * (h + w), (1 - o) * w * h
    r2 = (b2 - math.sqrt(b2**2 - 4 * a2 * c2)) / (2 * a2)
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / (2 * a3)
    return min(r1, r2, r3)


def reference_targets(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      feat_hw: tuple[int, int], stride: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Slow per-object reference with mmdet gen_gaussian_target window slicing.

    Returns the maps plus, per (b, y, x) centre cell, the list of candidate (w, h, ox, oy) values.
    """
    b_sz, n = labels.shape
    h_map, w_map = feat_hw
    heat = torch.zeros(b_sz, num_classes, h_map, w_map)
    wh = torch.zeros(b_sz, 2, h_map, w_map)
    off = torch.zeros(b_sz, 2, h_map, w_map)
    reg = torch.zeros(b_sz, 1, h_map, w_map)
    candidates: dict[tuple[int, int, int], list[tuple[float, float, float, float]]] = {}
    for bi in range(b_sz):
        for j in range(n):
            lab = int(labels[bi, j])
            if lab < 0:
                continue
            x1, y1, x2, y2 = (float(v) for v in boxes[bi, j])
            cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
            bw, bh = (x2 - x1) / stride, (y2 - y1) / stride
            xi = min(max(math.floor(cx), 0), w_map - 1)
            yi = min(max(math.floor(cy), 0), h_map - 1)
            r = max(0, int(radius_py(bh, bw)))
            sigma = (2 * r + 1) / 6
            xs = torch.arange(-r, r + 1, dtype=torch.float32).view(1, -1)
            ys = torch.arange(-r, r + 1, dtype=torch.float32).view(-1, 1)
            g = torch.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
            g[g < EPS32 * g.max()] = 0
            left, right = min(xi, r), min(w_map - xi, r + 1)
            top, bottom = min(yi, r), min(h_map - yi, r + 1)
            window = heat[bi, lab, yi - top:yi + bottom, xi - left:xi + right]
            heat[bi, lab, yi - top:yi + bottom, xi - left:xi + right] = torch.maximum(
                window, g[r - top:r + bottom, r - left:r + right])
            vals = (bw, bh, cx - math.floor(cx), cy - math.floor(cy))
            wh[bi, :, yi, xi] = torch.tensor(vals[:2])
            off[bi, :, yi, xi] = torch.tensor(vals[2:])
            reg[bi, 0, yi, xi] = 1.0
            candidates.setdefault((bi, yi, xi), []).append(vals)
    return {"heatmap": heat, "wh": wh, "offset": off, "reg_weight": reg}, candidates


@pytest.mark.parametrize("h,w", [(1.0, 1.0), (5.0, 4.0), (6.75, 5.25), (10.0, 10.0), (3.0, 40.0),
                                 (0.5, 120.0), (77.7, 12.3)])
def test_gaussian_radius_matches_python(h: float, w: float) -> None:
    got = gaussian_radius(torch.tensor(h, dtype=torch.float64), torch.tensor(w, dtype=torch.float64))
    assert got.item() == pytest.approx(radius_py(h, w), rel=1e-12)
    got32 = gaussian_radius(torch.tensor([h]), torch.tensor([w]), 0.3)
    assert got32.item() == pytest.approx(radius_py(h, w), rel=1e-5)


def test_gaussian_radius_other_overlap_and_broadcast() -> None:
    hs = torch.tensor([[2.0], [9.0]], dtype=torch.float64)
    ws = torch.tensor([3.0, 7.5, 20.0], dtype=torch.float64)
    got = gaussian_radius(hs, ws, min_overlap=0.7)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert got[i, j].item() == pytest.approx(radius_py(hs[i, 0].item(), ws[j].item(), 0.7), rel=1e-12)


def test_single_box_hand_computed() -> None:
    # stride 4, 8x8 map. Centre (13, 18.5) px = (3.25, 4.625) cells; size 40x40 px = 10x10 cells.
    boxes = torch.tensor([[[-7.0, -1.5, 33.0, 38.5]]])
    labels = torch.tensor([[1]])
    t = make_targets(boxes, labels, num_classes=3, feat_hw=(8, 8), stride=4)
    assert t["heatmap"].shape == (1, 3, 8, 8) and t["heatmap"].dtype == torch.float32
    # radius for 10x10 cells: r2 = (40 - sqrt(1600 - 16 * 0.7 * 100)) / 8 = 2.2614 -> 2; sigma = 5/6.
    assert int(radius_py(10.0, 10.0)) == 2
    two_sigma_sq = 2 * (5 / 6) ** 2
    heat = t["heatmap"][0, 1]
    assert heat[4, 3].item() == 1.0
    assert heat[4, 4].item() == pytest.approx(math.exp(-1 / two_sigma_sq), abs=1e-7)
    assert heat[5, 4].item() == pytest.approx(math.exp(-2 / two_sigma_sq), abs=1e-7)
    assert heat[2, 1].item() == pytest.approx(math.exp(-8 / two_sigma_sq), abs=1e-7)  # window corner
    assert heat[6, 3].item() == pytest.approx(math.exp(-4 / two_sigma_sq), abs=1e-7)
    # Outside the 5x5 window (x in 1..5, y in 2..6) everything is zero, as are the other classes.
    window = torch.zeros(8, 8, dtype=torch.bool)
    window[2:7, 1:6] = True
    assert (heat[~window] == 0).all() and (heat[window] > 0).all()
    assert (t["heatmap"][0, [0, 2]] == 0).all()
    # Regression targets only at the centre cell (y=4, x=3).
    assert t["wh"][0, :, 4, 3].tolist() == [10.0, 10.0]
    assert t["offset"][0, :, 4, 3].tolist() == [0.25, 0.625]
    assert t["reg_weight"].sum().item() == 1.0 and t["reg_weight"][0, 0, 4, 3].item() == 1.0
    assert t["wh"].abs().sum().item() == 20.0
    assert t["offset"].abs().sum().item() == 0.875


def test_same_class_max_and_other_class_channel() -> None:
    # Two 10x10-cell boxes (radius 2) with centres 2 cells apart along x, same class, plus a third
    # object in class 0 on top of them.
    boxes = torch.tensor([[[-8.0, -4.0, 32.0, 36.0], [0.0, -4.0, 40.0, 36.0], [-8.0, -4.0, 32.0, 36.0]]])
    labels = torch.tensor([[2, 2, 0]])
    t = make_targets(boxes, labels, num_classes=3, feat_hw=(8, 8), stride=4)
    two_sigma_sq = 2 * (5 / 6) ** 2
    heat = t["heatmap"][0]
    # Centres at cells (x=3, y=4) and (x=5, y=4).
    assert heat[2, 4, 3].item() == 1.0 and heat[2, 4, 5].item() == 1.0
    # Cell (x=4, y=4) is 1 away from both: value exp(-1/2s^2), not a sum.
    assert heat[2, 4, 4].item() == pytest.approx(math.exp(-1 / two_sigma_sq), abs=1e-7)
    # Cell (x=6, y=5): d^2 = 9+1 = 10 from the first (outside its window) and 2 from the second.
    assert heat[2, 5, 6].item() == pytest.approx(math.exp(-2 / two_sigma_sq), abs=1e-7)
    # Cell (x=2, y=3): d^2 = 2 from the first, 10 from the second (outside) -> first wins.
    assert heat[2, 3, 2].item() == pytest.approx(math.exp(-2 / two_sigma_sq), abs=1e-7)
    # Class 0 has only the third object's gaussian; class 1 is empty.
    assert heat[0, 4, 3].item() == 1.0 and heat[0, 4, 5].item() == pytest.approx(
        math.exp(-4 / two_sigma_sq), abs=1e-7)
    assert heat[0, 4, 6].item() == 0.0
    assert (heat[1] == 0).all()
    # Objects 1 and 3 share the centre cell (identical boxes), so two distinct centres in total.
    assert t["reg_weight"].sum().item() == 2.0


def test_padding_is_ignored() -> None:
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 12.0, 12.0]]])
    only_first = make_targets(boxes[:, :1], torch.tensor([[0]]), 2, (8, 8), 4)
    padded = make_targets(boxes, torch.tensor([[0, -1, -1]]), 2, (8, 8), 4)
    for key in only_first:
        assert torch.equal(only_first[key], padded[key]), key
    empty = make_targets(boxes, torch.full((1, 3), -1), 2, (8, 8), 4)
    for key in empty:
        assert (empty[key] == 0).all(), key


def test_border_box_is_clipped() -> None:
    # 8x8-cell box centred at cell (0.5, 7.5): radius 1 and the 3x3 window crosses two borders.
    boxes = torch.tensor([[[-14.0, 14.0, 18.0, 46.0]]])
    assert int(radius_py(8.0, 8.0)) == 1
    t = make_targets(boxes, torch.tensor([[0]]), 1, (8, 8), 4)
    heat = t["heatmap"][0, 0]
    two_sigma_sq = 2 * 0.5**2
    expected = torch.zeros(8, 8)
    expected[7, 0] = 1.0
    expected[6, 0] = expected[7, 1] = math.exp(-1 / two_sigma_sq)
    expected[6, 1] = math.exp(-2 / two_sigma_sq)
    assert torch.allclose(heat, expected, atol=1e-7, rtol=0)
    assert t["offset"][0, :, 7, 0].tolist() == [0.5, 0.5]


def test_centre_outside_map_is_clamped() -> None:
    # Centre at (9.25, -0.75) cells: clamped to cell (x=7, y=0); offset stays c - floor(c).
    boxes = torch.tensor([[[33.0, -7.0, 41.0, 1.0]]])
    t = make_targets(boxes, torch.tensor([[0]]), 1, (8, 8), 4)
    assert t["heatmap"][0, 0, 0, 7].item() == 1.0
    assert t["reg_weight"][0, 0, 0, 7].item() == 1.0
    assert t["offset"][0, :, 0, 7].tolist() == [0.25, 0.25]
    assert t["wh"][0, :, 0, 7].tolist() == [2.0, 2.0]


def _random_batch(seed: int, b: int, n_max: int, num_classes: int, feat_hw: tuple[int, int],
                  stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h_px, w_px = feat_hw[0] * stride, feat_hw[1] * stride
    # Centres may fall slightly outside the image to exercise clamping; sizes from sub-cell to huge.
    cx = torch.rand(b, n_max, generator=gen) * (w_px + 20) - 10
    cy = torch.rand(b, n_max, generator=gen) * (h_px + 20) - 10
    bw = torch.rand(b, n_max, generator=gen) ** 2 * w_px * 1.2 + 0.5
    bh = torch.rand(b, n_max, generator=gen) ** 2 * h_px * 1.2 + 0.5
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    labels = torch.randint(0, num_classes, (b, n_max), generator=gen)
    counts = torch.randint(0, n_max + 1, (b,), generator=gen)
    labels[torch.arange(n_max)[None, :] >= counts[:, None]] = -1
    return boxes, labels


@pytest.mark.parametrize("seed,num_classes", [(0, 2), (1, 3), (2, 5), (3, 4)])
def test_matches_slow_reference(seed: int, num_classes: int) -> None:
    feat_hw, stride = (24, 20), 4  # non-square catches an H/W swap
    boxes, labels = _random_batch(seed, 3, 20, num_classes, feat_hw, stride)
    got = make_targets(boxes, labels, num_classes, feat_hw, stride)
    ref, candidates = reference_targets(boxes, labels, num_classes, feat_hw, stride)
    assert (labels >= 0).sum() > 10  # the case is not trivially empty
    assert torch.allclose(got["heatmap"], ref["heatmap"], atol=1e-6, rtol=0)
    assert torch.equal(got["reg_weight"], ref["reg_weight"])
    # wh/offset: zero off-centre; at each centre cell, equal to one of the objects sharing it.
    off_centre = got["reg_weight"].expand(-1, 2, -1, -1) == 0
    assert (got["wh"][off_centre] == 0).all() and (got["offset"][off_centre] == 0).all()
    for (bi, yi, xi), vals in candidates.items():
        got_vals = torch.cat([got["wh"][bi, :, yi, xi], got["offset"][bi, :, yi, xi]])
        assert any(torch.allclose(got_vals, torch.tensor(v, dtype=torch.float32), atol=1e-6, rtol=0)
                   for v in vals), (bi, yi, xi)


def test_per_sample_equals_batched() -> None:
    boxes, labels = _random_batch(7, 3, 12, 3, (16, 16), 8)
    batched = make_targets(boxes, labels, 3, (16, 16), 8)
    for bi in range(3):
        single = make_targets(boxes[bi:bi + 1], labels[bi:bi + 1], 3, (16, 16), 8)
        for key in single:
            assert torch.equal(single[key], batched[key][bi:bi + 1]), key


def test_large_case_runs() -> None:
    boxes, labels = _random_batch(11, 1, 100, 80, (128, 128), 4)
    labels[:] = labels.abs()  # all 100 valid
    t = make_targets(boxes, labels, 80, (128, 128), 4)
    assert t["heatmap"].shape == (1, 80, 128, 128)
    assert t["heatmap"].max().item() == 1.0


def test_bad_inputs_raise() -> None:
    boxes = torch.zeros(1, 2, 4)
    with pytest.raises(CenterpointError, match="num_classes"):
        make_targets(boxes, torch.tensor([[0, 3]]), 3, (8, 8), 4)
    with pytest.raises(CenterpointError, match="labels shape"):
        make_targets(boxes, torch.tensor([0, 1]), 3, (8, 8), 4)
    with pytest.raises(CenterpointError, match=r"\(B, N, 4\)"):
        make_targets(torch.zeros(2, 4), torch.tensor([[0, 1]]), 3, (8, 8), 4)
    with pytest.raises(CenterpointError, match="min_overlap"):
        make_targets(boxes, torch.tensor([[0, 1]]), 3, (8, 8), 4, min_overlap=1.0)


def test_huge_box_and_empty_batch() -> None:
    # Radius far larger than the map, centre in cell (0, 0): the window must reach the far corner.
    boxes = torch.tensor([[[-2000.0, -1500.0, 2004.0, 1504.0], [4.0, 4.0, 12.0, 12.0]]])
    labels = torch.tensor([[0, 1]])
    got = make_targets(boxes, labels, 2, (6, 5), 4)
    ref, _ = reference_targets(boxes, labels, 2, (6, 5), 4)
    assert int(radius_py(3004 / 4, 4004 / 4)) > 100
    assert (got["heatmap"][0, 0] > 0).all()
    for key in ref:
        assert torch.allclose(got[key], ref[key], atol=1e-6, rtol=0), key
    empty = make_targets(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.int64), 3, (4, 4), 4)
    assert empty["heatmap"].shape == (2, 3, 4, 4) and empty["wh"].shape == (2, 2, 4, 4)
    assert all((v == 0).all() for v in empty.values())


# Three boxes whose centres share cell (x 3, y 2) at stride 4, with their (w, h, dx, dy) in cells by hand:
#   A (12, 8)-(14, 12): centre (13, 10) px = (3.25, 2.5) cells, size (0.5, 1.0)
#   B (8, 6)-(18, 14): centre (13, 10) px, size (2.5, 2.0)
#   D (13.5, 9)-(15.5, 11.5): centre (14.5, 10.25) px = (3.625, 2.5625) cells, size (0.5, 0.625)
SHARED = {"A": ([12.0, 8.0, 14.0, 12.0], [0.5, 1.0, 0.25, 0.5]),
          "B": ([8.0, 6.0, 18.0, 14.0], [2.5, 2.0, 0.25, 0.5]),
          "D": ([13.5, 9.0, 15.5, 11.5], [0.5, 0.625, 0.625, 0.5625])}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no cuda"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["ABD", "DBA", "BDA", "ADB"])
def test_later_box_wins_a_shared_centre_cell(order: str, device: str) -> None:
    """mmdetection writes wh/offset box by box, so the last box of a shared cell wins; a padding slot
    (label -1) after it changes nothing, and the heatmap keeps the max of all."""
    boxes = torch.tensor([[SHARED[k][0] for k in order] + [[12.0, 8.0, 14.0, 12.0]]], device=device)
    labels = torch.tensor([[0, 1, 0, -1]], device=device)
    got = make_targets(boxes, labels, 2, (8, 8), 4)
    want = SHARED[order[-1]][1]
    assert got["wh"][0, :, 2, 3].tolist() == want[:2] and got["offset"][0, :, 2, 3].tolist() == want[2:]
    assert got["reg_weight"].sum().item() == 1.0 and got["reg_weight"][0, 0, 2, 3].item() == 1.0
    assert got["heatmap"][0, 0, 2, 3].item() == 1.0 and got["heatmap"][0, 1, 2, 3].item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_later_box_wins_among_many_and_across_images(device: str) -> None:
    """300 boxes per image over a few cells (many per cell), in several images of one batch: every cell
    holds the values of the last box whose centre falls in it."""
    gen = torch.Generator().manual_seed(5)
    b, n = 3, 300
    centre = torch.randint(0, 3, (b, n, 2), generator=gen).double() * 4 + 5.5  # cells 1..3, sub-cell (0.375)
    size = torch.rand(b, n, 2, generator=gen, dtype=torch.float64) * 20 + 1
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1).float()
    labels = torch.randint(-1, 2, (b, n), generator=gen)
    got = make_targets(boxes.to(device), labels.to(device), 2, (6, 6), 4)
    want = torch.zeros(b, 2, 6, 6)
    for i in range(b):
        for j in range(n):  # box by box: a later box overwrites
            if labels[i, j] >= 0:
                x1, y1, x2, y2 = (float(v) for v in boxes[i, j])
                cx, cy = (x1 + x2) / 8, (y1 + y2) / 8
                want[i, :, int(cy), int(cx)] = torch.tensor([(x2 - x1) / 4, (y2 - y1) / 4])
    assert torch.allclose(got["wh"].cpu(), want, atol=1e-6, rtol=0)
