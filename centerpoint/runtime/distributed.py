"""Data parallelism: the process context from the launcher's environment, process groups, gradient
averaging and synchronised BatchNorm inside the pure step, state broadcast, a cross-rank identity
check and detection gathering.

Works with torchrun / torch.distributed.run / `centerpoint train --nproc-per-node` (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_RESTART_COUNT) and with SLURM (SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS, SLURM_RESTART_COUNT); a single process needs no environment at all.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from centerpoint.errors import CenterpointError
from centerpoint.runtime.devices import Backend, register_dist_backend
from centerpoint.state import TrainState, Tree, flatten_state

_STORE_TIMEOUT_S = 900  # how long a worker waits for the others to join, s


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job. restart_count: how many times the launcher has restarted
    the job's workers before this attempt (0 on the first)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    restart_count: int = 0
    joined: bool = False  # a worker of a launched job (torchrun, --nproc-per-node): it joins the job's group

    @property
    def distributed(self) -> bool:
        """Whether this process works in a process group: several ranks, or one that a launcher started
        (a one-rank group runs the same collectives, e.g. `--nproc-per-node 1` checks nccl)."""
        return self.world_size > 1 or self.joined


def launched(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a worker of an already launched job (torchrun, our launcher, srun)."""
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env or ("SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1)


def context(env: Mapping[str, str] | None = None) -> Context:
    """Read rank/world from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return Context(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]),
                       int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), joined=True)
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return Context(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_RESTART_COUNT", "0")))
    return Context()


def init_process_group(ctx: Context, backend: Backend) -> None:
    """Join the job's process group (no-op for one process or when already joined)."""
    if not ctx.distributed or dist.is_initialized():
        return
    register_dist_backend(backend)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The elastic agent hosts the store, and its keys outlive a restart of the workers: torch's env://
        # path would reuse them and the restarted group would dial the dead workers' addresses (measured
        # with the static rendezvous). Each attempt therefore works under its own prefix.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ctx.world_size,
                              is_master=False, timeout=datetime.timedelta(seconds=_STORE_TIMEOUT_S))
        attempt = dist.PrefixStore(f"centerpoint/attempt_{ctx.restart_count}", store)
        dist.init_process_group(backend.dist_backend, store=attempt, rank=ctx.rank, world_size=ctx.world_size)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend.dist_backend, rank=ctx.rank, world_size=ctx.world_size)


