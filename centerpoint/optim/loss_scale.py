"""Dynamic loss scaling for fp16 training, as a pure update of a two-tensor state.

fp16 gradients underflow to zero when small; the loss is multiplied by `scale` before differentiation
and the gradients divided by it afterwards (in fp32). When the scaled gradients overflow (inf/nan while
the loss itself is finite) the update is skipped and the scale halved; after `growth_interval` applied
updates in a row it doubles. Same rule and defaults as torch.cuda.amp.GradScaler, but the state lives in
the train state (checkpointed, identical on every rank) and every decision is a tensor select: no host
sync, and the whole step stays one graph under torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from centerpoint.state import Tree


def init_loss_scale(scale: float, device: torch.device | str = "cpu") -> Tree:
    """State of a scaler starting at `scale`: {"scale": 0-dim float32, "good_steps": 0-dim int64}."""
    return {"scale": torch.tensor(float(scale), dtype=torch.float32, device=device),
            "good_steps": torch.zeros((), dtype=torch.int64, device=device)}


def update_loss_scale(scaler: Tree, applied: Tensor, overflow: Tensor, growth_interval: int,
                      growth: float = 2.0, backoff: float = 0.5) -> Tree:
    """The scaler after one step.

    applied: 0-dim bool, the optimizer update was taken; overflow: 0-dim bool, the loss was finite but the
    scaled gradients were not. A step that is neither (a non-finite loss: a diverging run, not a scale
    problem) leaves the scaler as it was.
    """
    scale, good = scaler["scale"], scaler["good_steps"]
    good = torch.where(applied, good + 1, torch.where(overflow, torch.zeros_like(good), good))
    grow = good >= growth_interval
    scale = torch.where(overflow, scale * backoff, torch.where(grow, scale * growth, scale))
    good = torch.where(grow, torch.zeros_like(good), good)
    return {"scale": scale, "good_steps": good}
