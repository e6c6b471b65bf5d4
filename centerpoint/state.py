"""The train state and the operations over it as a whole.

A tree is a flat dict of tensors keyed by dotted names ("backbone.conv1.weight", "adam.mu.head.bias").
`TrainState` holds everything that changes during training, in groups: parameters, BatchNorm buffers,
optimizer state, the update count, the fp16 loss scaler's state and the EMA of the weights. The functions
here see the state whole, so moving it, checkpointing it, broadcasting it or comparing it across ranks never
spells out its groups again; the flat form (`flatten_state`) is what checkpoints store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from centerpoint.runtime.memory_format import channels_last as to_channels_last

Tree = dict[str, Tensor]

# Group of each TrainState field in the flat form: "params.<name>", ..., "opt.<key>", "scaler.<key>",
# "ema.<name>", "step".
_GROUPS = (("params", "params"), ("buffers", "buffers"), ("opt_state", "opt"), ("scaler", "scaler"), ("ema", "ema"))
STEP_KEY = "step"


class TrainState(NamedTuple):
    """Everything that changes during training. `step` is a 0-dim int64 tensor (updates applied);
    `scaler` the fp16 loss scaler's state (`loss_scale.init_loss_scale`), empty without loss scaling; `ema`
    the moving average of the params and floating-point buffers (`optim.ema`), empty without train.ema_decay."""

    params: Tree
    buffers: Tree
    opt_state: Tree
    step: Tensor
    scaler: Tree = {}  # noqa: RUF012 (never mutated: every step builds a new dict)
    ema: Tree = {}  # noqa: RUF012 (as scaler)


class Initializer(Protocol):
    """What `init_state` needs of an optimizer (e.g. `optim.Transform`): its initial state for params."""

    @property
    def init(self) -> Callable[[Tree], Tree]: ...


def init_state(params: Tree, buffers: Tree, optimizer: Initializer, scaler: Tree | None = None) -> TrainState:
    """A train state at step 0, on the params' device; `scaler`: the fp16 loss scaler's initial state
    (`loss_scale.init_loss_scale`), None without loss scaling."""
    device = next(iter(params.values())).device
    return TrainState(params, buffers, optimizer.init(params), torch.zeros((), dtype=torch.int64, device=device),
                      scaler or {})


def per_leading(values: Tensor, like: Tensor) -> Tensor:
    """`values` shaped to broadcast over `like`: a 0-dim value as it is; (K,) values, one per replica of a
    stacked (K, ...) tensor (`centerpoint.replicas`), over its leading axis."""
    return values if values.dim() == 0 else values.view(-1, *(1,) * (like.dim() - 1))


def map_state(fn: Callable[[Tensor], Tensor], state: TrainState) -> TrainState:
    """`fn` applied to every tensor of the state (the groups' dicts are new, their keys unchanged)."""
    return TrainState(*({k: fn(v) for k, v in getattr(state, field).items()} if field != "step" else fn(state.step)
                        for field in TrainState._fields))


def flatten_state(state: TrainState) -> Tree:
    """The state as one flat tree: `params.<name>`, `buffers.<name>`, `opt.<key>`, `scaler.<key>`,
    `ema.<name>`, `step`."""
    flat = flatten({group: getattr(state, field) for field, group in _GROUPS})
    flat[STEP_KEY] = state.step
    return flat


def unflatten_state(flat: Tree) -> TrainState:
    """Inverse of `flatten_state`; a key of no group raises KeyError."""
    groups = unflatten({k: v for k, v in flat.items() if k != STEP_KEY}, tuple(group for _, group in _GROUPS))
    return TrainState(*(groups[group] for _, group in _GROUPS[:3]), flat[STEP_KEY], groups["scaler"], groups["ema"])


def to_device(state: TrainState, device: torch.device, channels_last: bool = False) -> TrainState:
    """The state on `device`; with `channels_last` its 4-dim tensors get canonical channels-last strides
    (`memory_format.channels_last`: conv weights and their moments, the layout a channels-last step computes)."""
    def move(t: Tensor) -> Tensor:
        t = t.to(device)
        return to_channels_last(t) if channels_last else t

    return map_state(move, state)


def flatten(groups: dict[str, Tree]) -> Tree:
    """{'params': {'a.b': t}} -> {'params.a.b': t}."""
    return {f"{group}.{name}": value for group, tree in groups.items() for name, value in tree.items()}


def unflatten(flat: Tree, groups: tuple[str, ...]) -> dict[str, Tree]:
    """Inverse of `flatten` for the given group names; keys of other groups raise KeyError."""
    out: dict[str, Tree] = {g: {} for g in groups}
    for key, value in flat.items():
        group, _, name = key.partition(".")
        if group not in out:
            raise KeyError(f"tensor {key!r} belongs to no group of {groups}")
        out[group][name] = value
    return out


def num_elements(tree: Tree) -> int:
    """Total element count of all leaves."""
    return sum(v.numel() for v in tree.values())
