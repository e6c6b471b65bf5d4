"""Tests for centerpoint.evaluation.decode: hand-built peaks and a targets -> decode round trip."""

import pytest
import torch

from centerpoint.data.targets import make_targets
from centerpoint.errors import CenterpointError
from centerpoint.evaluation.decode import boxes_to_original, decode_heatmap, local_max


def test_hand_built_peaks() -> None:
    heat = torch.zeros(1, 2, 4, 5)
    heat[0, 0, 1, 1] = 0.9
    heat[0, 0, 1, 2] = 0.8  # neighbour of a higher peak in its own class: suppressed
    heat[0, 1, 3, 4] = 0.7  # corner cell
    heat[0, 1, 3, 0] = 0.6
    heat[0, 1, 1, 1] = 0.5  # same cell as class 0's peak, but pooling is per class
    wh = torch.zeros(1, 2, 4, 5)
    offset = torch.zeros(1, 2, 4, 5)
    wh[0, :, 1, 1] = torch.tensor([2.0, 4.0])
    offset[0, :, 1, 1] = torch.tensor([0.5, 0.25])
    wh[0, :, 3, 4] = torch.tensor([1.0, 3.0])
    offset[0, :, 3, 4] = torch.tensor([0.0, 0.5])
    boxes, scores, labels = decode_heatmap(heat, wh, offset, stride=8, k=5)
    assert boxes.shape == (1, 5, 4) and scores.shape == (1, 5) and labels.shape == (1, 5)
    assert labels.dtype == torch.int64
    assert scores[0].tolist() == pytest.approx([0.9, 0.7, 0.6, 0.5, 0.0])
    assert labels[0, :4].tolist() == [0, 1, 1, 1]
    # centre (1 + 0.5, 1 + 0.25) cells, size 2x4 cells -> (0.5, -0.75, 2.5, 3.25) * 8
    assert boxes[0, 0].tolist() == [4.0, -6.0, 20.0, 26.0]
    # centre (4, 3.5), size 1x3 -> (3.5, 2, 4.5, 5) * 8
    assert boxes[0, 1].tolist() == [28.0, 16.0, 36.0, 40.0]
    # zero size and offset at (y=3, x=0): a point box at the cell corner
    assert boxes[0, 2].tolist() == [0.0, 24.0, 0.0, 24.0]
    # Class 1 at cell (1, 1) reads the same wh/offset as class 0 there.
    assert boxes[0, 3].tolist() == [4.0, -6.0, 20.0, 26.0]


def test_kernel_one_keeps_everything_and_k_is_capped() -> None:
    heat = torch.tensor([[[[0.2, 0.8], [0.4, 0.3]]]])
    zeros = torch.zeros(1, 2, 2, 2)
    _, scores, _ = decode_heatmap(heat, zeros, zeros, stride=4, k=100, kernel=1)
    assert scores.shape == (1, 4)
    assert scores[0].tolist() == pytest.approx([0.8, 0.4, 0.3, 0.2])
    _, scores3, _ = decode_heatmap(heat, zeros, zeros, stride=4, k=100, kernel=3)
    assert scores3[0].tolist() == pytest.approx([0.8, 0.0, 0.0, 0.0])


def test_even_kernel_raises() -> None:
    zeros = torch.zeros(1, 2, 2, 2)
    with pytest.raises(CenterpointError, match="odd"):
        decode_heatmap(zeros[:, :1], zeros, zeros, stride=4, kernel=2)


