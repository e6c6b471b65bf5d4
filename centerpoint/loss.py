"""CenterNet training loss: gaussian focal loss on the heatmap plus L1 on size and offset.

Matches mmdetection's CenterNetHead.loss_by_feat (GaussianFocalLoss, L1Loss with ``avg_factor * 2``),
but takes heatmap LOGITS and uses softplus forms, so it is finite and exact for any finite logit, where
mmdetection's ``log(p + 1e-12)`` on a float32 sigmoid saturates at confidently wrong cells (logits above
about 9 on negatives or below about -20 on positives; README, "Where this project differs"). There are no
host syncs and no Python branches on tensor values, so it works under ``torch.compile`` and
``torch.func.grad``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _gaussian_focal_sum(logits: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Summed (not averaged) gaussian focal loss; ``logits`` and ``target`` are ``(B, C, H, W)``.

    pos (target == 1): ``-log(p) * (1 - p)^alpha``; everywhere: ``-log(1 - p) * p^alpha *
    (1 - target)^gamma`` (zero at positives because ``(1 - 1)^gamma == 0``).
    """
    p = torch.sigmoid(logits)
    one_minus_p = torch.sigmoid(-logits)  # exact even where p rounds to 1
    pos = (target == 1).to(logits.dtype)
    # -log(sigmoid(x)) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x): never log(0).
    pos_loss = F.softplus(-logits) * one_minus_p.pow(alpha) * pos
    neg_loss = F.softplus(logits) * p.pow(alpha) * (1 - target).pow(gamma)
    return (pos_loss + neg_loss).sum()


def _weighted_l1_sum(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``sum(|pred - target| * weight)`` in float32 (float64 for float64 predictions); ``(B, 2, H, W)`` maps,
    ``weight`` ``(B, 1, H, W)``."""
    pred = _at_least_float32(pred)
    return ((pred - target.to(pred.dtype)).abs() * weight.to(pred.dtype)).sum()


def _at_least_float32(x: Tensor) -> Tensor:
    """float32, or float64 kept (float64 runs check equivalences to 1e-10, which float32 terms would hide)."""
    return x if x.dtype == torch.float64 else x.float()


def centernet_loss(pred: dict[str, Tensor], targets: dict[str, Tensor], heatmap_weight: float = 1.0,
                   wh_weight: float = 0.1, offset_weight: float = 1.0, alpha: float = 2.0,
                   gamma: float = 4.0) -> dict[str, Tensor]:
    """CenterNet loss for one batch.

    Args:
        pred: ``heatmap`` logits ``(B, C, H, W)`` (before sigmoid), ``wh`` ``(B, 2, H, W)`` and
            ``offset`` ``(B, 2, H, W)`` in feature-map cells.
        targets: output of :func:`centerpoint.data.targets.make_targets` with the same shapes plus
            ``reg_weight`` ``(B, 1, H, W)``.
        heatmap_weight, wh_weight, offset_weight: term weights (mmdet defaults 1, 0.1, 1).
        alpha, gamma: focal exponents on the prediction and on ``1 - target``.

    Returns:
        ``loss`` (weighted total), ``loss_heatmap``, ``loss_wh``, ``loss_offset``: 0-dim float32.
        Every term is normalised by ``avg_factor = max(1, #cells where heatmap target == 1)``; the L1
        terms by ``2 * avg_factor`` since they have two channels (plus float32 eps, as mmdetection).
    """
    for key in ("heatmap", "wh", "offset"):
        if pred[key].shape != targets[key].shape:
            # Broadcasting would silently compute a wrong loss, so fail loudly on shapes (static).
            raise ValueError(f"centernet_loss: pred[{key!r}] {tuple(pred[key].shape)} != "
                             f"targets[{key!r}] {tuple(targets[key].shape)}")
    # float32 throughout: bf16/fp16 logits would lose the focal terms' small values (float64 stays float64).
    logits = _at_least_float32(pred["heatmap"])
    heat_t = targets["heatmap"].to(logits.dtype)
    reg_w = targets["reg_weight"].to(logits.dtype)

    # Tensor-valued clamp instead of max(1, int(...)) keeps this sync-free.
    avg_factor = (heat_t == 1).sum().to(logits.dtype).clamp(min=1.0)
    # mmdetection divides by avg_factor + float32 eps (weight_reduce_loss), in float32 as here: it only
    # shows (one ulp) when avg_factor is 1.
    eps = torch.finfo(torch.float32).eps

    loss_heatmap = _gaussian_focal_sum(logits, heat_t, alpha, gamma) / (avg_factor + eps) * heatmap_weight
    # Two channels per centre, hence 2 * avg_factor (mmdet's L1Loss avg_factor).
    reg_norm = 2 * avg_factor + eps
    loss_wh = _weighted_l1_sum(pred["wh"], targets["wh"], reg_w) / reg_norm * wh_weight
    loss_offset = _weighted_l1_sum(pred["offset"], targets["offset"], reg_w) / reg_norm * offset_weight
    return {
        "loss": loss_heatmap + loss_wh + loss_offset,
        "loss_heatmap": loss_heatmap,
        "loss_wh": loss_wh,
        "loss_offset": loss_offset,
    }
