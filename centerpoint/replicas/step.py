"""The replicated train step: `step(stacked state, batch) -> (stacked state, metrics (K,))`.

The K forwards run at once over the stacked parameters and BatchNorm buffers, on the shared batch: through
the network folded into grouped layers (`replicas.fold`) where it folds, else under `torch.func.vmap`
(BatchNorm writing its running statistics into the clone `model.make_apply` makes, so each replica's
statistics stay its own and nothing in place touches the input state). One backward differentiates the sum
of the K losses. The rest (gradient norm, clipping, non-finite guard, fp16 loss scaling, optimizer update)
is the single step's arithmetic on the stacked trees with one value per replica: the optimizer's
`torch._foreach_*` kernels have no vmap rule, and need none, since they are elementwise and take the
per-replica scalars broadcast over the leading axis (`optim.inplace.scalar_operands`). A replica whose loss or
gradient is not finite keeps its old state; the others update. The EMA of the weights (train.ema_decay)
follows each replica's own updates. Eager, the update is the optimizer's in-place kernel on the stacked
trees (`optim.hyper`), writing into the old state only when every replica is finite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from centerpoint.loss import centernet_loss
from centerpoint.model import Apply, normalize
from centerpoint.optim import transforms as optim
from centerpoint.optim.ema import make_ema_update
from centerpoint.optim.inplace import scale_tree_
from centerpoint.replicas.fold import FoldedApply
from centerpoint.runtime.devices import StepMode
from centerpoint.spec import ExperimentSpec
from centerpoint.state import TrainState, Tree, per_leading
from centerpoint.step import LossFn, Reduce, check_finite, make_loss_fn, make_update


def _select(keep_new: Tensor, new: Tree, old: Tree) -> Tree:
    """Per replica: new where keep_new (K,) else old, per leaf."""
    return {k: torch.where(per_leading(keep_new, v), v, old[k]) for k, v in new.items()}


def replica_norms(tree: Tree) -> Tensor:
    """(K,) L2 norm of each replica's slice of a stacked tree viewed as one vector: per tensor, then the
    norm of those (the single step's `optim.global_norm` order)."""
    # Reduced over every axis but the first, in place: a channels-last stacked weight would be copied by
    # a reshape to (K, -1).
    norms = [torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim()))) if v.dim() > 1 else v.abs()
             for v in tree.values()]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


GradFn = Callable[[Tree, Tree, dict[str, Tensor], "Tensor | None"], tuple[Tree, tuple[Tree, Tree]]]


def _vmapped_losses(loss_fn: LossFn) -> LossFn:
    """One model's `loss_fn` over stacked params and buffers (K, ...): losses (K,), new stacked buffers."""
    unscaled = torch.func.vmap(loss_fn, in_dims=(0, 0, None, None))
    scaled = torch.func.vmap(loss_fn, in_dims=(0, 0, None, 0))
    return lambda params, buffers, batch, scale: (unscaled if scale is None else scaled)(params, buffers, batch,
                                                                                          scale)


def _folded_losses(apply: FoldedApply, spec: ExperimentSpec) -> LossFn:
    """As `_vmapped_losses`, the forward through the folded network (`replicas.fold`); each replica's loss
    from its slice of the outputs (vmapped: the loss is elementwise work and sums)."""
    mean, std, lw = spec.data.mean, spec.data.std, spec.loss

    def losses_fn(params: Tree, buffers: Tree, batch: dict[str, Tensor], scale: Tensor | None
                  ) -> tuple[Tensor, tuple[Tree, Tree]]:
        outputs, new_buffers = apply(params, buffers, normalize(batch["images"], mean, std), True)
        losses = torch.func.vmap(lambda out: centernet_loss(out, batch, lw.heatmap_weight, lw.wh_weight,
                                                            lw.offset_weight, lw.alpha, lw.gamma))(outputs)
        loss = losses["loss"] if scale is None else losses["loss"] * scale
        return loss, (losses, new_buffers)

    return losses_fn


def _traced_grads(losses_fn: LossFn) -> GradFn:
    """grads(stacked params, stacked buffers, batch, scale (K,) or None) -> (stacked gradients, (losses (K,),
    new stacked buffers)): `torch.func.grad` of the sum of the K losses (replica i's loss depends only on
    replica i's tensors, so the gradient of the sum with respect to them is its own)."""
    def total(params: Tree, buffers: Tree, batch: dict[str, Tensor], scale: Tensor | None
              ) -> tuple[Tensor, tuple[Tree, Tree]]:
        loss, aux = losses_fn(params, buffers, batch, scale)
        return loss.sum(), aux

    return torch.func.grad(total, has_aux=True)


