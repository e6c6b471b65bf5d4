"""Functional (optax-style) optimizers over flat ``dict[str, Tensor]`` trees.

Params, grads and updates are flat dicts keyed by dotted parameter names ("backbone.conv1.weight").
An optimizer is a :class:`Transform`: ``init(params) -> state`` and a pure
``update(grads, state, params) -> (updates, new_state)``; ``apply_updates(params, updates)`` adds the
updates (which already carry the ``-lr`` sign). State is itself a flat ``dict[str, Tensor]`` of
contiguous tensors, so it saves to safetensors as-is.

State key layout (``chain`` prefixes each element's keys with its position, "0.", "1.", ...):

* ``trace.<name>``              momentum buffer (:func:`trace`)
* ``adam.mu.<name>``, ``adam.nu.<name>``  first/second moments (:func:`scale_by_adam`)
* ``count``                     0-dim int64: number of updates applied so far, 0 before the first one
  (:func:`scale_by_adam`, :func:`scale_by_schedule`). All counts in one chain advance together;
  :func:`step_count` finds one, so the train step can log ``schedule(step_count(state))``.

Design rules, because ``update`` runs inside ``torch.compile``:

* Never mutate inputs; in-place ``_foreach_*_`` ops touch only tensors this module just allocated.
  Returned tensors may alias each other (e.g. a momentum buffer is both the update and the new
  state), so callers must treat everything returned as immutable too.
* Whole-tree ``torch._foreach_*`` kernels in the grads' key order, not per-tensor Python loops: on a
  ~100-tensor model the per-tensor loop is dominated by op dispatch overhead.
* No host syncs: the step count, learning rates, bias corrections and clip coefficients are 0-dim
  tensors, and there is no Python branching on tensor values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from centerpoint.schedules import SCALAR_DTYPE, Schedule, as_schedule

Tree = dict[str, Tensor]
DecayMask = Callable[[str, Tensor], bool]


class Transform(NamedTuple):
    """A pure gradient transformation: ``init(params) -> state``, ``update(grads, state, params)``."""

    init: Callable[[Tree], Tree]
    update: Callable[[Tree, Tree, Tree], tuple[Tree, Tree]]


def _probe_foreach_tensor_scalar() -> bool:
    # torch >= 2.1 has `_foreach_mul(list, Tensor)` (one fused kernel for a 0-dim tensor scalar); torch 2.0
    # only has the list-of-tensors overload, which we fall back to. Probed once at import, not per step.
    try:
        torch._foreach_mul([torch.ones(1)], torch.ones(()))
    except (TypeError, RuntimeError):
        return False
    return True


_HAS_FOREACH_TENSOR_SCALAR = _probe_foreach_tensor_scalar()


def _scalar_operands(xs: list[Tensor], s: Tensor) -> Tensor | list[Tensor]:
    """Cast the 0-dim scalar ``s`` to the dtype/device of ``xs`` (per tensor when they are mixed)."""
    d0, dev0 = xs[0].dtype, xs[0].device
    uniform = all(x.dtype == d0 and x.device == dev0 for x in xs)
    if uniform and _HAS_FOREACH_TENSOR_SCALAR:
        return s.to(device=dev0, dtype=d0)
    casts: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for x in xs:
        if (x.device, x.dtype) not in casts:
            casts[(x.device, x.dtype)] = s.to(device=x.device, dtype=x.dtype)
    return [casts[(x.device, x.dtype)] for x in xs]


def _mul_scalar(xs: list[Tensor], s: Tensor) -> list[Tensor]:
    """Out-of-place ``[x * s for x in xs]`` for a 0-dim tensor ``s`` (no host sync)."""
    if not xs:
        return []
    return list(torch._foreach_mul(xs, _scalar_operands(xs, s)))


def _mul_scalar_(xs: list[Tensor], s: Tensor) -> None:
    """In-place ``x *= s``; only ever called on tensors this module allocated."""
    if xs:
        torch._foreach_mul_(xs, _scalar_operands(xs, s))


def _new_count(params: Tree) -> Tree:
    """A fresh ``{"count": 0}`` on the params' device, so schedules never move data across devices."""
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return {"count": torch.zeros((), dtype=torch.int64, device=device)}


