"""Eager in-place kernels of the built-in optimizers (SGD, Adam, AdamW), for the eager train steps.

`optim` holds the optimizers as pure transforms: every update allocates its result, which a compiled
step does not mind (the compiler plans the memory) but an eager step pays for in allocating passes over
the model. The kernels here compute the same numbers, bit for bit (`tests/test_optim.py` holds them to
it), writing into memory the caller gives up:

* the gradients, always: the train step computed them and reads them no more;
* with `donate=True`, also the optimizer state and the params (the eager-donating step mode, where the
  step checks finiteness before the update and never reads the old state again): moments, momentum
  buffers and params are then updated in place (measured on a cpu: the AdamW update of a 3.6M-parameter
  model 14 -> 7 ms).

A kernel is `kernel(grads, state, params, donate) -> (new_params, new_state)`, with the pure optimizer's
state keys; `optim.sgd/adam/adamw` attach theirs as `Transform.inplace`. Also here: the foreach helpers
for 0-dim tensor scalars that both forms share.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from centerpoint.optim.schedules import SCALAR_DTYPE, Schedule
from centerpoint.state import Tree, per_leading

DecayMask = Callable[[str, Tensor], bool]
# (grads, state, params, donate) -> (new params, new state); the grads are overwritten.
InplaceUpdate = Callable[[Tree, Tree, Tree, bool], tuple[Tree, Tree]]


def _probe_foreach_tensor_scalar() -> bool:
    # torch >= 2.1 has `_foreach_mul(list, Tensor)` (one fused kernel for a 0-dim tensor scalar); torch 2.0
    # only has the list-of-tensors overload, which we fall back to. Probed once at import, not per step.
    try:
        torch._foreach_mul([torch.ones(1)], torch.ones(()))
    except (TypeError, RuntimeError):
        return False
    return True


_HAS_FOREACH_TENSOR_SCALAR = _probe_foreach_tensor_scalar()


def scalar_operands(xs: list[Tensor], s: Tensor) -> Tensor | list[Tensor]:
    """Cast the 0-dim scalar ``s`` to the dtype/device of ``xs`` (per tensor when they are mixed). A 1-dim
    ``s`` (K,) is one scalar per replica of stacked trees (`centerpoint.replicas`: every x is (K, ...)):
    per tensor, viewed to broadcast over each replica's slice."""
    if s.dim() == 1:  # static (trace-time) check: the 0-dim path is unchanged
        return [per_leading(s.to(device=x.device, dtype=x.dtype), x) for x in xs]
    d0, dev0 = xs[0].dtype, xs[0].device
    uniform = all(x.dtype == d0 and x.device == dev0 for x in xs)
    if uniform and _HAS_FOREACH_TENSOR_SCALAR:
        return s.to(device=dev0, dtype=d0)
    casts: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for x in xs:
        if (x.device, x.dtype) not in casts:
            casts[(x.device, x.dtype)] = s.to(device=x.device, dtype=x.dtype)
    return [casts[(x.device, x.dtype)] for x in xs]


def mul_scalar_(xs: list[Tensor], s: Tensor) -> None:
    """``x *= s`` in place for a 0-dim tensor ``s`` (one foreach kernel, no host sync), or per replica for a
    (K,) ``s`` (`scalar_operands`)."""
    if xs:
        torch._foreach_mul_(xs, scalar_operands(xs, s))


def scale_tree_(tree: Tree, factor: Tensor) -> Tree:
    """Every leaf multiplied by the 0-dim tensor ``factor`` (or, in a stacked tree, each replica's slice by
    its entry of a (K,) ``factor``) in place; only for trees the caller owns, e.g. a train step's freshly
    computed gradients. Returns ``tree``."""
    mul_scalar_(list(tree.values()), factor)
    return tree


def _decay_(updates: Tree, params: Tree, weight_decay: float | Tensor, mask: DecayMask | None) -> None:
    """``u += wd * p`` in place for the decayed names (`optim.add_decayed_weights`); a (K,) tensor
    `weight_decay` is one per replica of stacked trees, added as ``u + p * wd`` (`optim.hyper`'s order)."""
    keys = [k for k in updates if mask is None or mask(k, params[k])]
    if not keys:
        return
    us, ps = [updates[k] for k in keys], [params[k] for k in keys]
    if isinstance(weight_decay, Tensor):
        torch._foreach_add_(us, torch._foreach_mul(ps, scalar_operands(ps, weight_decay)))
    elif weight_decay != 0.0:
        torch._foreach_add_(us, ps, alpha=weight_decay)


