"""Replicated training (`train.replicas`): K models in one replicated step (as an uncompiled run builds it:
the folded network, or `--forward vmap`) against K sequential single-model steps (the training loop's own
step for one model, run once per replica) on the same batches, fp32.

Each variant runs in a fresh process, alternating `--repeats` times with the best kept, so its peak memory
is its own (cpu: peak resident memory of that process; cuda: max_memory_allocated). Prints one JSON line:
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
from pathlib import Path

import torch
from common import make_batches, make_step, median_seconds, print_result

from centerpoint.model import build_model, init
from centerpoint.optim.plan import build_optimizer
from centerpoint.replicas.fold import fold_network, make_folded_apply
from centerpoint.replicas.settings import replicated_state
from centerpoint.replicas.step import make_replicated_step
from centerpoint.runtime.devices import select_backend, step_mode
from centerpoint.spec_io import load_spec
from centerpoint.state import init_state, to_device


def one(args: argparse.Namespace) -> dict:
    """Time one variant (`args.variant`: replicated or sequential) for `args.k` replicas in this process."""
    sets = [f"data.input_size={args.size}", f"train.batch_size={args.batch}", f"train.replicas={args.k}"]
    spec = load_spec(Path(args.spec) if args.spec else None, sets)
    backend = select_backend(args.device)
    plan = build_optimizer(spec, 100, args.batch, replicated=True)
    model = build_model(spec.model, backend.device, traced=True)
    batches = [{k: v.to(backend.device) for k, v in b.items()}
               for b in make_batches(args.steps + args.warmup, args.batch, args.size, spec.model.num_classes)]
    it = iter(batches * 2)
    if args.variant == "replicated":
        state = to_device(replicated_state(spec, args.batch, lambda s: init_state(*init(spec.model, s),
                                                                                  plan.transform)), backend.device)
        net = fold_network(model.net, args.k) if args.forward == "folded" else None
        folded = make_folded_apply(net, args.k, spec.runtime.channels_last) if net is not None else None
        step = make_replicated_step(model.apply, spec, plan.transform, step_mode(backend, False), folded=folded)

        def run() -> None:
            nonlocal state
            state, _ = step(state, next(it))
    else:
        single = load_spec(Path(args.spec) if args.spec else None, sets[:2])
        single_plan = build_optimizer(single, 100, args.batch)
        states = [to_device(init_state(*init(single.model, s), single_plan.transform), backend.device,
                            single.runtime.channels_last) for s in range(args.k)]
        step = make_step(single, backend, "fp32", single_plan)

        def run() -> None:
            batch = next(it)
            for i in range(args.k):
                states[i], _ = step(states[i], batch)

    seconds = median_seconds(run, args.steps, args.warmup, backend.synchronize)
    peak = (torch.cuda.max_memory_allocated() if backend.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"img_per_s": args.k * args.batch / seconds, "s_per_step": seconds, "peak_mb": peak / 2**20}


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
    parser.add_argument("--variant", choices=["replicated", "sequential"], help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child process: one variant
        print(json.dumps(one(args)))
        return
    result: dict = {"benchmark": "replicas", "size": args.size, "batch": args.batch, "spec": args.spec or "built-in",
                    "forward": args.forward,
                    "device": str(select_backend(args.device).device), "threads": torch.get_num_threads()}
    for k in args.ks:
        got: dict[str, dict] = {}
        # The variants alternate, `--repeats` times, and each keeps its best: on a machine whose load from
        # other work changes, a one-off pair would compare the load as much as the steps.
        for _ in range(args.repeats):
            for variant in ("sequential", "replicated"):
                cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--k", str(k)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                new = json.loads(out.splitlines()[-1])
                if variant not in got or new["img_per_s"] > got[variant]["img_per_s"]:
                    got[variant] = new
        result[f"k{k}"] = {"sequential_img_per_s": got["sequential"]["img_per_s"],
                           "replicated_img_per_s": got["replicated"]["img_per_s"],
                           "ratio": got["replicated"]["img_per_s"] / got["sequential"]["img_per_s"],
                           "sequential_peak_mb": got["sequential"]["peak_mb"],
                           "replicated_peak_mb": got["replicated"]["peak_mb"]}
    print_result(result, digits=3)


if __name__ == "__main__":
    main()
