"""What each replica of a replicated run is, and its state stacked or taken apart.

A stacked state holds each tensor of K single-model states along a new leading axis (K, ...): parameters,
buffers, optimizer state (with the per-replica hyperparameters `optim.hyper.HYPER_KEYS`), the update count
`step` (K,) and the fp16 loss scaler. Replica i of a run equals a single-model run with `replica_spec(spec,
i)`: the same data order (train.seed), its own init seed and swept values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from centerpoint.optim.hyper import HYPER_KEYS, PEAK_LR_KEY, WEIGHT_DECAY_KEY
from centerpoint.optim.plan import scaled_lr
from centerpoint.spec import ExperimentSpec
from centerpoint.spec_io import with_updates
from centerpoint.state import TrainState, Tree, flatten_state, map_state, unflatten_state


@dataclass(frozen=True)
class Replica:
    """One model of a replicated run: its index, init seed and hyperparameters (`optim.lr` as the spec
    gives it, before linear batch scaling)."""

    index: int
    init_seed: int
    lr: float
    weight_decay: float

    def describe(self) -> dict[str, float | int]:
        """The fields a metrics row carries for this replica."""
        return {"replica": self.index, "init_seed": self.init_seed, "lr": self.lr, "weight_decay": self.weight_decay}


def init_seed(spec: ExperimentSpec) -> int:
    """The seed of a run's (first replica's) initial weights: train.init_seed, else train.seed."""
    t = spec.train
    return t.init_seed if t.init_seed is not None else t.seed


def replicas_of(spec: ExperimentSpec) -> list[Replica]:
    """The run's replicas in order (one for an ordinary run)."""
    t, o = spec.train, spec.optim
    lrs = t.sweep.get("optim.lr", (o.lr,) * t.replicas)
    wds = t.sweep.get("optim.weight_decay", (o.weight_decay,) * t.replicas)
    return [Replica(i, init_seed(spec) + i, lrs[i], wds[i]) for i in range(t.replicas)]


def replica_spec(spec: ExperimentSpec, index: int) -> ExperimentSpec:
    """The single-model spec whose run equals replica `index` of `spec`'s: replicas 1, no sweep, the
    replica's init seed, lr and weight decay (data order, augmentation and everything else unchanged)."""
    r = replicas_of(spec)[index]
    return with_updates(spec, {"train.replicas": 1, "train.sweep": {}, "train.init_seed": r.init_seed,
                               "optim.lr": r.lr, "optim.weight_decay": r.weight_decay})


def peak_lrs(spec: ExperimentSpec, global_batch: int, device: torch.device | str = "cpu") -> Tensor:
    """(K,) float64: each replica's peak lr after linear batch scaling (`optim.plan.scaled_lr`)."""
    return torch.tensor([scaled_lr(replica_spec(spec, r.index), global_batch) for r in replicas_of(spec)],
                        dtype=torch.float64, device=device)


def stack_states(states: list[TrainState]) -> TrainState:
    """K single-model states -> one stacked state (every tensor (K, ...), contiguous)."""
    flats = [flatten_state(s) for s in states]
    return unflatten_state({k: torch.stack([f[k] for f in flats]) for k in flats[0]})


def replicated_state(spec: ExperimentSpec, global_batch: int, fresh: Callable[[int], TrainState]) -> TrainState:
    """The stacked initial state: `fresh(seed)` for each replica's init seed, with each replica's peak lr
    and weight decay set in the optimizer state."""
    state = stack_states([fresh(r.init_seed) for r in replicas_of(spec)])
    return with_hyperparameters(state, peak_lrs(spec, global_batch),
                                torch.tensor([r.weight_decay for r in replicas_of(spec)], dtype=torch.float64))


def with_hyperparameters(state: TrainState, peaks: Tensor, weight_decays: Tensor) -> TrainState:
    """`state` with the per-replica peak lrs and weight decays (K,) in its optimizer state."""
    opt = dict(state.opt_state)
    for key, values in ((PEAK_LR_KEY, peaks), (WEIGHT_DECAY_KEY, weight_decays)):
        if key not in opt:
            raise KeyError(f"optimizer state has no {key!r}: not built by optim.hyper")
        opt[key] = values.to(opt[key])
    return state._replace(opt_state=opt)


def replica_state(state: TrainState, index: int) -> TrainState:
    """Replica `index` of a stacked state as an ordinary single-model state (copies; the hyperparameter
    entries dropped: a single model's optimizer holds them as numbers)."""
    one = map_state(lambda t: t[index].clone(), state)
    return one._replace(opt_state={k: v for k, v in one.opt_state.items() if k not in HYPER_KEYS})


def replica_tree(tree: Tree, index: int) -> Tree:
    """Replica `index`'s slice of a stacked tree (views, no copy)."""
    return {k: v[index] for k, v in tree.items()}