def _descend(updates: Tree, state: Tree, params: Tree, schedule: Schedule, donate: bool, own: bool
             ) -> tuple[Tree, Tree]:
    """``p - lr(count) * u`` (`optim.scale_by_learning_rate`, then `optim.apply_updates`): in ``updates`` if
    ``own`` (else into new tensors) and, with ``donate``, into the params; returns the new params and ``state``
    with ``lr.count`` advanced."""
    count = state["lr.count"]
    keys = list(updates)
    us = [updates[k] for k in keys]
    if own:
        mul_scalar_(us, -schedule(count))
    elif us:
        us = list(torch._foreach_mul(us, scalar_operands(us, -schedule(count))))
    if donate and all(updates[k].dtype == params[k].dtype for k in keys):
        ps = [params[k] for k in keys]
        torch._foreach_add_(ps, us)
    else:
        ps = [s if s.dtype == params[k].dtype else s.to(params[k].dtype)
              for k, s in zip(keys, torch._foreach_add([params[k] for k in keys], us), strict=True)]
    return {**params, **dict(zip(keys, ps, strict=True))}, {**state, "lr.count": count + 1}


def adam_(schedule: Schedule, b1: float, b2: float, eps: float, weight_decay: float | Tensor, mask: DecayMask | None,
          decoupled: bool) -> InplaceUpdate:
    """The kernel of `optim.adam` (``decoupled=False``: decay added to the gradient) or `optim.adamw`."""

    def update(grads: Tree, state: Tree, params: Tree, donate: bool) -> tuple[Tree, Tree]:
        if not decoupled:
            _decay_(grads, params, weight_decay, mask)
        keys = list(grads)
        g = [grads[k] for k in keys]
        mu, nu = [state["adam.mu." + k] for k in keys], [state["adam.nu." + k] for k in keys]
        if donate:
            torch._foreach_lerp_(mu, g, 1.0 - b1)
            torch._foreach_mul_(nu, b2)
        else:
            mu = list(torch._foreach_lerp(mu, g, 1.0 - b1))
            nu = list(torch._foreach_mul(nu, b2))
        torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)
        count = state["adam.count"] + 1
        t = count.to(SCALAR_DTYPE)
        bc1, bc2 = 1.0 - torch.pow(b1, t), 1.0 - torch.pow(b2, t)
        # mu / bc1 / (sqrt(nu) / sqrt(bc2) + eps), in optim.scale_by_adam's order of operations.
        denom = list(torch._foreach_sqrt(nu))
        mul_scalar_(denom, torch.rsqrt(bc2))
        torch._foreach_add_(denom, eps)
        out = list(torch._foreach_div(mu, denom))
        mul_scalar_(out, 1.0 / bc1)
        direction = dict(zip(keys, out, strict=True))
        if decoupled:
            _decay_(direction, params, weight_decay, mask)
        new_state = {**state, **{"adam.mu." + k: v for k, v in zip(keys, mu, strict=True)},
                     **{"adam.nu." + k: v for k, v in zip(keys, nu, strict=True)}, "adam.count": count}
        return _descend(direction, new_state, params, schedule, donate, own=True)

    return update


def sgd_(schedule: Schedule, momentum: float, nesterov: bool, weight_decay: float | Tensor,
         mask: DecayMask | None) -> InplaceUpdate:
    """The kernel of `optim.sgd`."""

    def update(grads: Tree, state: Tree, params: Tree, donate: bool) -> tuple[Tree, Tree]:
        _decay_(grads, params, weight_decay, mask)
        if not (momentum > 0 or nesterov):
            return _descend(grads, state, params, schedule, donate, own=True)
        keys = list(grads)
        g, old = [grads[k] for k in keys], [state["sgd.momentum." + k] for k in keys]
        if nesterov:
            # buf = momentum * buf + g, then the look-ahead g + momentum * buf into the gradients' memory.
            if donate:
                torch._foreach_mul_(old, momentum)
                bufs = old
            else:
                bufs = list(torch._foreach_mul(old, momentum))
            torch._foreach_add_(bufs, g)
            torch._foreach_add_(g, bufs, alpha=momentum)
        else:
            # buf = g + momentum * buf, built in the gradients' memory; the update is the buffer itself.
            torch._foreach_add_(g, old, alpha=momentum)
            if donate:  # into the old buffers' memory; the gradients' copy is then free to become the update
                torch._foreach_copy_(old, g)
                bufs = old
            else:
                bufs = g
        new_state = {**state, **{"sgd.momentum." + k: b for k, b in zip(keys, bufs, strict=True)}}
        # Without donation the update is the buffer itself, which lives on in the state: not to be overwritten.
        return _descend(grads, new_state, params, schedule, donate, own=nesterov or donate)

    return update
