"""Memory layout of 4-dim tensors (images, conv weights, their gradients and optimizer moments).

Channels-last is torch's (N, C, H, W) tensor with strides (H*W*C, 1, W*C, C). For a tensor with
H = W = 1 (a 1x1 conv weight) both layouts count as contiguous, and `.contiguous(memory_format=
torch.channels_last)` keeps whichever strides it has; but a channels-last train step computes that
weight's gradient, and so the updated weight and its moments, with the canonical channels-last
strides. A compiled step guards on strides, so it would compile a second time after its first call
(measured: twice the compile time); state that goes into a step is therefore made canonical here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def channels_last_strides(shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int, int]:
    """The canonical channels-last strides of an (N, C, H, W) shape, elements."""
    _, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def is_channels_last(t: Tensor) -> bool:
    """Whether `t` is 4-dim with exactly the canonical channels-last strides."""
    return t.dim() == 4 and t.stride() == channels_last_strides(t.shape)


def channels_last(t: Tensor) -> Tensor:
    """`t` with canonical channels-last strides (a copy unless it has them). A 5-dim tensor is K stacked
    4-dim ones (a replicated run's conv weights, `centerpoint.replicas`): each gets them, so that the
    stacked weights, their gradients (which a channels-last convolution returns so) and their moments share
    one memory order. Other ranks unchanged."""
    if t.dim() == 5:
        strides = (t[0].numel(), *channels_last_strides(t.shape[1:]))
        return t if t.stride() == strides else torch.empty_strided(t.shape, strides, dtype=t.dtype,
                                                                   device=t.device).copy_(t)
    if t.dim() != 4 or is_channels_last(t):
        return t
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
