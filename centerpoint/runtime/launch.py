"""Start data-parallel workers through torch's elastic launcher (what `torchrun` runs), one per device.

`centerpoint train --nproc-per-node N [--nnodes M --node-rank R --master-addr HOST --master-port P]`
lands here when the process is not already a worker of a launched job: the elastic agent of this node
starts N copies of the same command with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set,
watches them, stops them all as soon as one fails, and with `max_restarts` > 0 restarts them (the
workers then resume from the run's latest checkpoint, see `distributed.Context.restart_count`).

Rendezvous is torchrun's "static" one: node `node_rank` of `nnodes` meets the others at
master_addr:master_port (node 0 hosts the store there). On a single node without a port, a free port on
127.0.0.1 is picked.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from centerpoint.errors import CenterpointError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchPlan:
    """The job's shape: processes per node, nodes, this node's rank, where node 0 listens, restarts."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    max_restarts: int = 0
    requested: bool = False  # --nproc-per-node was given: start workers even for one (a one-rank group)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def check_plan(plan: LaunchPlan) -> None:
    """Reject impossible job shapes with a message naming the flag."""
    if plan.nproc_per_node < 1:
        raise CenterpointError(f"--nproc-per-node {plan.nproc_per_node}: must be at least 1")
    if plan.nnodes < 1:
        raise CenterpointError(f"--nnodes {plan.nnodes}: must be at least 1")
    if not 0 <= plan.node_rank < plan.nnodes:
        raise CenterpointError(f"--node-rank {plan.node_rank}: must be in 0..{plan.nnodes - 1} "
                               f"(--nnodes {plan.nnodes})")
    if plan.nnodes > 1 and not plan.master_addr:
        raise CenterpointError(f"--nnodes {plan.nnodes}: pass --master-addr HOST, the address of node 0 that "
                               "every node can reach (and the same --master-port on every node)")
    if plan.master_port is not None and not 0 < plan.master_port < 65536:
        raise CenterpointError(f"--master-port {plan.master_port}: must be in 1..65535")
    if plan.max_restarts < 0:
        raise CenterpointError(f"--max-restarts {plan.max_restarts}: must be 0 or more")


def needs_launch(plan: LaunchPlan, env: dict[str, str] | None = None) -> bool:
    """Whether to start workers here: more than one process (or --nproc-per-node) asked for, and this
    process is not already a worker (torchrun, SLURM srun or a previous launch set the job up)."""
    from centerpoint.runtime.distributed import launched

    return (plan.world_size > 1 or plan.requested) and not launched(os.environ if env is None else env)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch_config(plan: LaunchPlan, run_id: str | None = None):  # noqa: ANN201 (torch's LaunchConfig)
    """The elastic agent's configuration for `plan` (static rendezvous at master_addr:master_port)."""
    from torch.distributed.launcher.api import LaunchConfig

    addr = plan.master_addr or "127.0.0.1"
    port = plan.master_port or (free_port(addr) if plan.nnodes == 1 else DEFAULT_PORT)
    return LaunchConfig(
        min_nodes=plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc_per_node,
        run_id=run_id or ("centerpoint" if plan.nnodes > 1 else uuid.uuid4().hex),
        rdzv_backend="static",
        rdzv_endpoint=f"{addr}:{port}",
        rdzv_configs={"rank": plan.node_rank, "timeout": 900},
        max_restarts=plan.max_restarts,
        monitor_interval=0.2,
    )


def describe_failure(rank: int, exitcode: int, pid: int) -> str:
    """'worker rank 1 (pid 42) was killed by SIGKILL' / '... exited with code 2'."""
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"worker rank {rank} (pid {pid}) {how}"


def _set_thread_default(nproc: int) -> None:
    """Split this machine's cores between the workers unless OMP_NUM_THREADS is already chosen."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))


def launch_workers(plan: LaunchPlan, command: Sequence[str]) -> None:
    """Run `command` (argv, command[0] an executable) as this node's workers of the job; returns when all
    of them finished, raises CenterpointError naming the first failed rank otherwise."""
    check_plan(plan)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    _set_thread_default(plan.nproc_per_node)
    config = launch_config(plan)
    # The elastic agent installs its own SIGINT/SIGTERM handlers (it forwards the signal to the workers,
    # which stop at a step boundary, save and exit) and leaves them installed: restore ours afterwards.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # workers stopped by a signal
            from centerpoint.runtime.interrupt import Interrupted

            raise Interrupted(failure.exitcode - 128, quiet=True) from None  # rank 0 said where it stopped
        restarts = f" after {plan.max_restarts} restart(s)" if plan.max_restarts else ""
        raise CenterpointError(f"{describe_failure(rank, failure.exitcode, failure.pid)}{restarts}; all workers "
                               "were stopped (the worker's own error, if any, is printed above)") from None
    except SignalException as err:
        from centerpoint.runtime.interrupt import Interrupted

        raise Interrupted(err.sigval) from None
    except (ValueError, RuntimeError) as err:  # rendezvous: port in use, node 0 unreachable, timeout
        raise CenterpointError(f"could not start the workers at {config.rdzv_endpoint}: {err}") from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
