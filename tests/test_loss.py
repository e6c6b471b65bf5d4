"""Tests for centerpoint.loss against hand-computed gaussian focal and L1 values."""

import math

import pytest
import torch

from centerpoint.loss import centernet_loss


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _focal_py(logits: list[float], targets: list[float], alpha: float, gamma: float) -> float:
    """Summed gaussian focal loss, written from the formulas with math.log."""
    total = 0.0
    for x, t in zip(logits, targets, strict=True):
        p = _sigmoid(x)
        if t == 1:
            total += -math.log(p) * (1 - p) ** alpha
        else:
            total += -math.log(1 - p) * p**alpha * (1 - t) ** gamma
    return total


def _tiny_case() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    # B=1, C=2, H=1, W=3; positives at (c=0, x=0) and (c=1, x=1).
    heat_t = torch.tensor([[[[1.0, 0.5, 0.0]], [[0.0, 1.0, 0.25]]]])
    logits = torch.tensor([[[[0.0, 1.0, -2.0]], [[3.0, -0.5, 0.7]]]])
    targets = {
        "heatmap": heat_t,
        "wh": torch.tensor([[[[4.0, 2.0, 9.0]], [[3.0, 5.0, 9.0]]]]),
        "offset": torch.tensor([[[[0.25, 0.5, 0.9]], [[0.75, 0.0, 0.9]]]]),
        "reg_weight": torch.tensor([[[[1.0, 1.0, 0.0]]]]),
    }
    pred = {
        "heatmap": logits,
        "wh": torch.tensor([[[[3.5, 2.5, 0.0]], [[4.0, 3.0, -7.0]]]]),
        "offset": torch.tensor([[[[0.5, 0.25, 0.0]], [[0.5, 0.5, 0.0]]]]),
    }
    return pred, targets


def test_hand_computed_default_weights() -> None:
    pred, targets = _tiny_case()
    out = centernet_loss(pred, targets)
    avg = 2.0
    logits = [0.0, 1.0, -2.0, 3.0, -0.5, 0.7]
    heat = [1.0, 0.5, 0.0, 0.0, 1.0, 0.25]
    exp_heat = _focal_py(logits, heat, 2.0, 4.0) / avg
    # L1 at the two centre cells only: wh |3.5-4|+|2.5-2| + |4-3|+|3-5| = 4.0; offsets 0.25+0.25+0.25+0.5.
    exp_wh = 4.0 / (2 * avg) * 0.1
    exp_off = 1.25 / (2 * avg) * 1.0
    assert out["loss_heatmap"].item() == pytest.approx(exp_heat, rel=1e-6)
    assert out["loss_wh"].item() == pytest.approx(exp_wh, rel=1e-6)
    assert out["loss_offset"].item() == pytest.approx(exp_off, rel=1e-6)
    assert out["loss"].item() == pytest.approx(exp_heat + exp_wh + exp_off, rel=1e-6)
    for value in out.values():
        assert value.dim() == 0 and value.dtype == torch.float32


def test_hand_computed_custom_weights_and_exponents() -> None:
    pred, targets = _tiny_case()
    out = centernet_loss(pred, targets, heatmap_weight=2.0, wh_weight=0.5, offset_weight=3.0,
                         alpha=1.5, gamma=3.0)
    logits = [0.0, 1.0, -2.0, 3.0, -0.5, 0.7]
    heat = [1.0, 0.5, 0.0, 0.0, 1.0, 0.25]
    assert out["loss_heatmap"].item() == pytest.approx(_focal_py(logits, heat, 1.5, 3.0) / 2 * 2.0, rel=1e-6)
    assert out["loss_wh"].item() == pytest.approx(4.0 / 4 * 0.5, rel=1e-6)
    assert out["loss_offset"].item() == pytest.approx(1.25 / 4 * 3.0, rel=1e-6)


def test_no_positives_uses_avg_factor_one() -> None:
    heat_t = torch.tensor([[[[0.5, 0.0]]]])
    logits = torch.tensor([[[[0.3, -1.0]]]])
    zeros = torch.zeros(1, 2, 1, 2)
    targets = {"heatmap": heat_t, "wh": zeros, "offset": zeros, "reg_weight": torch.zeros(1, 1, 1, 2)}
    out = centernet_loss({"heatmap": logits, "wh": zeros + 1, "offset": zeros}, targets)
    assert out["loss_heatmap"].item() == pytest.approx(_focal_py([0.3, -1.0], [0.5, 0.0], 2.0, 4.0), rel=1e-6)
    assert out["loss_wh"].item() == 0.0 and out["loss_offset"].item() == 0.0


def test_extreme_logits_finite_with_finite_grad() -> None:
    # Confidently wrong everywhere: positive at -1e4, negative at +1e4, plus confidently right cells.
    heat_t = torch.tensor([[[[1.0, 0.0, 1.0, 0.0, 0.5]]]])
    logits = torch.tensor([[[[-1e4, 1e4, 1e4, -1e4, 1e4]]]], requires_grad=True)
    zeros = torch.zeros(1, 2, 1, 5)
    targets = {"heatmap": heat_t, "wh": zeros, "offset": zeros, "reg_weight": torch.zeros(1, 1, 1, 5)}
    out = centernet_loss({"heatmap": logits, "wh": zeros, "offset": zeros}, targets)
    # Wrong positive: 1e4 * 1; wrong negative: 1e4 * 1 * 1; half-target: 1e4 * 0.5^4; avg_factor 2.
    assert out["loss_heatmap"].item() == pytest.approx((1e4 + 1e4 + 1e4 / 16) / 2, rel=1e-6)
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()


def test_matches_autograd_of_python_formula_and_func_grad() -> None:
    pred, targets = _tiny_case()

    def total(logits: torch.Tensor) -> torch.Tensor:
        return centernet_loss({**pred, "heatmap": logits}, targets)["loss"]

    grad = torch.func.grad(total)(pred["heatmap"])
    # Central finite differences in float64 on the hand formula.
    flat_logits = pred["heatmap"].flatten().tolist()
    heat = targets["heatmap"].flatten().tolist()
    h = 1e-5
    for i in range(len(flat_logits)):
        up, down = list(flat_logits), list(flat_logits)
        up[i] += h
        down[i] -= h
        fd = (_focal_py(up, heat, 2.0, 4.0) - _focal_py(down, heat, 2.0, 4.0)) / (2 * h) / 2.0
        assert grad.flatten()[i].item() == pytest.approx(fd, abs=1e-5)


def test_low_precision_inputs_computed_in_float32() -> None:
    pred, targets = _tiny_case()
    ref = centernet_loss(pred, targets)
    half = centernet_loss({k: v.to(torch.bfloat16) for k, v in pred.items()}, targets)
    assert half["loss"].dtype == torch.float32
    assert half["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)


def test_shape_mismatch_raises() -> None:
    pred, targets = _tiny_case()
    with pytest.raises(ValueError, match="wh"):
        centernet_loss({**pred, "wh": pred["wh"][:, :1]}, targets)
