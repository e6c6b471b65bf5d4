"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

The whole step (forward, loss, backward, optimizer update, non-finite guard, loss scaling) is one pure
function, built for one `devices.StepMode`. Traced (compiled), its gradients come from `torch.func.grad`
over `functional_call`, which `torch.compile` captures as a single graph (autograd over leaf tensors would
need `requires_grad_()` inside the step, which breaks the graph). Eager, they come from
`torch.autograd.grad` over detached leaf views of the parameters: the same numbers, without functorch
wrapping every operation (measured ~5% of an eager cpu step). Only the eager-donating mode modifies the
state it is given (its caller never reads it again).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from centerpoint.errors import CenterpointError
from centerpoint.evaluation.decode import decode_heatmap
from centerpoint.loss import centernet_loss
from centerpoint.model import Apply, normalize
from centerpoint.optim import transforms as optim
from centerpoint.optim.ema import make_ema_update
from centerpoint.optim.inplace import scale_tree_
from centerpoint.optim.loss_scale import update_loss_scale
from centerpoint.runtime.devices import StepMode
from centerpoint.spec import ExperimentSpec
from centerpoint.state import TrainState, Tree

Reduce = Callable[[Tree], Tree]


def _select(keep_new: Tensor, new: Tree, old: Tree) -> Tree:
    """new where keep_new else old, per leaf, without a host sync."""
    return {k: torch.where(keep_new, v, old[k]) for k, v in new.items()}


LossFn = Callable[[Tree, Tree, dict[str, Tensor], "Tensor | None"], tuple[Tensor, tuple[Tree, Tree]]]


def make_loss_fn(apply: Apply, spec: ExperimentSpec, autocast: Callable[[], object] | None = None, *,
                 channels_last: bool | None = None) -> LossFn:
    """loss_fn(params, buffers, batch, scale) -> (loss, (loss terms, new buffers)): the network in train
    mode on the batch (see `make_train_step`), its loss multiplied by the fp16 loss `scale` (None: 1).
    `channels_last`: the images' memory format (None: runtime.channels_last)."""
    mean, std, lw = spec.data.mean, spec.data.std, spec.loss
    to_channels_last = spec.runtime.channels_last if channels_last is None else channels_last

    def loss_fn(params: Tree, buffers: Tree, batch: dict[str, Tensor], scale: Tensor | None
                ) -> tuple[Tensor, tuple[Tree, Tree]]:
        images = normalize(batch["images"], mean, std)
        if to_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        ctx = autocast() if autocast is not None else None
        if ctx is None:
            outputs, new_buffers = apply(params, buffers, images, True)
        else:
            with ctx:  # type: ignore[attr-defined]
                outputs, new_buffers = apply(params, buffers, images, True)
        losses = centernet_loss(outputs, batch, lw.heatmap_weight, lw.wh_weight, lw.offset_weight, lw.alpha,
                                lw.gamma)
        loss = losses["loss"] if scale is None else losses["loss"] * scale
        return loss, (losses, new_buffers)

    return loss_fn


def check_finite(losses: Tree, grad_norm: Tensor, scaler: Tree, scale: Tensor | None, growth_interval: int
                 ) -> tuple[Tensor, Tree, Tree]:
    """(finite, metrics, new scaler state) of a step from its loss terms and gradient norm (0-dim, or (K,) in
    a replicated step): `finite` is whether the update may apply; with fp16 loss scaling (`scale`) an overflow
    (finite loss, non-finite gradients) halves the scale and `finite` in the metrics reports the loss only
    (see `make_train_step`)."""
    loss_ok, grads_ok = torch.isfinite(losses["loss"]), torch.isfinite(grad_norm)
    finite = loss_ok & grads_ok
    metrics = {**losses, "grad_norm": grad_norm, "finite": finite.float()}
    if scale is not None:
        overflow = loss_ok & ~grads_ok
        scaler = update_loss_scale(scaler, finite, overflow, growth_interval)
        metrics.update(finite=loss_ok.float(), loss_scale=scale, overflow=overflow.float())
    return finite, metrics, scaler


