"""What the benchmarks share: random batches with their targets, timing, the train step and state as the
training loop builds them, and the one JSON line each benchmark prints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from centerpoint.data.targets import make_targets
from centerpoint.model import build_model, init
from centerpoint.optim.plan import build_optimizer
from centerpoint.runtime.devices import Backend, StepMode, step_mode
from centerpoint.spec import ExperimentSpec
from centerpoint.state import TrainState, init_state, to_device
from centerpoint.step import make_train_step


def make_batches(count: int, batch: int, size: int, classes: int, min_side: float = 4.0
                 ) -> list[dict[str, torch.Tensor]]:
    """`count` batches (seeded, on the cpu) of random uint8 (batch, 3, size, size) images with 6 random boxes
    each, sides from `min_side` to `min_side` + size / 4 pixels, and their targets at stride 4."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        xy = torch.rand(batch, 6, 2, generator=g) * size * 0.7
        boxes = torch.cat([xy, xy + min_side + torch.rand(batch, 6, 2, generator=g) * size * 0.25], -1)
        labels = torch.randint(0, classes, (batch, 6), generator=g)
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        out.append({"images": images, **make_targets(boxes, labels, classes, (size // 4, size // 4), 4)})
    return out


def clocked(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def median_seconds(fn: Callable[[], object], steps: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median wall seconds per call of `steps` calls after `warmup` calls, each synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def best_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int = 5) -> float:
    """Best wall seconds of `repeats` calls after one warm-up, each synchronised."""
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def initial_state(spec: ExperimentSpec, backend: Backend, batch: int, total_steps: int = 100, seed: int = 0
                  ) -> tuple[TrainState, Any]:
    """(the train state at step 0 on `backend`, the optimizer plan) for `spec` at global batch `batch`, laid
    out as the training loop lays it out (channels-last with runtime.channels_last)."""
    plan = build_optimizer(spec, total_steps, batch)
    params, buffers = init(spec.model, seed)
    return to_device(init_state(params, buffers, plan.transform), backend.device, spec.runtime.channels_last), plan


def make_step(spec: ExperimentSpec, backend: Backend, precision: str, plan: Any, compiled: bool = False,
              donate: bool = True) -> Callable[[TrainState, dict[str, torch.Tensor]], tuple[TrainState, dict]]:
    """The train step for `spec` on `backend` in the step mode the training loop picks: traced (for
    torch.compile) when `compiled`, else eager, guarded by a host read and updating the state in place where
    that read costs nothing (`donate=False`: never in place, for callers that read a state after passing it)."""
    apply = build_model(spec.model, backend.device, traced=compiled, channels_last=spec.runtime.channels_last).apply
    mode = step_mode(backend, compiled)
    if mode is StepMode.EAGER_DONATING and not donate:
        mode = StepMode.EAGER
    return make_train_step(apply, spec, plan.transform, mode, autocast=lambda: backend.autocast(precision))


def print_result(result: dict[str, Any], digits: int | None = None) -> None:
    """The benchmark's one JSON line on stdout (floats rounded to `digits` places when given)."""
    if digits is not None:
        result = {k: round(v, digits) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(result), flush=True)
