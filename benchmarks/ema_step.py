"""What the EMA of the weights (train.ema_decay) costs a train step: the same step with it off and on,
interleaved on the same batches, plus the EMA update alone.

Prints one JSON line: median wall and CPU seconds per step with EMA off and on, their ratio, and the
milliseconds of one EMA update (in place, as the cpu step runs it; pure, as the traced and eager steps do).

    python benchmarks/ema_step.py [--spec SPEC] [--size 128] [--batch 16] [--steps 4] [--rounds 3]
                                  [--precision fp32|bf16] [--device auto|cpu|cuda|sdaa]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import clocked, initial_state, make_batches, make_step, print_result

from centerpoint.optim.ema import init_ema, make_ema_update
from centerpoint.runtime.devices import select_backend
from centerpoint.spec_io import load_spec, with_updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=None, help="Spec file (default: the built-in experiment).")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per variant and round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    base = load_spec(args.spec, [f"runtime.precision={args.precision}"])
    backend = select_backend(args.device)
    batches = make_batches(args.steps, args.batch, args.size, base.model.num_classes or 5)
    variants = {}
    for name, decay in (("off", None), ("on", 0.9999)):
        spec = with_updates(base, {"train.ema_decay": decay})
        state, plan = initial_state(spec, backend, args.batch)
        if spec.train.ema_decay is not None:
            state = state._replace(ema=init_ema(state.params, state.buffers))
        variants[name] = [make_step(spec, backend, args.precision, plan), state]
    step_s: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        # Step by step, the variants alternating and their order swapped every round: the second of two
        # back-to-back steps measured ~15% slower on a busy 2-core machine, whichever it was.
        order = list(variants) if round_ % 2 else list(variants)[::-1]
        for batch in batches:
            for name in order:
                entry = variants[name]

                def one(entry=entry, batch=batch) -> None:  # noqa: ANN001
                    entry[1], _ = entry[0](entry[1], batch)
                    backend.synchronize()
                cpu, wall = clocked(one)
                if round_:
                    step_s[name].append((cpu, wall))
    ema, weights = variants["on"][1].ema, {**variants["on"][1].params, **variants["on"][1].buffers}
    count = torch.tensor(5, device=backend.device)
    update_ms = {}
    for kind, in_place in (("in_place", True), ("pure", False)):
        update = make_ema_update(0.9999, 2000.0, in_place)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            update(ema, weights, count)
            backend.synchronize()
            times.append(time.perf_counter() - t)
        update_ms[kind] = 1000 * sorted(times)[len(times) // 2]

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    wall = {k: median([w for _, w in v]) for k, v in step_s.items()}
    cpu = {k: median([c for c, _ in v]) for k, v in step_s.items()}
    print_result({"device": str(backend.device), "size": args.size, "batch": args.batch, "precision": args.precision,
                  "steps_timed": len(step_s["on"]), "step_s_off": wall["off"], "step_s_on": wall["on"],
                  "on_over_off_wall": wall["on"] / wall["off"], "cpu_s_off": cpu["off"], "cpu_s_on": cpu["on"],
                  "on_over_off_cpu": cpu["on"] / cpu["off"], "ema_update_ms_in_place": update_ms["in_place"],
                  "ema_update_ms_pure": update_ms["pure"], "ema_tensors": len(ema)}, digits=4)


if __name__ == "__main__":
    main()
