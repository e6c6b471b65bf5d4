"""Exponential moving average (EMA) of the weights, `train.ema_decay`: mmdetection's `ExpMomentumEMA` (YOLOX's).

The EMA tree holds one tensor per parameter and per floating-point BatchNorm buffer (running mean and
variance), under the same names; it lives in `TrainState.ema` and is updated inside the train step after
each applied optimizer update. Update number k (k = 1, 2, ...: the state's `step` after the update) is

    ema <- (1 - w_k) * ema + w_k * x,    w_k = (1 - m) * exp(-k / gamma) + m   (k >= 2),   w_1 = 1

with m = 1 - train.ema_decay (mmdetection's `momentum`: the weight of the new value, not of the average)
and gamma = train.ema_warmup. w_1 = 1 is mmengine's first update, which copies the weights; early updates
follow the weights closely and the average slows to m as k grows past gamma. Buffers are averaged as
well, as mmdetection's YOLOX configs ask (`update_buffers=True`); integer buffers (BatchNorm's
num_batches_tracked) are not, and evaluation takes them from the trained state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from centerpoint.state import Tree, per_leading

EmaUpdate = Callable[[Tree, Tree, Tensor], Tree]


def init_ema(params: Tree, buffers: Tree) -> Tree:
    """The EMA at step 0: copies (never aliases: the in-place update must not write into the weights) of the
    params and of the floating-point buffers."""
    return {k: v.detach().clone() for k, v in {**params, **buffers}.items() if v.is_floating_point()}


def ema_momentum(count: Tensor, decay: float, warmup: float, dtype: torch.dtype) -> Tensor:
    """w_k of the module doc, a 0-dim tensor of `dtype` on count's device: the weight of the new weights in
    update number `count` (0-dim int64, >= 1). Computed on the device: no host sync inside the step."""
    m = 1.0 - decay
    w = m + (1.0 - m) * torch.exp(-count.to(dtype) / warmup)
    return torch.where(count <= 1, torch.ones((), dtype=dtype, device=count.device), w)


def make_ema_update(decay: float | None, warmup: float, in_place: bool) -> EmaUpdate | None:
    """`update(ema, weights, count) -> ema`: one EMA update towards `weights` (params and buffers in one
    dict, by name), `count` the update number (0-dim int64; or (K,) for K replicas stacked on the leading
    axis, `centerpoint.replicas`: one update number each). None when `decay` is None (EMA off).

    `in_place`: write into `ema`'s tensors and return them (the eager-donating step, whose caller never
    reads the old state again); else new tensors, `ema` untouched. Both use `torch.lerp` with a tensor
    weight, so the two give the same bits.
    """
    if decay is None:
        return None

    def update(ema: Tree, weights: Tree, count: Tensor) -> Tree:
        if not ema:
            return ema
        w = ema_momentum(count, decay, warmup, next(iter(ema.values())).dtype)
        if in_place:
            for k, v in ema.items():
                v.lerp_(weights[k], per_leading(w, v))
            return ema
        return {k: torch.lerp(v, weights[k], per_leading(w, v)) for k, v in ema.items()}

    return update


def with_ema(params: Tree, buffers: Tree, ema: Tree) -> tuple[Tree, Tree]:
    """(params, buffers) with the EMA's tensors in place of the trained ones where it has them: the weights
    evaluation and prediction use. An empty `ema` (EMA off) gives the inputs back unchanged."""
    if not ema:
        return params, buffers
    return ({k: ema.get(k, v) for k, v in params.items()}, {k: ema.get(k, v) for k, v in buffers.items()})