def _zeros(params: Tree, prefix: str) -> Tree:
    # torch.zeros (not zeros_like) so buffers are contiguous even for non-contiguous params: safetensors
    # refuses non-contiguous tensors, and foreach kernels take their fast path on dense ones.
    return {prefix + k: torch.zeros(p.shape, dtype=p.dtype, device=p.device) for k, p in params.items()}


def _replace(tree: Tree, keys: list[str], values: list[Tensor], prefix: str = "") -> Tree:
    """A copy of ``tree`` with ``prefix + keys[i]`` set to ``values[i]``; other entries pass through."""
    out = dict(tree)
    out.update(zip([prefix + k for k in keys], values, strict=True))
    return out


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """Return ``params + updates`` as a new dict (params without an update pass through unchanged).

    Each result keeps its parameter's dtype, so e.g. fp32 updates can be applied to bf16 params.
    """
    keys = list(updates)
    if not keys:
        return dict(params)
    summed = torch._foreach_add([params[k] for k in keys], [updates[k] for k in keys])
    dtypes = [params[k].dtype for k in keys]
    cast = [s if s.dtype == d else s.to(d) for s, d in zip(summed, dtypes, strict=True)]
    return _replace(params, keys, cast)


def step_count(state: Tree) -> Tensor:
    """The 0-dim int64 number of updates applied so far, found under a ``count`` / ``<i>.count`` key.

    Use ``schedule(step_count(state))`` to log the learning rate the *next* update will use.
    """
    for key, value in state.items():
        # "count", "3.count", "0.2.count": chain position prefixes followed by "count". Plain string
        # ops rather than a regex so this also traces cleanly inside torch.compile.
        *prefixes, last = key.split(".")
        if last == "count" and all(p.isdigit() for p in prefixes):
            return value
    raise KeyError("optimizer state has no 'count' entry; include scale_by_schedule or scale_by_adam")


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; element ``i``'s state keys are prefixed with ``"<i>."``."""

    def init(params: Tree) -> Tree:
        state: Tree = {}
        for i, t in enumerate(transforms):
            state.update({f"{i}.{k}": v for k, v in t.init(params).items()})
        return state

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        new_state: Tree = {}
        for i, t in enumerate(transforms):
            prefix = f"{i}."
            # Key-string slicing is trace-time work under torch.compile; it costs nothing per step there.
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            grads, sub = t.update(grads, sub, params)
            new_state.update({prefix + k: v for k, v in sub.items()})
        return grads, new_state

    return Transform(init, update)


def identity() -> Transform:
    """Pass updates through unchanged (a stateless placeholder that keeps chain positions stable)."""

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        return dict(grads), dict(state)

    return Transform(lambda params: {}, update)


def global_norm(tree: Tree) -> Tensor:
    """L2 norm of all tensors of ``tree`` viewed as one vector (0-dim tensor; 0 for an empty tree)."""
    xs = list(tree.values())
    if not xs:
        return torch.zeros(())
    norms = torch._foreach_norm(xs) if hasattr(torch, "_foreach_norm") else [x.norm() for x in xs]
    # Same reduction order as torch.nn.utils.clip_grad_norm_: per-tensor norms, then the norm of those.
    return torch.linalg.vector_norm(torch.stack([n.to(xs[0].device) for n in norms]))