def destroy(ctx: Context) -> None:
    """Leave the process group."""
    if ctx.distributed and dist.is_initialized():
        _CONTROL.clear()
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    """Wait for all ranks."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


_CONTROL: dict[str, Any] = {}  # the gloo group for host-side decisions, made on first use


def max_over_ranks(value: int, ctx: Context) -> int:
    """The largest of every rank's `value` (a small host integer, e.g. a stop request), on every rank.

    Runs on a cpu (gloo) group, so on accelerators it costs a message between the hosts and no device
    sync. Every rank must call it at the same points of the loop."""
    if not ctx.distributed or not dist.is_initialized():
        return value
    if "group" not in _CONTROL:
        _CONTROL["group"] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    box = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_CONTROL["group"])
    return int(box)


def _functional_all_reduce() -> Callable[[Tensor], Tensor] | None:
    try:
        from torch.distributed import _functional_collectives as fc
    except ImportError:  # torch < 2.1
        return None
    return lambda t: fc.all_reduce(t, "sum", dist.group.WORLD)


def all_sum(t: Tensor) -> Tensor:
    """Element-wise sum of `t` over all ranks, out of place (functional collective when torch has one,
    so it can sit inside a compiled step; else an eager in-place all_reduce on a copy)."""
    functional = _functional_all_reduce()
    if functional is not None:
        return functional(t) + 0  # `+ 0` waits for the collective and gives a plain tensor
    out = t.clone()
    dist.all_reduce(out)
    return out


def make_reduce(ctx: Context) -> Callable[[Tree], Tree] | None:
    """A function averaging a tree over ranks through one flat buffer (None for a single process). The
    buffer is float32 (float64 if any leaf is); each leaf comes back in its own dtype.

    Uses the functional (out-of-place, compile-traceable) all_reduce when torch has it, else the
    in-place `dist.all_reduce` (eager only, e.g. on torch 2.0 / sdaa).
    """
    if not ctx.distributed:
        return None
    world = ctx.world_size
    functional = _functional_all_reduce()

    def reduce(tree: Tree) -> Tree:
        keys = list(tree)
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in tree.values()) else torch.float32
        flat = torch.cat([tree[k].reshape(-1).to(dtype) for k in keys])
        if functional is not None:
            flat = functional(flat)
        else:
            flat = flat.clone()
            dist.all_reduce(flat)
        flat = flat / world
        out, offset = {}, 0
        for k in keys:
            n = tree[k].numel()
            out[k] = flat[offset : offset + n].view_as(tree[k]).to(tree[k].dtype)
            offset += n
        return out

    return reduce


class _AllSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks: each rank's loss depends on every
    rank's input through the sum, so d(sum of all ranks' losses)/d(input) gathers every rank's
    gradient. Written in the `setup_context` form so `torch.func.grad` can differentiate it."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return all_sum(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _AllSum.apply(grad)  # through apply again, so transforms see a differentiable op


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks together).

    Same parameters and buffers (names, shapes) as nn.BatchNorm2d, so it is a drop-in for the network
    structure. In training each forward all-reduces [per-channel sum, element count] and then the
    per-channel sum of squared deviations (two passes, like the native kernel, at least float32); the running
    statistics are updated in place in the buffers it is given, as nn.BatchNorm2d does (the train step
    hands it clones). In eval mode, or outside a process group, it is the native BatchNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 (or float64)
        local = torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), x.numel() // c)])
        total = _AllSum.apply(local)
        count = total[c]
        mean = total[:c] / count
        centred = xf - mean.view(1, c, 1, 1)
        var = _AllSum.apply((centred * centred).sum((0, 2, 3))) / count
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        return y.to(x.dtype)

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        """running = (1 - m) * running + m * batch statistic (unbiased variance), in place."""
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
            unbiased = var * count / (count - 1).clamp(min=1.0)
            self.running_mean.mul_(1 - m).add_(mean * m)
            self.running_var.mul_(1 - m).add_(unbiased * m)


def sync_batchnorm(net: nn.Module, ctx: Context) -> nn.Module:
    """Replace every nn.BatchNorm2d of `net` by SyncBatchNorm2d, in place (single process: unchanged)."""
    if not ctx.distributed:
        return net
    for name, child in list(net.named_children()):
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(net, name, sync.to(next(iter(child.state_dict().values())).device))
        else:
            sync_batchnorm(child, ctx)
    return net


def broadcast_state(state: TrainState, ctx: Context) -> TrainState:
    """Copy rank 0's train state to every rank so all start identical (in place)."""
    if not ctx.distributed:
        return state
    for t in flatten_state(state).values():
        dist.broadcast(t, src=0)
    return state


def broadcast_object(obj: Any, ctx: Context) -> Any:
    """Rank 0's value of a small picklable object, on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_checksum(t: Tensor) -> Tensor:
    """0-dim int64: the sum of the tensor's elements' bit patterns read as integers. Exact (integer
    arithmetic, any summation order), so equal tensors give equal sums on every rank."""
    bits = t.detach().contiguous().reshape(-1).view(_INT_VIEWS[t.element_size()])
    return bits.sum(dtype=torch.int64)


def check_identical(tree: Tree, ctx: Context) -> None:
    """Raise if any tensor of the flat `tree` (e.g. `state.flatten_state`) differs between ranks (compares
    per-tensor bit checksums: one all-reduce of the maxima and one of the minima)."""
    if not ctx.distributed:
        return
    names = list(tree)
    sums = torch.stack([bit_checksum(t) for t in tree.values()])
    hi, lo = sums.clone(), -sums
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    differ = [n for n, d in zip(names, (hi != -lo).tolist(), strict=True) if d]
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise CenterpointError(f"rank {ctx.rank}: the train state differs between ranks after the start-up "
                               f"broadcast ({', '.join(differ[:3])}{more}); check that every rank runs the "
                               "same spec and torch version")


def gather_objects(obj: Any, ctx: Context) -> list:
    """Every rank's value of a picklable object, in rank order, on all ranks."""
    if not ctx.distributed:
        return [obj]
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, obj)
    return parts
