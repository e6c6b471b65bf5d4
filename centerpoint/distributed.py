"""Data parallelism: the process context from the launcher's environment, process groups, gradient
averaging inside the pure step, state broadcast and detection gathering.

Works with torchrun / torch.distributed.run (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and with
SLURM (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS); a single process needs no environment at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from centerpoint.devices import Backend

Tree = dict[str, Tensor]


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context(env: dict[str, str] | None = None) -> Context:
    """Read rank/world from torchrun's variables, else SLURM's, else a single process."""
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return Context(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return Context(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]))
    return Context()


def init_process_group(ctx: Context, backend: Backend) -> None:
    """Join the job's process group (no-op for one process or when already joined)."""
    if not ctx.distributed or dist.is_initialized():
        return
    if backend.name == "sdaa":
        import torch_sdaa  # noqa: F401  (registers the tccl backend)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend.dist_backend, rank=ctx.rank, world_size=ctx.world_size)


def destroy(ctx: Context) -> None:
    """Leave the process group."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    """Wait for all ranks."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def _functional_all_reduce() -> Callable[[Tensor], Tensor] | None:
    try:
        from torch.distributed import _functional_collectives as fc
    except ImportError:  # torch < 2.1
        return None
    return lambda t: fc.all_reduce(t, "sum", dist.group.WORLD)


def make_reduce(ctx: Context) -> Callable[[Tree], Tree] | None:
    """A function averaging a tree over ranks through one flat buffer (None for a single process).

    Uses the functional (out-of-place, compile-traceable) all_reduce when torch has it, else the
    in-place `dist.all_reduce` (eager only, e.g. on torch 2.0 / sdaa).
    """
    if not ctx.distributed:
        return None
    world = ctx.world_size
    functional = _functional_all_reduce()

    def reduce(tree: Tree) -> Tree:
        keys = list(tree)
        flat = torch.cat([tree[k].reshape(-1).float() for k in keys])
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


def broadcast_state(state, ctx: Context):  # noqa: ANN001, ANN201 (TrainState; avoids an import cycle)
    """Copy rank 0's train state to every rank so all start identical."""
    if not ctx.distributed:
        return state
    for tree in (state.params, state.buffers, state.opt_state):
        for t in tree.values():
            dist.broadcast(t, src=0)
    dist.broadcast(state.step, src=0)
    return state


def gather_rows(rows: np.ndarray, ctx: Context) -> np.ndarray:
    """Concatenate every rank's detection rows on all ranks (rank order)."""
    if not ctx.distributed:
        return rows
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, rows)
    return np.concatenate(parts)
