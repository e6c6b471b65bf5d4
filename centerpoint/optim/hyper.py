"""Optimizers whose hyperparameters are state tensors: the peak learning rate and the weight decay.

A replicated run (`centerpoint.replicas`) trains K models in one step over stacked trees; giving each
replica its own lr or weight decay (`train.sweep`) then needs them as data, not as numbers closed over
when the transform was built. These transforms keep them in the optimizer state, (K,) float64 tensors
once stacked (their `update` takes the stacked trees of all replicas), under `PEAK_LR_KEY` and
`WEIGHT_DECAY_KEY`; otherwise they compute what `transforms.sgd`, `adam` and `adamw` compute, in the same
order (replica i matches a single run with its values: `tests/test_replicas.py`). The lr schedule is
built from the peak lr tensor at every update (`make_schedule(peak)`): the schedules are tensor formulas,
so a (K,) peak gives K schedules at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from centerpoint.optim.inplace import DecayMask, InplaceUpdate, adam_, sgd_
from centerpoint.optim.schedules import SCALAR_DTYPE, Schedule
from centerpoint.optim.transforms import Transform, _mul_scalar, _new_count, _with, named_chain, scale_by_adam, trace
from centerpoint.state import Tree

PEAK_LR_KEY = "lr.peak"  # keys in the optimizer state of `hyper_optimizer`
WEIGHT_DECAY_KEY = "decay.weight_decay"
HYPER_KEYS = (PEAK_LR_KEY, WEIGHT_DECAY_KEY)

MakeSchedule = Callable[[Tensor], Schedule]  # peak lr (0-dim or (K,) float64) -> its schedule


def _scalar(value: float, params: Tree) -> Tensor:
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return torch.tensor(float(value), dtype=SCALAR_DTYPE, device=device)


def scale_by_peak_schedule(make_schedule: MakeSchedule, peak: float) -> Transform:
    """Multiply updates by ``-make_schedule(state["peak"])(count)``. State: ``count``, ``peak`` (starts at
    `peak`; a replicated run sets each replica's)."""

    def init(params: Tree) -> Tree:
        return {**_new_count(params), "peak": _scalar(peak, params)}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        count = state["count"]
        keys = list(grads)
        scaled = _mul_scalar([grads[k] for k in keys], -make_schedule(state["peak"])(count))
        return dict(zip(keys, scaled, strict=True)), {**state, "count": count + 1}

    return Transform(init, update)


def add_decayed_weights_from_state(weight_decay: float, mask: DecayMask | None) -> Transform:
    """Add ``state["weight_decay"] * param`` to the update of every masked name (`transforms.
    add_decayed_weights` with the decay as data). State: ``weight_decay`` (starts at `weight_decay`).
    `update` takes stacked (K, ...) trees: the mask is asked about one replica's tensor, whose shape is
    the model's (a stacked bias is 2-dim, but still a bias)."""

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        keys = [k for k in grads if mask is None or mask(k, params[k][0])]
        if not keys:
            return dict(grads), dict(state)
        decay = _mul_scalar([params[k] for k in keys], state["weight_decay"])
        return _with(grads, keys, list(torch._foreach_add([grads[k] for k in keys], decay))), dict(state)

    return Transform(lambda params: {"weight_decay": _scalar(weight_decay, params)}, update)


def hyper_optimizer(name: str, make_schedule: MakeSchedule, peak_lr: float, weight_decay: float,
                    mask: DecayMask | None, *, momentum: float = 0.9, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Transform:
    """sgd, adam or adamw as `transforms` builds them (clipping left to the step), with the peak lr and the
    weight decay in the state; `inplace` is `inplace.sgd_` / `adam_` on the stacked trees (`_inplace`)."""
    decay = add_decayed_weights_from_state(weight_decay, mask)
    lr = scale_by_peak_schedule(make_schedule, peak_lr)
    kernel = _inplace(name, make_schedule, mask, momentum, nesterov, betas, eps)
    if name == "sgd":
        moving = {"sgd": trace(momentum, nesterov)} if momentum > 0 or nesterov else {}
        return named_chain(decay=decay, **moving, lr=lr)._replace(inplace=kernel)
    if name == "adam":
        return named_chain(decay=decay, adam=scale_by_adam(*betas, eps), lr=lr)._replace(inplace=kernel)
    return named_chain(adam=scale_by_adam(*betas, eps), decay=decay, lr=lr)._replace(inplace=kernel)


def _inplace(name: str, make_schedule: MakeSchedule, mask: DecayMask | None, momentum: float, nesterov: bool,
             betas: tuple[float, float], eps: float) -> InplaceUpdate:
    """The eager in-place kernel of `hyper_optimizer` for stacked (K, ...) trees: `inplace.sgd_` / `adam_`
    built at each update from the state's peak lrs and weight decays (K,), which they apply per replica
    (`inplace.scalar_operands`). The same numbers as the pure update (tests/test_replicas.py)."""
    one = (lambda key, p: mask(key, p[0])) if mask is not None else None  # the mask asks about one replica

    def update(grads: Tree, state: Tree, params: Tree, donate: bool) -> tuple[Tree, Tree]:
        schedule, wd = make_schedule(state[PEAK_LR_KEY]), state[WEIGHT_DECAY_KEY]
        if name == "sgd":
            kernel = sgd_(schedule, momentum, nesterov, wd, one)
        else:
            kernel = adam_(schedule, betas[0], betas[1], eps, wd, one, decoupled=name == "adamw")
        return kernel(grads, state, params, donate)

    return update
