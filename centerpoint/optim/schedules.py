"""Learning-rate schedules as pure tensor functions of the optimizer step count.

A :data:`Schedule` maps the number of updates already applied (a 0-dim integer tensor, 0 for the
first update) to the learning rate for the next update (a 0-dim float64 tensor on the same device).
Everything is expressed with tensor ops (``torch.where``/``clamp``/``pow``), never with Python branching
on the step's value, so a schedule runs inside ``torch.compile`` without graph breaks, host syncs or
per-step recompiles. All step arguments (milestones, totals, warm-up lengths) are in optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Schedule = Callable[[Tensor], Tensor]
"""Step count (0-dim int or float tensor, updates done so far) -> learning rate (0-dim float64 tensor)."""

# Schedules compute in float64 so step/total ratios and gamma powers stay exact to ~1e-16; the optimizer
# casts the final scalar to each parameter's dtype, so fp32 training never sees a float64 kernel on data.
SCALAR_DTYPE = torch.float64


def as_step(step: Tensor | int) -> Tensor:
    """Return ``step`` as a 0-dim float64 tensor (keeps the device of a tensor input).

    Accepting a plain int is a convenience for logging and tests; inside the compiled train step the
    count is always a tensor.
    """
    # isinstance is a static (trace-time) check, not a branch on the step's value.
    if isinstance(step, Tensor):
        return step.to(SCALAR_DTYPE)
    return torch.tensor(float(step), dtype=SCALAR_DTYPE)


def constant(lr: float) -> Schedule:
    """Constant learning rate ``lr`` at every step."""

    def schedule(step: Tensor) -> Tensor:
        # Multiply by zero rather than torch.full so the result inherits the step's device for free.
        return as_step(step) * 0.0 + lr

    return schedule


def multistep(lr: float, milestones: list[int], gamma: float = 0.1) -> Schedule:
    """Step decay: ``lr * gamma ** (number of milestones <= step)``, like torch ``MultiStepLR``.

    Milestones are optimizer steps; at ``step == milestone`` the decayed rate is already in effect.
    """
    if any(m < 0 for m in milestones):
        raise ValueError(f"multistep milestones must be >= 0 steps, got {milestones}")
    points = sorted(int(m) for m in milestones)

    def schedule(step: Tensor) -> Tensor:
        s = as_step(step)
        # A static Python loop over the (few) milestones: one comparison each, no data-dependent branch.
        passed = s * 0.0
        for m in points:
            passed = passed + (s >= m).to(SCALAR_DTYPE)
        return lr * torch.pow(gamma, passed)

    return schedule


def cosine(lr: float, total_steps: int, final_lr: float = 0.0) -> Schedule:
    """Cosine annealing from ``lr`` at step 0 to ``final_lr`` at ``total_steps`` (held there afterwards).

    ``lr_t = final_lr + (lr - final_lr) * (1 + cos(pi * min(t, total_steps) / total_steps)) / 2``, the
    closed form of torch ``CosineAnnealingLR`` with ``T_max=total_steps, eta_min=final_lr``.
    """
    if total_steps <= 0:
        raise ValueError(f"cosine total_steps must be > 0 steps, got {total_steps}")

    def schedule(step: Tensor) -> Tensor:
        progress = torch.clamp(as_step(step) / total_steps, min=0.0, max=1.0)
        return final_lr + (lr - final_lr) * 0.5 * (1.0 + torch.cos(math.pi * progress))

    return schedule


def linear_warmup(schedule: Schedule, warmup_steps: int, start_ratio: float = 0.001) -> Schedule:
    """Linear warm-up in front of ``schedule`` (mmcv ``warmup='linear'`` semantics).

    For ``step < warmup_steps``: ``schedule(step) * (1 - (1 - step / warmup_steps) * (1 - start_ratio))``,
    i.e. ``start_ratio * schedule(0)`` at step 0 rising linearly; from ``warmup_steps`` on, exactly
    ``schedule(step)``. ``warmup_steps == 0`` disables the warm-up.
    """
    if warmup_steps < 0:
        raise ValueError(f"linear_warmup warmup_steps must be >= 0 steps, got {warmup_steps}")
    if warmup_steps == 0:
        return schedule

    def warmed(step: Tensor) -> Tensor:
        # Clamping the fraction at 1 makes the factor exactly 1.0 after warm-up, so no torch.where needed.
        frac = torch.clamp(as_step(step) / warmup_steps, min=0.0, max=1.0)
        factor = 1.0 - (1.0 - frac) * (1.0 - start_ratio)
        return schedule(step) * factor

    return warmed


def as_schedule(lr: float | Schedule) -> Schedule:
    """Wrap a plain number as :func:`constant`; pass a schedule through unchanged."""
    if callable(lr):
        return lr
    return constant(float(lr))
