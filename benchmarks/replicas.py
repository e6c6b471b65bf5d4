"""Replicated training (`train.replicas`): K models in one replicated step (as an uncompiled run builds it:
the folded network, or `--forward vmap`) against K sequential single-model steps (the training loop's own
step for one model, run once per replica) on the same batches, fp32.

The two variants are timed in one process, alternating step by step (the median step of each; `--repeats`
such processes, the run with the median ratio kept and every ratio printed), and each variant's peak memory
is measured in a process of its own (cpu: peak resident memory; cuda: max_memory_allocated). Prints one JSON line:
per K, images/s of all replicas together (K x batch images per step) for both, their ratio (replicated /
sequential; > 1: the replicated step is faster) and the peak memory of each.

    python benchmarks/replicas.py                       # the built-in network at 128 px, batch 16, K = 1 2 4 8
    python benchmarks/replicas.py --spec experiments/centernet_r18_coco.yaml --size 512 --batch 2 --ks 1 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import make_batches, make_step, print_result

from centerpoint.model import build_model, init
from centerpoint.optim.plan import build_optimizer
from centerpoint.replicas.fold import fold_network, make_folded_apply
from centerpoint.replicas.settings import replicated_state
from centerpoint.replicas.step import make_replicated_step
from centerpoint.runtime.devices import select_backend, step_mode
from centerpoint.spec_io import load_spec
from centerpoint.state import init_state, to_device


def build(args: argparse.Namespace, variant: str) -> Callable[[dict], None]:
    """`run(batch)`: one replicated step of `args.k` replicas, or `args.k` single-model steps, on `batch`."""
    sets = [f"data.input_size={args.size}", f"train.batch_size={args.batch}", f"train.replicas={args.k}"]
    spec = load_spec(Path(args.spec) if args.spec else None, sets)
    backend = select_backend(args.device)
    if variant == "replicated":
        plan = build_optimizer(spec, 100, args.batch, replicated=True)
        model = build_model(spec.model, backend.device, traced=True)
        state = to_device(replicated_state(spec, args.batch, lambda s: init_state(*init(spec.model, s),
                                                                                  plan.transform)), backend.device,
                          spec.runtime.channels_last)
        net = fold_network(model.net, args.k) if args.forward == "folded" else None
        folded = make_folded_apply(net, args.k, spec.runtime.channels_last) if net is not None else None
        step = make_replicated_step(model.apply, spec, plan.transform, step_mode(backend, False), folded=folded)

        def run(batch: dict) -> None:
            nonlocal state
            state, _ = step(state, batch)
        return run
    single = load_spec(Path(args.spec) if args.spec else None, sets[:2])
    single_plan = build_optimizer(single, 100, args.batch)
    states = [to_device(init_state(*init(single.model, s), single_plan.transform), backend.device,
                        single.runtime.channels_last) for s in range(args.k)]
    one_step = make_step(single, backend, "fp32", single_plan)

    def run_all(batch: dict) -> None:
        for i in range(args.k):
            states[i], _ = one_step(states[i], batch)
    return run_all


def child(args: argparse.Namespace) -> dict:
    """In this process: with `args.variant` one variant's peak memory after a few steps; else the time of
    both variants, alternating step by step (the median of each), so that a machine whose load changes
    weighs on both alike."""
    backend = select_backend(args.device)
    spec = load_spec(Path(args.spec) if args.spec else None, [f"data.input_size={args.size}"])
    batches = [{k: v.to(backend.device) for k, v in b.items()}
               for b in make_batches(args.steps + args.warmup, args.batch, args.size, spec.model.num_classes)]
    if args.variant:
        run = build(args, args.variant)
        for batch in batches[:2]:
            run(batch)
        backend.synchronize()
        peak = (torch.cuda.max_memory_allocated() if backend.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {"peak_mb": peak / 2**20}
    runs = {v: build(args, v) for v in ("sequential", "replicated")}
    times: dict[str, list[float]] = {v: [] for v in runs}
    for i, batch in enumerate(batches):
        for v, run in runs.items():
            backend.synchronize()
            t = time.perf_counter()
            run(batch)
            backend.synchronize()
            if i >= args.warmup:
                times[v].append(time.perf_counter() - t)
    return {v: args.k * args.batch / sorted(ts)[len(ts) // 2] for v, ts in times.items()}


def _call(k: int, *extra: str) -> dict:
    """This script as a child process for `k` replicas; its JSON line."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", "--k", str(k), *extra]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=None)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each variant; the best counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--forward", choices=["folded", "vmap"], default="folded",
                        help="the replicated forward: the folded network where it folds (as a run), or vmap")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["replicated", "sequential"], help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # a child process
        print(json.dumps(child(args)))
        return
    result: dict = {"benchmark": "replicas", "size": args.size, "batch": args.batch, "spec": args.spec or "built-in",
                    "forward": args.forward,
                    "device": str(select_backend(args.device).device), "threads": torch.get_num_threads()}
    for k in args.ks:
        speed = [_call(k) for _ in range(args.repeats)]  # each run alternates the variants; the median run counts
        best = sorted(speed, key=lambda r: r["replicated"] / r["sequential"])[len(speed) // 2]
        memory = {v: _call(k, "--variant", v, "--steps", "1", "--warmup", "1")["peak_mb"]
                  for v in ("sequential", "replicated")}  # each in its own process: its own peak
        result[f"k{k}"] = {"sequential_img_per_s": best["sequential"], "replicated_img_per_s": best["replicated"],
                           "ratio": best["replicated"] / best["sequential"],
                           "ratios": [r["replicated"] / r["sequential"] for r in speed],
                           "sequential_peak_mb": memory["sequential"], "replicated_peak_mb": memory["replicated"]}
    print_result(result, digits=3)


if __name__ == "__main__":
    main()
