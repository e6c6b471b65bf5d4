"""Functional (optax-style) optimizers over flat ``dict[str, Tensor]`` trees.

Params, grads and updates are flat dicts keyed by dotted parameter names ("backbone.conv1.weight").
An optimizer is a :class:`Transform`: ``init(params) -> state`` and a pure
``update(grads, state, params) -> (updates, new_state)``; ``apply_updates(params, updates)`` adds the
updates (which already carry the ``-lr`` sign). State is itself a flat ``dict[str, Tensor]`` of
contiguous tensors, so it saves to safetensors as-is. Transforms compose with :func:`chain` (state keys
prefixed by position) or :func:`named_chain` (prefixed by role), as the built-in optimizers do:

* ``sgd.momentum.<name>``                 momentum buffer (:func:`trace`)
* ``adam.mu.<name>``, ``adam.nu.<name>``  first/second moments (:func:`scale_by_adam`)
* ``adam.count``, ``lr.count``            0-dim int64: updates applied so far, 0 before the first
  (:func:`scale_by_adam`, :func:`scale_by_schedule`). All counts in one chain advance together.

Design rules, because ``update`` runs inside ``torch.compile``:

* Never mutate inputs. Returned tensors may alias each other (a momentum buffer can be both the update
  and the new state), so callers must treat everything returned as immutable too.
* Whole-tree ``torch._foreach_*`` kernels in the grads' key order, not per-tensor Python loops: on a
  ~100-tensor model the per-tensor loop is dominated by op dispatch overhead.
* No host syncs: the step count, learning rates, bias corrections and clip coefficients are 0-dim
  tensors, and there is no Python branching on tensor values.

Memory reuse is not the transforms' business: a compiled step leaves it to the compiler, and the eager
steps run the same updates as the in-place kernels of :mod:`centerpoint.optim.inplace`
(``Transform.inplace`` of :func:`sgd`, :func:`adam` and :func:`adamw`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from centerpoint.optim import inplace as optim_inplace
from centerpoint.optim.inplace import DecayMask, InplaceUpdate, scalar_operands
from centerpoint.optim.schedules import SCALAR_DTYPE, Schedule, as_schedule
from centerpoint.runtime.memory_format import is_channels_last
from centerpoint.state import Tree


class Transform(NamedTuple):
    """A pure gradient transformation: ``init(params) -> state``, ``update(grads, state, params)``.

    ``inplace``: the same update as an eager kernel that writes into the memory its caller gives up
    (:mod:`centerpoint.optim.inplace`), or None; the eager train steps use it when present."""

    init: Callable[[Tree], Tree]
    update: Callable[[Tree, Tree, Tree], tuple[Tree, Tree]]
    inplace: InplaceUpdate | None = None


def _no_state(params: Tree) -> Tree:
    return {}


def _mul_scalar(xs: list[Tensor], s: Tensor) -> list[Tensor]:
    """Out-of-place ``[x * s for x in xs]`` for a 0-dim tensor ``s`` (no host sync), or per replica for a
    (K,) ``s`` over stacked trees (`inplace.scalar_operands`); the transforms then update K optimizers at
    once."""
    return list(torch._foreach_mul(xs, scalar_operands(xs, s))) if xs else []


def _new_count(params: Tree) -> Tree:
    """A fresh ``{"count": 0}`` on the params' device, so schedules never move data across devices."""
    device = next(iter(params.values())).device if params else torch.device("cpu")
    return {"count": torch.zeros((), dtype=torch.int64, device=device)}


def _zeros(params: Tree, prefix: str) -> Tree:
    return {prefix + k: _zeros_like(p) for k, p in params.items()}