def _eager_grads(losses_fn: LossFn) -> GradFn:
    """As `_traced_grads`, by `torch.autograd.grad` over leaf views of the params."""
    def grads(params: Tree, buffers: Tree, batch: dict[str, Tensor], scale: Tensor | None
              ) -> tuple[Tree, tuple[Tree, Tree]]:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}  # views: params stay untouched
        loss, (losses, new_buffers) = losses_fn(leaves, buffers, batch, scale)
        got = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return dict(zip(leaves, got, strict=True)), ({k: v.detach() for k, v in losses.items()},
                                                     {k: v.detach() for k, v in new_buffers.items()})

    return grads


def make_replicated_step(apply: Apply, spec: ExperimentSpec, tx: optim.Transform, mode: StepMode, *,
                         folded: FoldedApply | None = None, reduce: Reduce | None = None,
                         autocast: Callable[[], object] | None = None
                         ) -> Callable[[TrainState, dict[str, Tensor]], tuple[TrainState, Tree]]:
    """The step of `spec.train.replicas` models on one batch (see `step.make_train_step` for the batch and
    the metrics; here each metric is (K,), one per replica). `apply` must be the functional (traced) apply;
    `tx` the optimizer of `optim.hyper` (hyperparameters in its state). `reduce` averages the stacked
    gradients and losses over data-parallel ranks: every rank holds all K replicas.

    The forward: `folded` (`fold.make_folded_apply`, for a network `fold.fold_network` folds) when given,
    else one model's forward under vmap. The gradients: `torch.func.grad` in the TRACED mode (a compiled
    step: torch.compile captures it whole), else `torch.autograd.grad`, which runs the batched operations'
    own backward kernels rather than vmap's rule for each backward operation (~30% faster on a cpu). The
    non-finite guard selects per replica between the new and the old state; in the EAGER_DONATING mode
    (where reading a device flag costs nothing) only when some replica is not finite. The same numbers
    every way (tests/test_replicas.py)."""
    max_grad_norm, growth_interval = spec.optim.grad_clip, spec.runtime.loss_scale_growth_interval
    # Under vmap, channels-first images: vmap turns each convolution into one grouped over the replicas,
    # which runs slower from channels-last input on cpu (measured 6.6 against 5.3 s for 4 built-in replicas).
    losses_fn = _folded_losses(folded, spec) if folded is not None else _vmapped_losses(
        make_loss_fn(apply, spec, autocast, channels_last=False))
    grad_fn = _traced_grads(losses_fn) if mode is StepMode.TRACED else _eager_grads(losses_fn)
    guard_by_sync = mode is StepMode.EAGER_DONATING
    update = make_update(tx, mode)
    ema_update = make_ema_update(spec.train.ema_decay, spec.train.ema_warmup, in_place=False)  # None: off

    def step(state: TrainState, batch: dict[str, Tensor]) -> tuple[TrainState, Tree]:
        scale = state.scaler["scale"] if state.scaler else None
        grads, (losses, new_buffers) = grad_fn(state.params, state.buffers, batch, scale)
        if scale is not None:
            grads = scale_tree_(grads, 1.0 / scale)  # per replica; the step's own fresh gradients
        if reduce is not None:
            grads, losses = reduce(grads), reduce(losses)
        grad_norm = replica_norms(grads)
        finite, metrics, scaler = check_finite(losses, grad_norm, state.scaler, scale, growth_interval)
        # Every replica finite (read where that costs nothing): the update may write into the old state,
        # which needs no per-tensor select afterwards.
        donate = guard_by_sync and bool(finite.all())
        if max_grad_norm is not None:
            grads = scale_tree_(grads, optim.clip_coefficient(grad_norm, max_grad_norm))
        params, opt_state = update(grads, state, donate)
        ema = state.ema if ema_update is None else ema_update(state.ema, {**params, **new_buffers}, state.step + 1)
        if donate:
            return TrainState(params, new_buffers, opt_state, state.step + 1, scaler, ema), metrics
        new_state = TrainState(_select(finite, params, state.params), _select(finite, new_buffers, state.buffers),
                               _select(finite, opt_state, state.opt_state), state.step + finite.to(state.step.dtype),
                               scaler, _select(finite, ema, state.ema))
        return new_state, metrics

    return step