def make_update(tx: optim.Transform, mode: StepMode) -> Callable[[Tree, TrainState, bool], tuple[Tree, Tree]]:
    """update(grads, state, donate) -> (new params, new optimizer state). In the eager modes the optimizer's
    in-place kernel (`Transform.inplace`), which writes into the gradients (the step's own, fresh tensors)
    and, with `donate`, into the state's params and optimizer state; traced, the pure update."""
    kernel = tx.inplace if mode is not StepMode.TRACED else None

    def update(grads: Tree, state: TrainState, donate: bool) -> tuple[Tree, Tree]:
        if kernel is not None:
            return kernel(grads, state.opt_state, state.params, donate)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optim.apply_updates(state.params, updates), opt_state

    return update


def make_train_step(apply: Apply, spec: ExperimentSpec, tx: optim.Transform, mode: StepMode, *,
                    reduce: Reduce | None = None, autocast: Callable[[], object] | None = None,
                    ) -> Callable[[TrainState, dict[str, Tensor]], tuple[TrainState, Tree]]:
    """Build the step for `spec`, running as `mode` (`devices.step_mode`).

    batch: "images" (B, 3, H, W) uint8 or float RGB 0..255; "heatmap" (B, C, H/4, W/4), "wh", "offset"
    (B, 2, H/4, W/4) in cells, "reg_weight" (B, 1, H/4, W/4). `reduce` averages a tree over data-parallel
    ranks (gradients and loss metrics); `autocast` returns the mixed-precision context for the forward.
    Metrics are 0-dim tensors: the loss terms, grad_norm (before clipping) and `finite` (1 if the update
    was applied, 0 if a non-finite loss or gradient made the step keep the old state). The lr a step used
    is its schedule at the state's `step` before it (the optimizer's count); the loop logs it from there.

    Gradients are clipped to optim.grad_clip here (the norm is computed once, for clipping and logging).
    The non-finite guard is a tensor select over the new state (no host sync; fused away when compiled),
    except in the eager-donating mode: there it is a Python branch that skips the update entirely (it
    waits for the device: only where that costs nothing), and the optimizer's in-place kernel
    (`Transform.inplace`) then updates params and optimizer state in place, which saves several allocating
    passes over the model per step. Same numbers in every mode.

    With a loss scaler in the state (fp16), the loss is multiplied by its scale before differentiation and
    the gradients divided by it; an overflow (finite loss, non-finite gradients) skips the update and halves
    the scale, runtime.loss_scale_growth_interval applied updates in a row double it. Metrics then add
    `loss_scale` (the scale this step used) and `overflow`, and `finite` only reports the loss: overflows are
    the scaler's business, not a diverging run.

    With train.ema_decay the EMA of the weights (`state.ema`, `optim.ema`) follows each applied update: from
    the new params and buffers, in place in the eager-donating mode, and kept as it was by a skipped step.
    """
    max_grad_norm, growth_interval = spec.optim.grad_clip, spec.runtime.loss_scale_growth_interval
    guard_by_sync = donate = mode is StepMode.EAGER_DONATING
    update = make_update(tx, mode)
    ema_update = make_ema_update(spec.train.ema_decay, spec.train.ema_warmup, in_place=donate)  # None: off
    loss_fn = make_loss_fn(apply, spec, autocast)

    def eager_grad(params: Tree, buffers: Tree, batch: dict[str, Tensor], scale: Tensor | None
                   ) -> tuple[Tree, tuple[Tree, Tree]]:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}  # views: params stay untouched
        loss, (losses, new_buffers) = loss_fn(leaves, buffers, batch, scale)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), ({k: v.detach() for k, v in losses.items()}, new_buffers)

    grad_fn = torch.func.grad(loss_fn, has_aux=True) if mode is StepMode.TRACED else eager_grad

    def train_step(state: TrainState, batch: dict[str, Tensor]) -> tuple[TrainState, Tree]:
        scale = state.scaler["scale"] if state.scaler else None
        grads, (losses, new_buffers) = grad_fn(state.params, state.buffers, batch, scale)
        if scale is not None:
            grads = scale_tree_(grads, 1.0 / scale)  # the step's own fresh gradients: no copy needed
        if reduce is not None:
            grads = reduce(grads)
            losses = reduce(losses)
        grad_norm = optim.global_norm(grads)
        finite, metrics, scaler = check_finite(losses, grad_norm, state.scaler, scale, growth_interval)
        if guard_by_sync and not bool(finite):
            return state._replace(scaler=scaler), metrics
        if max_grad_norm is not None:
            grads = scale_tree_(grads, optim.clip_coefficient(grad_norm, max_grad_norm))
        params, opt_state = update(grads, state, donate)
        ema = state.ema if ema_update is None else ema_update(state.ema, {**params, **new_buffers}, state.step + 1)
        if guard_by_sync:
            return TrainState(params, new_buffers, opt_state, state.step + 1, scaler, ema), metrics
        new_state = TrainState(
            _select(finite, params, state.params),
            _select(finite, new_buffers, state.buffers),
            _select(finite, opt_state, state.opt_state),
            state.step + finite.to(state.step.dtype),
            scaler,
            _select(finite, ema, state.ema),
        )
        return new_state, metrics

    return train_step


