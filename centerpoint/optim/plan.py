"""A run's optimizer from its spec: the transform, its lr schedule (milestones from epochs to steps) and
the linearly scaled peak lr."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from centerpoint.optim import schedules
from centerpoint.optim import transforms as optim
from centerpoint.spec import ExperimentSpec


@dataclass(frozen=True)
class OptimizerPlan:
    """The optimizer of a run and the numbers it was derived from."""

    transform: optim.Transform
    schedule: schedules.Schedule
    lr: float  # peak lr after linear scaling
    total_steps: int
    max_grad_norm: float | None  # clipping is done by the step, which computes the norm anyway
    make_schedule: Callable[[Any], schedules.Schedule] | None = None  # peak lr -> schedule (`schedule_maker`)


def scaled_lr(spec: ExperimentSpec, global_batch: int) -> float:
    """optim.lr, scaled linearly by global_batch / optim.base_batch when base_batch is set."""
    o = spec.optim
    return o.lr if o.base_batch is None else o.lr * global_batch / o.base_batch


def build_optimizer(spec: ExperimentSpec, steps_per_epoch: int, global_batch: int,
                    replicated: bool | None = None) -> OptimizerPlan:
    """The optimizer transform with its schedule (milestones converted from epochs to steps). `replicated`
    (default: train.replicas > 1): the transform holds the peak lr and the weight decay as state tensors
    (`optim.hyper`), which the replicas then set one by one."""
    o = spec.optim
    lr = scaled_lr(spec, global_batch)
    total = spec.train.max_steps or spec.train.epochs * steps_per_epoch
    make = schedule_maker(spec, steps_per_epoch, total)
    sched = make(lr)
    mask = None if o.decay_norm_and_bias else optim.default_decay_mask
    if replicated or (replicated is None and spec.train.replicas > 1):
        from centerpoint.optim.hyper import hyper_optimizer

        tx = hyper_optimizer(o.name, make, lr, o.weight_decay, mask, momentum=o.momentum, nesterov=o.nesterov,
                             betas=o.betas, eps=o.eps)
    elif o.name == "sgd":
        tx = optim.sgd(sched, o.momentum, o.nesterov, o.weight_decay, mask, None)
    elif o.name == "adam":
        tx = optim.adam(sched, o.betas[0], o.betas[1], o.eps, o.weight_decay, mask, None)
    else:
        tx = optim.adamw(sched, o.betas[0], o.betas[1], o.eps, o.weight_decay, mask, None)
    return OptimizerPlan(tx, sched, lr, total, o.grad_clip, make)


def schedule_maker(spec: ExperimentSpec, steps_per_epoch: int, total: int) -> Callable[[Any], schedules.Schedule]:
    """peak lr -> the spec's schedule of it. The peak may be a float or a float64 tensor (0-dim, or (K,) for
    K replicas): the schedules are tensor formulas linear in it, and a tensor peak computes the same
    numbers as the same float."""
    s = spec.schedule

    def make(lr: Any) -> schedules.Schedule:
        if s.kind == "constant":
            sched = schedules.constant(lr)
        elif s.kind == "multistep":
            sched = schedules.multistep(lr, [m * steps_per_epoch for m in s.milestones], s.gamma)
        else:
            sched = schedules.cosine(lr, max(1, total), lr * s.final_ratio)
        if s.warmup_steps > 0:
            sched = schedules.linear_warmup(sched, s.warmup_steps, s.warmup_ratio)
        return sched

    return make
