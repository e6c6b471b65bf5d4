"""Train-step throughput: the project's functional step (eager, compiled) against a plain stateful
baseline (the same network as an nn.Module, the spec's optimizer from torch.optim, loss.backward(),
clip_grad_norm_) on the same inputs, in the same precision and memory format.

Prints one JSON line: images/s per variant, ratios to the baseline, peak memory per variant (device
memory on cuda/sdaa; on cpu the peak resident memory of a fresh process that runs only that variant),
achieved FLOP/s and its fraction of the machine's measured dense matmul FLOP/s (in the step's precision).

    python benchmarks/train_step.py --size 128 --batch 16 [--compile] [--device cuda] [--precision bf16]
    python benchmarks/train_step.py --spec experiments/centernet_r18_coco.yaml --size 512 --batch 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import initial_state, make_batches, make_step, median_seconds, print_result

from centerpoint.loss import centernet_loss
from centerpoint.model import build_network, normalize
from centerpoint.runtime.devices import select_backend
from centerpoint.spec_io import load_spec


def matmul_peak(device: torch.device, dtype: torch.dtype, sync) -> float:  # noqa: ANN001
    """Measured dense matmul FLOP/s of this device."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10):  # the best run: a peak, not a typical figure
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(spec, batch) -> float:  # noqa: ANN001
    """FLOPs of one forward+backward (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_network(spec.model).to(batch["images"].device)  # counted where the batch is: fast on a GPU
    images = normalize(batch["images"], spec.data.mean, spec.data.std)
    with FlopCounterMode(display=False) as counter:
        out = net(images)
        centernet_loss(out, batch)["loss"].backward()
    return float(counter.get_total_flops())


def torch_optimizer(spec, net: torch.nn.Module) -> torch.optim.Optimizer:  # noqa: ANN001
    """The spec's optimizer as torch.optim would run it (same decay mask as the functional one)."""
    from centerpoint.optim.transforms import default_decay_mask

    o = spec.optim
    named = list(net.named_parameters())
    decay = [p for n, p in named if o.decay_norm_and_bias or default_decay_mask(n, p)]
    rest = [p for n, p in named if not (o.decay_norm_and_bias or default_decay_mask(n, p))]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def peak_rss_mb(args: argparse.Namespace, variant: str) -> float:
    """Peak resident memory (MiB) while a fresh process runs only `variant` for a few steps (the process
    also holds the other variants' small states and torch itself: compare the variants' differences)."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--size", str(args.size), "--batch", str(args.batch), "--steps", "2",
           "--device", args.device, "--precision", args.precision, "--only", variant]
    cmd += (["--spec", args.spec] if args.spec else []) + (["--channels-last"] if args.channels_last else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_rss_mb"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=None, help="experiment spec (default: the built-in experiment's network)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all variants")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="also time the compiled step (slow to compile on cpu)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant peak memory runs (cpu)")
    ap.add_argument("--only", choices=["baseline", "eager", "compiled"], help=argparse.SUPPRESS)  # memory child
    ap.add_argument("--compile-only", action="store_true", help="compile the step once (filling inductor's "
                    "cache) and exit; prints the compile time")
    args = ap.parse_args()
    backend = select_backend(args.device)
    dev = backend.device
    spec = load_spec(args.spec, [f"data.input_size={args.size}", f"runtime.channels_last={args.channels_last}",
                                 f"runtime.precision={args.precision}", "model.pretrained=null"])
    batch = {k: v.to(dev) for k, v in make_batches(1, args.batch, args.size, spec.model.num_classes, 8.0)[0].items()}
    state, plan = initial_state(spec, backend, args.batch)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format

    # Baseline: stateful module + torch.optim + backward.
    net = build_network(spec.model).to(dev, memory_format=mf)
    net.train()
    opt = torch_optimizer(spec, net)

    def baseline() -> None:
        with backend.autocast(args.precision):
            out = net(normalize(batch["images"], spec.data.mean, spec.data.std).contiguous(memory_format=mf))
        loss = centernet_loss(out, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), plan.max_grad_norm or 35.0)
        opt.step()

    step = make_step(spec, backend, args.precision, plan)
    holder = {"state": state}

    def functional(fn=step) -> None:  # noqa: ANN001
        holder["state"], _ = fn(holder["state"], batch)

    sync = backend.synchronize
    if args.only:  # a memory child: run one variant, report the peak resident memory while it steps
        fn = {"baseline": baseline, "eager": functional}.get(args.only)
        if fn is None:
            compiled = torch.compile(make_step(spec, backend, args.precision, plan, compiled=True))
            fn = lambda: functional(compiled)  # noqa: E731
        fn()  # first call (compiles; allocator warm-up), then the peak of the steps alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the current one (Linux)
        median_seconds(fn, args.steps, 0, sync)
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))
        return
    if args.compile_only:
        compiled = torch.compile(make_step(spec, backend, args.precision, plan, compiled=True))
        t = time.perf_counter()
        functional(compiled)
        sync()
        print_result({"bench": "train_step_compile", "compile_s": round(time.perf_counter() - t, 2)})
        return
    params_m = round(sum(v.numel() for v in state.params.values()) / 1e6, 2)
    result = {"bench": "train_step", "spec": args.spec or "built-in", "params_m": params_m, "device": str(dev),
              "size": args.size, "batch": args.batch,
              "precision": args.precision, "channels_last": args.channels_last,
              "threads": torch.get_num_threads()}
    variants = {"baseline": baseline, "eager": functional}
    if args.compile:
        compiled = torch.compile(make_step(spec, backend, args.precision, plan, compiled=True))
        t = time.perf_counter()
        functional(compiled)
        sync()
        result["compile_s"] = time.perf_counter() - t  # inductor's on-disk caches make a rerun's far shorter
        variants["compiled"] = lambda: functional(compiled)
    # Rounds interleave the variants, so drifting machine load hits all of them alike; each variant's
    # figure is its best round's median step.
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            backend.reset_peak_memory()  # device memory: each variant's own peak (the others' states stay)
            seconds[name].append(median_seconds(fn, args.steps, 2, sync))
            peaks[name] = max(peaks.get(name, 0.0), backend.max_memory_mb())
    base = min(seconds["baseline"])
    result["baseline_img_s"] = args.batch / base
    for name in ("eager", "compiled"):
        if name in seconds:
            result[f"{name}_img_s"] = args.batch / min(seconds[name])
            result[f"{name}_ratio"] = base / min(seconds[name])
    if dev.type != "cpu":
        result["peak_mem_mb"] = {name: round(v, 1) for name, v in peaks.items()}
    elif not args.no_memory:
        variants = ["baseline", "eager", *(["compiled"] if args.compile else [])]
        result["peak_rss_mb"] = {v: round(peak_rss_mb(args, v), 1) for v in variants}
    flops = step_flops(spec, batch)
    peak = matmul_peak(dev, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision],
                       sync)
    result.update(step_gflop=flops / 1e9, matmul_peak_gflop_s=peak / 1e9)
    for name in ("baseline", "eager", "compiled"):
        if name in seconds:
            result[f"{name}_gflop_s"] = flops / min(seconds[name]) / 1e9
            result[f"{name}_peak_fraction"] = flops / min(seconds[name]) / peak
    print_result(result, digits=4)


if __name__ == "__main__":
    main()
