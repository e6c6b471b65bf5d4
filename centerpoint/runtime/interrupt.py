"""Ctrl-C (SIGINT) and SIGTERM: the first asks a training run to stop at the next step boundary, a second
one stops any command at once; either way the process ends with exit code 128 + signal number.

SIGTERM is what SLURM and Kubernetes send before they kill a job. Outside a training loop both signals
raise `Interrupted` where the main thread is, so `finally` blocks and the temp-file cleanup of atomic writes
run. Inside `stop_requests()` the first signal only records a request that the loop reads at its next step
boundary. This module imports no torch (the CLI installs it before anything else).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A launcher forwards the signal that the job scheduler may also have sent to every process of the job:
# the same signal again within this many seconds is that one event, not a second request.
REPEAT_S = 1.0


class Interrupted(BaseException):  # noqa: N818 (a BaseException like KeyboardInterrupt: `except Exception` lets it by)
    """The process got SIGINT or SIGTERM.

    `step`/`workdir`: where a training run stopped (its `latest` checkpoint holds that position), for the
    CLI's resume hint; None elsewhere. `quiet`: another process (rank 0 of a job) reports it.
    """

    def __init__(self, signum: int, step: int | None = None, workdir: Path | None = None,
                 quiet: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.step = step
        self.workdir = workdir
        self.quiet = quiet

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (the shell's 128 + signal number)."""
        return 128 + self.signum


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise `Interrupted` in the main thread (the CLI's default)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _raise)


@dataclass
class StopRequest:
    """What the training loop reads at each step boundary: the first signal's number (0: none yet)."""

    signum: int = 0
    at: float = 0.0  # time.monotonic() of the first signal
    owner: int = field(default_factory=os.getpid)


def _handler(request: StopRequest, announce: bool, clock: Callable[[], float]) -> Callable[[int, object], None]:
    def handle(signum: int, frame: object) -> None:
        if os.getpid() != request.owner:  # a forked data-loader worker: the main process decides
            return
        now = clock()
        if not request.signum:
            request.signum, request.at = signum, now
            if announce:
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                os.write(2, f"{name}: stopping at the next step boundary (press Ctrl-C again to stop at once, "
                            "without saving)\n".encode())
            return
        if signum == request.signum and now - request.at < REPEAT_S:
            return
        raise Interrupted(signum)

    return handle


@contextmanager
def stop_requests(announce: bool = True, clock: Callable[[], float] = time.monotonic) -> Iterator[StopRequest]:
    """Within the block, the first SIGINT/SIGTERM sets `request.signum` instead of raising; a second one
    (another signal, or the same one over REPEAT_S later) raises `Interrupted` at once. `announce`: say so on
    stderr when the first arrives. Outside the main thread (where Python cannot handle signals) the request
    never fires. The previous handlers are restored on exit."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    handle = _handler(request, announce, clock)
    for sig in SIGNALS:
        signal.signal(sig, handle)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def loader_worker_init(worker_id: int = 0) -> None:
    """Data-loader worker start-up: move the worker into a process group of its own, so that Ctrl-C at the
    terminal and a launcher's signal to the main process's group reach only the main process, which then
    stops its workers itself (a worker killed by them would fail the main process's next step instead)."""
    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted here (e.g. a session leader): keep the parent's group
        pass