def clip_by_global_norm(max_norm: float) -> Transform:
    """Scale all updates by ``min(max_norm / (global_norm + 1e-6), 1)`` (torch ``clip_grad_norm_``)."""
    if max_norm <= 0:
        raise ValueError(f"clip_by_global_norm max_norm must be > 0, got {max_norm}")

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        keys = list(grads)
        if not keys:
            return {}, dict(state)
        # Always multiply (by exactly 1.0 when under the limit) instead of `if total > max_norm`,
        # which would force a device -> host sync every step.
        coef = torch.clamp(max_norm / (global_norm(grads) + 1e-6), max=1.0)
        return dict(zip(keys, _mul_scalar([grads[k] for k in keys], coef), strict=True)), dict(state)

    return Transform(lambda params: {}, update)


def default_decay_mask(name: str, tensor: Tensor) -> bool:
    """Decay only matrices/kernels (``ndim > 1``): no weight decay on biases and norm scales/shifts."""
    return tensor.ndim > 1


def add_decayed_weights(weight_decay: float, mask: DecayMask | None = None) -> Transform:
    """Add ``weight_decay * param`` to the update of every name with ``mask(name, param)`` true.

    ``mask=None`` decays every parameter. The mask only looks at names and shapes, so it is evaluated
    at trace time and never depends on tensor values.
    """

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        keys = [k for k in grads if mask is None or mask(k, params[k])]
        if weight_decay == 0.0 or not keys:
            return dict(grads), dict(state)
        decayed = torch._foreach_add([grads[k] for k in keys], [params[k] for k in keys], alpha=weight_decay)
        return _replace(grads, keys, list(decayed)), dict(state)

    return Transform(lambda params: {}, update)