def _separated_boxes(seed: int, b: int, n: int, num_classes: int, feat_hw: tuple[int, int],
                     stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random boxes whose centres fall in distinct cells (so every peak is exactly 1 and kept)."""
    gen = torch.Generator().manual_seed(seed)
    h_map, w_map = feat_hw
    cells = torch.stack([torch.randperm(h_map * w_map, generator=gen)[:n] for _ in range(b)])
    cx = (cells % w_map).double() + torch.rand(b, n, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    cy = (cells // w_map).double() + torch.rand(b, n, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    bw = torch.rand(b, n, generator=gen, dtype=torch.float64) * 12 + 0.5
    bh = torch.rand(b, n, generator=gen, dtype=torch.float64) * 12 + 0.5
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1) * stride
    labels = torch.randint(0, num_classes, (b, n), generator=gen)
    return boxes.float(), labels


def _match(decoded: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Max-abs error of each GT box against its nearest decoded box; (M, 4) x (K, 4) -> (M,)."""
    return (gt[:, None, :] - decoded[None, :, :]).abs().amax(-1).amin(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_and_original_pixels(seed: int) -> None:
    feat_hw, stride, num_classes = (32, 24), 4, 3
    boxes, labels = _separated_boxes(seed, 2, 12, num_classes, feat_hw, stride)
    labels[1, 9:] = -1  # padding in the second image
    t = make_targets(boxes, labels, num_classes, feat_hw, stride)
    dec_boxes, scores, dec_labels = decode_heatmap(t["heatmap"], t["wh"], t["offset"], stride, k=30)
    assert dec_boxes.shape == (2, 30, 4)

    w_in = feat_hw[1] * stride
    s, tx, ty = 0.6, 5.0, -3.0  # input = s * original + t  (letterbox-style)
    inv = torch.tensor([[1 / s, 0.0, -tx / s], [0.0, 1 / s, -ty / s]])
    # With a horizontal flip after the resize: x_in = W_in - (s * x_orig + tx).
    inv_flip = torch.tensor([[-1 / s, 0.0, (w_in - tx) / s], [0.0, 1 / s, -ty / s]])
    orig = boxes_to_original(dec_boxes, inv.expand(2, 2, 3))
    orig_flip = boxes_to_original(dec_boxes, inv_flip.expand(2, 2, 3))

    for bi in range(2):
        valid = labels[bi] >= 0
        gt, gt_lab = boxes[bi][valid], labels[bi][valid]
        ones = scores[bi] == 1
        assert ones.sum().item() == valid.sum().item()
        assert _match(dec_boxes[bi][ones], gt).max().item() < 1e-4
        # labels of the matched boxes
        nearest = (gt[:, None] - dec_boxes[bi][ones][None]).abs().amax(-1).argmin(-1)
        assert torch.equal(dec_labels[bi][ones][nearest], gt_lab)
        # original pixels, computed independently from the forward transform
        exp = torch.stack([(gt[:, 0] - tx) / s, (gt[:, 1] - ty) / s,
                           (gt[:, 2] - tx) / s, (gt[:, 3] - ty) / s], -1)
        assert _match(orig[bi][ones], exp).max().item() < 1e-3
        exp_flip = torch.stack([(w_in - tx - gt[:, 2]) / s, (gt[:, 1] - ty) / s,
                                (w_in - tx - gt[:, 0]) / s, (gt[:, 3] - ty) / s], -1)
        assert (exp_flip[:, 0] <= exp_flip[:, 2]).all()
        # forward-map the expected flipped box back to input pixels: must give the GT again
        fwd_x1 = w_in - (s * exp_flip[:, 2] + tx)
        assert torch.allclose(fwd_x1, gt[:, 0], atol=1e-4)
        assert _match(orig_flip[bi][ones], exp_flip).max().item() < 1e-3


def test_boxes_to_original_swaps_mirrored_corners_and_checks_shape() -> None:
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 60.0], [30.0, 60.0, 10.0, 20.0]]])  # the second one inverted
    flip_both = torch.tensor([[[-2.0, 0.0, 100.0], [0.0, -0.5, 50.0]]])
    # x: -2*10+100 = 80, -2*30+100 = 40; y: -10+50 = 40, -30+50 = 20
    assert boxes_to_original(boxes, flip_both).tolist() == [[[40.0, 20.0, 80.0, 40.0], [80.0, 40.0, 40.0, 20.0]]]
    # without a mirror an inverted box (negative predicted size) stays inverted, as mmdetection leaves it
    plain = torch.tensor([[[2.0, 0.0, -5.0], [0.0, 0.5, 1.0]]])
    assert boxes_to_original(boxes, plain).tolist() == [[[15.0, 11.0, 55.0, 31.0], [55.0, 31.0, 15.0, 11.0]]]
    with pytest.raises(CenterpointError, match="inverse_affine"):
        boxes_to_original(boxes, torch.zeros(2, 2, 3))


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_max_equals_max_pool(kernel: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(kernel)
    x = torch.rand(2, 3, 9, 7, generator=g).to(dtype)
    x[0, 0, 4, 3] = 2.0  # a plateau and a lone peak
    x[1, 2, 0, :3] = 1.5
    pooled = torch.nn.functional.max_pool2d(x, kernel, stride=1, padding=kernel // 2)
    assert torch.equal(local_max(x, kernel), pooled)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(local_max(cl, kernel), pooled)