def global_norm(tree: Tree) -> Tensor:
    """L2 norm of all tensors of ``tree`` viewed as one vector (0-dim tensor; 0 for an empty tree)."""
    xs = list(tree.values())
    if not xs:
        return torch.zeros(())
    norms = torch._foreach_norm(xs) if hasattr(torch, "_foreach_norm") else [x.norm() for x in xs]
    # Same reduction order as torch.nn.utils.clip_grad_norm_: per-tensor norms, then the norm of those.
    return torch.linalg.vector_norm(torch.stack([n.to(xs[0].device) for n in norms]))


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """``min(max_norm / (norm + 1e-6), 1)``: the factor torch ``clip_grad_norm_`` scales gradients by."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def default_decay_mask(name: str, tensor: Tensor) -> bool:
    """Decay only matrices/kernels (``ndim > 1``): no weight decay on biases and norm scales/shifts."""
    return tensor.ndim > 1


def _zeros_like(p: Tensor) -> Tensor:
    """Zeros shaped like p: with p's canonical channels-last strides for a channels-last conv weight
    (elementwise ops over a param and its buffer in different layouts take a slow strided path, measured
    ~2.5x per op on cpu; see `layout` for why canonical), else contiguous, whatever p's strides
    (safetensors stores contiguous tensors, foreach kernels prefer them)."""
    if is_channels_last(p):
        return torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device).zero_()
    return torch.zeros(p.shape, dtype=p.dtype, device=p.device)


def _with(tree: Tree, keys: list[str], values: list[Tensor], prefix: str = "") -> Tree:
    """A copy of ``tree`` with ``prefix + keys[i]`` set to ``values[i]``; other entries pass through."""
    return {**tree, **dict(zip([prefix + k for k in keys], values, strict=True))}


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """Return ``params + updates`` as a new dict (params without an update pass through unchanged).

    Each result keeps its parameter's dtype, so e.g. fp32 updates can be applied to bf16 params.
    """
    keys = list(updates)
    if not keys:
        return dict(params)
    summed = torch._foreach_add([params[k] for k in keys], [updates[k] for k in keys])
    cast = [s if s.dtype == params[k].dtype else s.to(params[k].dtype) for k, s in zip(keys, summed, strict=True)]
    return _with(params, keys, cast)


def step_count(state: Tree) -> Tensor:
    """The 0-dim int64 number of updates applied so far: the first ``count`` entry of the state (``count``,
    ``lr.count``, ``adam.count``, ``0.count``, ...). Use ``schedule(step_count(state))`` for the learning
    rate the *next* update will use."""
    for key, value in state.items():
        # Dtype and shape tell a count from a parameter that happens to be named "count"; both are known
        # at trace time, so this also traces cleanly inside torch.compile.
        if key.rsplit(".", 1)[-1] == "count" and value.dim() == 0 and value.dtype == torch.int64:
            return value
    raise KeyError("optimizer state has no 'count' entry; include scale_by_schedule or scale_by_adam")


def named_chain(**transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; the state keys of the one passed as ``name=`` are prefixed ``name.``."""
    steps = [(name + ".", t) for name, t in transforms.items()]

    def init(params: Tree) -> Tree:
        return {prefix + k: v for prefix, t in steps for k, v in t.init(params).items()}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        new_state: Tree = {}
        for prefix, t in steps:
            # Key-string slicing is trace-time work under torch.compile; it costs nothing per step there.
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            grads, sub = t.update(grads, sub, params)
            new_state.update({prefix + k: v for k, v in sub.items()})
        return grads, new_state

    return Transform(init, update)


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; element ``i``'s state keys are prefixed with ``"<i>."``."""
    return named_chain(**{str(i): t for i, t in enumerate(transforms)})


def clip_by_global_norm(max_norm: float) -> Transform:
    """Scale all updates by ``min(max_norm / (global_norm + 1e-6), 1)`` (torch ``clip_grad_norm_``)."""
    if max_norm <= 0:
        raise ValueError(f"clip_by_global_norm max_norm must be > 0, got {max_norm}")

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        keys = list(grads)
        # Always multiply (by exactly 1.0 when under the limit) instead of `if total > max_norm`,
        # which would force a device -> host sync every step.
        coef = clip_coefficient(global_norm(grads), max_norm)
        return dict(zip(keys, _mul_scalar([grads[k] for k in keys], coef), strict=True)), dict(state)

    return Transform(_no_state, update)


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
        return _with(grads, keys, list(decayed)), dict(state)

    return Transform(_no_state, update)