def trace(momentum: float, nesterov: bool = False) -> Transform:
    """Momentum with torch SGD semantics: ``buf = momentum * buf + g`` (dampening 0).

    The buffer starts at zero, which equals torch's "first step buf = g". The update is ``buf``, or
    ``g + momentum * buf`` with ``nesterov``. State: ``trace.<name>``.
    """
    if momentum < 0:
        raise ValueError(f"trace momentum must be >= 0, got {momentum}")
    if nesterov and momentum == 0:
        raise ValueError("trace: nesterov momentum requires momentum > 0")

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        keys = list(grads)
        if not keys:
            return {}, dict(state)
        g = [grads[k] for k in keys]
        bufs = list(torch._foreach_mul([state["trace." + k] for k in keys], momentum))
        torch._foreach_add_(bufs, g)
        updates = list(torch._foreach_add(g, bufs, alpha=momentum)) if nesterov else bufs
        return dict(zip(keys, updates, strict=True)), _replace(state, keys, bufs, "trace.")

    return Transform(lambda params: _zeros(params, "trace."), update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam direction with torch ``Adam`` semantics: ``m_hat / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    ``m_hat = m / (1 - b1^t)`` with ``t`` the 1-based step; eps is added *after* the bias-corrected
    square root, exactly as torch does (optax adds it differently). Multiply by ``-lr`` afterwards.
    State: ``adam.mu.<name>``, ``adam.nu.<name>``, ``count``.
    """
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"scale_by_adam betas must be in [0, 1), got b1={b1}, b2={b2}")

    def init(params: Tree) -> Tree:
        return {**_zeros(params, "adam.mu."), **_zeros(params, "adam.nu."), **_new_count(params)}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        count = state["count"] + 1
        keys = list(grads)
        if not keys:
            return {}, {**state, "count": count}
        g = [grads[k] for k in keys]
        mu = list(torch._foreach_mul([state["adam.mu." + k] for k in keys], b1))
        torch._foreach_add_(mu, g, alpha=1.0 - b1)
        nu = list(torch._foreach_mul([state["adam.nu." + k] for k in keys], b2))
        torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)
        # Bias corrections as float64 tensors of the step tensor: no Python int step, no recompiles.
        t = count.to(SCALAR_DTYPE)
        bc1 = 1.0 - torch.pow(b1, t)
        bc2 = 1.0 - torch.pow(b2, t)
        denom = list(torch._foreach_sqrt(nu))
        _mul_scalar_(denom, torch.rsqrt(bc2))
        torch._foreach_add_(denom, eps)
        updates = list(torch._foreach_div(mu, denom))
        _mul_scalar_(updates, 1.0 / bc1)
        new_state = _replace(state, keys, mu, "adam.mu.")
        new_state = _replace(new_state, keys, nu, "adam.nu.")
        new_state["count"] = count
        return dict(zip(keys, updates, strict=True)), new_state

    return Transform(init, update)


def scale(factor: float) -> Transform:
    """Multiply every update by the constant ``factor``."""

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        keys = list(grads)
        return dict(zip(keys, torch._foreach_mul([grads[k] for k in keys], factor), strict=True)), dict(state)

    return Transform(lambda params: {}, update)


def scale_by_schedule(schedule: Schedule) -> Transform:
    """Multiply updates by ``schedule(count)``, ``count`` = updates applied before this one (from 0)."""

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        count = state["count"]
        keys = list(grads)
        scaled = _mul_scalar([grads[k] for k in keys], schedule(count))
        return dict(zip(keys, scaled, strict=True)), {**state, "count": count + 1}

    return Transform(_new_count, update)


def scale_by_learning_rate(lr: float | Schedule) -> Transform:
    """Multiply updates by ``-lr(count)`` (descent direction); ``lr`` is a number or a schedule."""
    schedule = as_schedule(lr)
    return scale_by_schedule(lambda step: -schedule(step))


def _clip_slot(max_grad_norm: float | None) -> Transform:
    # Always occupy position 0 (identity when off) so the state keys of the stateful transforms behind
    # it, and hence checkpoints, do not depend on whether clipping is enabled.
    return identity() if max_grad_norm is None else clip_by_global_norm(max_grad_norm)


def sgd(
    lr: float | Schedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_mask: DecayMask | None = default_decay_mask,
    max_grad_norm: float | None = None,
) -> Transform:
    """torch ``SGD`` (dampening 0) with coupled weight decay: ``g + wd * p`` goes into the momentum.

    Order: clip (optional) -> weight decay -> momentum -> ``-lr``. State: ``2.trace.<name>``, ``3.count``.
    """
    # momentum == 0 is plain SGD (torch keeps no buffer then); skip the zero buffer entirely.
    momentum_slot = trace(momentum, nesterov) if momentum > 0 or nesterov else identity()
    return chain(
        _clip_slot(max_grad_norm),
        add_decayed_weights(weight_decay, decay_mask),
        momentum_slot,
        scale_by_learning_rate(lr),
    )


def adam(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: DecayMask | None = default_decay_mask,
    max_grad_norm: float | None = None,
) -> Transform:
    """torch ``Adam`` with coupled (L2) weight decay added to the gradient before the moments.

    State: ``2.adam.mu.<name>``, ``2.adam.nu.<name>``, ``2.count``, ``3.count``.
    """
    return chain(
        _clip_slot(max_grad_norm),
        add_decayed_weights(weight_decay, decay_mask),
        scale_by_adam(b1, b2, eps),
        scale_by_learning_rate(lr),
    )


def adamw(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    decay_mask: DecayMask | None = default_decay_mask,
    max_grad_norm: float | None = None,
) -> Transform:
    """torch ``AdamW``: decoupled decay ``p *= 1 - lr * wd`` followed by the Adam step.

    Equivalent update: ``-lr * (adam_direction + wd * p)``, so the decay follows the lr schedule.
    State: ``1.adam.mu.<name>``, ``1.adam.nu.<name>``, ``1.count``, ``3.count``.
    """
    return chain(
        _clip_slot(max_grad_norm),
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, decay_mask),
        scale_by_learning_rate(lr),
    )


__all__ = [
    "DecayMask",
    "Transform",
    "Tree",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "default_decay_mask",
    "global_norm",
    "identity",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "sgd",
    "step_count",
    "trace",
]
