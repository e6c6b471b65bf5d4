"""K replicas of a network folded into the channels of one network: the replicated forward without vmap.

Replica i's activations are channel group i of a (B, K*C, H, W) tensor. Every convolution gets K times
its channels and K times its groups (weight: the stacked (K, O, I/g, kh, kw) viewed as (K*O, I/g, kh, kw);
a transposed convolution's (K, I, O/g, kh, kw) as (K*I, O/g, kh, kw)), so group i only sees replica i's
channels with replica i's weights; every BatchNorm gets K times the features, so its statistics are per
channel and hence per replica; ReLU, max pooling and residual additions act per channel already. The image
enters as K copies along the channels. This is what `torch.func.vmap`'s convolution rule computes, but the
activations keep one (channels-last) layout end to end: under vmap the max-pool rule folds the replicas
into the batch instead and every later convolution then runs on channels-first copies, measured ~35%
slower on a cpu for 4 replicas of the built-in network.

A network folds when every module that holds tensors of its own is a Conv2d, ConvTranspose2d or
BatchNorm2d (the ResNet, neck and head here); the deformable convolution does not (`fold_network` returns
None and the replicated step vmaps instead).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from centerpoint.model import make_apply
from centerpoint.state import Tree

_FOLDABLE = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)
# apply(stacked params, stacked buffers, images (B, 3, H, W), train) -> (outputs (K, B, ...), new stacked buffers)
FoldedApply = Callable[[Tree, Tree, Tensor, bool], tuple[dict[str, Tensor], Tree]]


def fold_network(net: nn.Module, k: int) -> nn.Module | None:
    """A structure-only copy of `net` (its layers on the meta device: `make_folded_apply` supplies every
    tensor) whose layers hold K replicas, as in the module doc; None when a module of another kind holds
    parameters or buffers."""
    for m in net.modules():
        holds = next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None
        if holds and not isinstance(m, _FOLDABLE):
            return None
    folded = copy.deepcopy(net).to("meta")
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _FOLDABLE):
                setattr(parent, name, _widened(child, k))
    return folded


def _widened(m: nn.Module, k: int) -> nn.Module:
    """The layer for K replicas (meta tensors)."""
    meta = torch.device("meta")
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(m.num_features * k, m.eps, m.momentum, m.affine, m.track_running_stats, device=meta)
    cls = type(m)
    kwargs = {"output_padding": m.output_padding} if isinstance(m, nn.ConvTranspose2d) else {}
    return cls(m.in_channels * k, m.out_channels * k, m.kernel_size, stride=m.stride, padding=m.padding,
               dilation=m.dilation, groups=m.groups * k, bias=m.bias is not None, device=meta, **kwargs)


def make_folded_apply(folded: nn.Module, k: int, channels_last: bool) -> FoldedApply:
    """The apply of K stacked replicas through `fold_network`'s network: params and buffers stacked (K, ...)
    as in the train state; outputs (K, B, C, h, w) per head; the new buffers stacked again. Integer buffers
    (BatchNorm's num_batches_tracked, (K,)) pass through the folded layer as replica 0's count and come
    back each advanced by the folded layer's change (the same for every replica: one forward each)."""
    apply = make_apply(folded, traced=True)

    def as_folded(v: Tensor) -> Tensor:
        # A view of the stacked tensor; with the run's channels-last state (`memory_format.channels_last`
        # of a 5-dim tensor) a channels-last one, and the gradients come back in the state's layout.
        return v.reshape(v.shape[0] * v.shape[1], *v.shape[2:]) if v.is_floating_point() else v[0]

    def run(params: Tree, buffers: Tree, images: Tensor, train: bool) -> tuple[dict[str, Tensor], Tree]:
        folded_buffers = {n: as_folded(v) for n, v in buffers.items()}
        x = images.repeat(1, k, 1, 1)  # (B, 3K, H, W): replica i's copy in channel group i
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs, new = apply({n: as_folded(v) for n, v in params.items()}, folded_buffers, x, train)
        stacked = {n: v.unflatten(0, (k, -1)) if v.is_floating_point() else buffers[n] + (v - folded_buffers[n])
                   for n, v in new.items()}
        return {n: o.unflatten(1, (k, -1)).movedim(1, 0) for n, o in outputs.items()}, stacked

    return run