def trace(momentum: float, nesterov: bool = False) -> Transform:
    """Momentum with torch SGD semantics: ``buf = momentum * buf + g`` (dampening 0).

    The buffer starts at zero, which equals torch's "first step buf = g". The update is ``buf``, or
    ``g + momentum * buf`` with ``nesterov``. State: ``momentum.<name>``.
    """
    if momentum < 0:
        raise ValueError(f"trace momentum must be >= 0, got {momentum}")
    if nesterov and momentum == 0:
        raise ValueError("trace: nesterov momentum requires momentum > 0")

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        keys = list(grads)
        if not keys:
            return {}, dict(state)
        g, old = [grads[k] for k in keys], [state["momentum." + k] for k in keys]
        if nesterov:
            bufs = list(torch._foreach_mul(old, momentum))
            torch._foreach_add_(bufs, g)  # bufs are this update's own new tensors
            out = list(torch._foreach_add(g, bufs, alpha=momentum))
        else:
            # g + momentum * buf in one rounding (the same arithmetic as the eager kernel's).
            bufs = out = list(torch._foreach_add(g, old, alpha=momentum))
        return dict(zip(keys, out, strict=True)), _with(state, keys, bufs, "momentum.")

    return Transform(lambda params: _zeros(params, "momentum."), update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam direction with torch ``Adam`` semantics: ``m_hat / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    ``m_hat = m / (1 - b1^t)`` with ``t`` the 1-based step; eps is added *after* the bias-corrected
    square root, exactly as torch does. Multiply by ``-lr`` afterwards.
    State: ``mu.<name>``, ``nu.<name>``, ``count``.
    """
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"scale_by_adam betas must be in [0, 1), got b1={b1}, b2={b2}")

    def init(params: Tree) -> Tree:
        return {**_zeros(params, "mu."), **_zeros(params, "nu."), **_new_count(params)}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        count = state["count"] + 1
        keys = list(grads)
        if not keys:
            return {}, {**state, "count": count}
        g = [grads[k] for k in keys]
        # lerp (m + (1 - b1) * (g - m)) is one pass and rounds exactly like torch's own Adam.
        mu = list(torch._foreach_lerp([state["mu." + k] for k in keys], g, 1.0 - b1))
        nu = list(torch._foreach_mul([state["nu." + k] for k in keys], b2))
        torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)  # nu: this update's own new tensors
        # Bias corrections as float64 tensors of the step tensor: no Python int step, no recompiles.
        t = count.to(SCALAR_DTYPE)
        bc1 = 1.0 - torch.pow(b1, t)
        bc2 = 1.0 - torch.pow(b2, t)
        # mu / bc1 / (sqrt(nu) / sqrt(bc2) + eps), torch's form, in five passes over the model. (Folding
        # sqrt(bc2) into eps would save a pass but needs a foreach add of a tensor scalar, which
        # torch.compile cannot trace.)
        denom = _mul_scalar(list(torch._foreach_sqrt(nu)), torch.rsqrt(bc2))
        denom = list(torch._foreach_add(denom, eps))
        out = _mul_scalar(list(torch._foreach_div(mu, denom)), 1.0 / bc1)
        new_state = _with(_with(state, keys, mu, "mu."), keys, nu, "nu.")
        new_state["count"] = count
        return dict(zip(keys, out, strict=True)), new_state

    return Transform(init, update)


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


def _clipped(max_grad_norm: float | None, **transforms: Transform) -> Transform:
    """``named_chain(**transforms)``, after global-norm clipping when ``max_grad_norm`` is set (stateless,
    so the state keys, and hence checkpoints, do not depend on it)."""
    if max_grad_norm is None:
        return named_chain(**transforms)
    return named_chain(clip=clip_by_global_norm(max_grad_norm), **transforms)


def sgd(
    lr: float | Schedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_mask: DecayMask | None = default_decay_mask,
    max_grad_norm: float | None = None,
) -> Transform:
    """torch ``SGD`` (dampening 0) with coupled weight decay: ``g + wd * p`` goes into the momentum.

    Order: clip (optional) -> weight decay -> momentum -> ``-lr``. ``decay_mask=None`` decays all
    params. State: ``sgd.momentum.<name>`` (absent when ``momentum == 0``), ``lr.count``.
    """
    # momentum == 0 is plain SGD (torch keeps no buffer then); skip the zero buffer entirely.
    moving = {"sgd": trace(momentum, nesterov)} if momentum > 0 or nesterov else {}
    tx = _clipped(max_grad_norm, decay=add_decayed_weights(weight_decay, decay_mask), **moving,
                  lr=scale_by_learning_rate(lr))
    if max_grad_norm is not None:  # the kernels leave clipping to the train step
        return tx
    return tx._replace(inplace=optim_inplace.sgd_(as_schedule(lr), momentum, nesterov, weight_decay, decay_mask))


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

    ``decay_mask=None`` decays all params. State: ``adam.mu.<name>``, ``adam.nu.<name>``, ``adam.count``,
    ``lr.count``.
    """
    tx = _clipped(max_grad_norm, decay=add_decayed_weights(weight_decay, decay_mask),
                  adam=scale_by_adam(b1, b2, eps), lr=scale_by_learning_rate(lr))
    if max_grad_norm is not None:
        return tx
    return tx._replace(inplace=optim_inplace.adam_(as_schedule(lr), b1, b2, eps, weight_decay, decay_mask,
                                                   decoupled=False))


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
    ``decay_mask=None`` decays all params. State: ``adam.mu.<name>``, ``adam.nu.<name>``, ``adam.count``,
    ``lr.count``.
    """
    tx = _clipped(max_grad_norm, adam=scale_by_adam(b1, b2, eps),
                  decay=add_decayed_weights(weight_decay, decay_mask), lr=scale_by_learning_rate(lr))
    if max_grad_norm is not None:
        return tx
    return tx._replace(inplace=optim_inplace.adam_(as_schedule(lr), b1, b2, eps, weight_decay, decay_mask,
                                                   decoupled=True))