def make_heads_step(apply: Apply, spec: ExperimentSpec, autocast: Callable[[], object] | None = None
                    ) -> Callable[[Tree, Tree, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """heads(params, buffers, images) -> heatmap probabilities (B, C, H/4, W/4), wh and offset (B, 2, H/4, W/4)
    in feature cells, float32: the network with its input normalisation, before decoding.

    images: (B, 3, H, W) RGB 0..255 with H, W multiples of 32. With eval.flip_test the heatmap, wh and
    offset are averaged with those of the mirrored image (mirrored back).
    """
    mean, std = spec.data.mean, spec.data.std

    def heads(params: Tree, buffers: Tree, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = normalize(images, mean, std)
        if spec.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if spec.eval.flip_test:
            x = torch.cat([x, x.flip(-1)])
        if autocast is None:
            out, _ = apply(params, buffers, x, False)
        else:
            with autocast():  # type: ignore[attr-defined]
                out, _ = apply(params, buffers, x, False)
        heatmap, wh, offset = out["heatmap"].float().sigmoid(), out["wh"].float(), out["offset"].float()
        if spec.eval.flip_test:
            b = images.shape[0]
            heatmap = (heatmap[:b] + heatmap[b:].flip(-1)) / 2
            wh = (wh[:b] + wh[b:].flip(-1)) / 2
            offset = offset[:b]  # the mirrored offset is not a mirror of the offset; keep the original
        return heatmap, wh, offset

    return heads


def make_predict_step(apply: Apply, spec: ExperimentSpec, autocast: Callable[[], object] | None = None
                      ) -> Callable[[Tree, Tree, Tensor], tuple[Tensor, ...]]:
    """predict(params, buffers, images) -> boxes (B, k, 4) in input pixels, scores (B, k), labels (B, k):
    `make_heads_step`, then the 3x3 peak test and top-k (`decode_heatmap`)."""
    heads, stride, k = make_heads_step(apply, spec, autocast), spec.model.stride, spec.eval.topk

    def predict(params: Tree, buffers: Tree, images: Tensor) -> tuple[Tensor, ...]:
        return decode_heatmap(*heads(params, buffers, images), stride, k=k)

    return predict


class Divergence:
    """train.nonfinite=stop, read by the training loop from each step's `finite` metric: end the run at its
    first step with a non-finite loss or gradient, before any checkpoint or evaluation of a later state.

    Where reading a device scalar costs nothing (cpu) each step's `finite` flag is read at once. Elsewhere
    the first such step is recorded on the device, without a host sync, and read where the loop syncs
    anyway: at log steps, before each checkpoint and before each evaluation."""

    def __init__(self, enabled: bool, free_sync: bool, device: torch.device | str) -> None:
        self.enabled, self.free_sync = enabled, free_sync
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # step number, -1: none yet

    def record(self, finite: torch.Tensor, step: int) -> None:
        if not self.enabled:
            return
        if self.free_sync:
            if not bool(finite):
                self._stop(step)
            return
        self.first_bad = torch.where((self.first_bad < 0) & (finite == 0), step, self.first_bad)

    def check(self) -> None:
        if self.enabled and not self.free_sync and int(self.first_bad) >= 0:
            self._stop(int(self.first_bad))

    @staticmethod
    def _stop(step: int) -> None:
        raise CenterpointError(f"non-finite loss or gradient at step {step}; stopped (train.nonfinite=stop) without "
                               "writing a checkpoint after it. Lower optim.lr or enable optim.grad_clip.")
