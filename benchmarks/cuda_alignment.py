"""cpu/accelerator alignment: from the same state and batch, one train step on the cpu and on `--device`
in fp32 (TF32 off), then `--steps` steps in bf16 on both, side by side.

The baseline is the cpu in the same run. Prints one JSON line: the one-step relative differences of the
loss and each loss term, the gradient norm and the updated parameters (largest over tensors of
|a - b| / |b|, and the largest element difference), whether the loss agrees to `--tol` (1e-5), and the
two bf16 loss curves with their largest relative gap.

    python benchmarks/cuda_alignment.py --device cuda [--size 128] [--batch 16] [--steps 20]
"""

from __future__ import annotations

import argparse

import torch
from common import initial_state, make_batches, make_step, print_result

from centerpoint.runtime.devices import Backend, make_backend, resolve_precision
from centerpoint.spec import ExperimentSpec
from centerpoint.spec_io import load_spec
from centerpoint.state import TrainState


def build(spec: ExperimentSpec, backend: Backend, precision: str) -> tuple[object, TrainState]:
    """The run's eager step (never updating in place: the comparison reads states after stepping them) and
    initial state (seed 0) on `backend`."""
    state, plan = initial_state(spec, backend, spec.train.batch_size)
    return make_step(spec, backend, precision, plan, donate=False), state


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="bf16 steps of the loss curves")
    ap.add_argument("--tol", type=float, default=1e-5, help="relative loss agreement required in fp32")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    spec = load_spec(None, [f"data.input_size={args.size}", f"train.batch_size={args.batch}",
                            "schedule.warmup_steps=5"])
    cpu, dev = make_backend("cpu"), make_backend(args.device)  # type: ignore[arg-type]
    batches = make_batches(args.steps, args.batch, args.size, spec.model.num_classes)
    result: dict[str, object] = {"bench": "cuda_alignment", "device": args.device, "size": args.size,
                                 "batch": args.batch, "network": "built-in half-width R18"}

    # One step in fp32 from the same state and batch.
    new: dict[str, tuple[TrainState, dict[str, float]]] = {}
    for name, backend in (("cpu", cpu), ("device", dev)):
        step, state = build(spec, backend, "fp32")
        batch = {k: v.to(backend.device) for k, v in batches[0].items()}
        state, metrics = step(state, batch)
        new[name] = (state, {k: float(v) for k, v in metrics.items()})
    (s_cpu, m_cpu), (s_dev, m_dev) = new["cpu"], new["device"]
    terms = {k: rel(m_dev[k], m_cpu[k]) for k in m_cpu if k.startswith("loss")}
    param_rel = max(float((s_dev.params[k].cpu() - v).norm() / v.norm().clamp_min(1e-30))
                    for k, v in s_cpu.params.items())
    param_abs = max(float((s_dev.params[k].cpu() - v).abs().max()) for k, v in s_cpu.params.items())
    result["fp32_one_step"] = {"loss_cpu": m_cpu["loss"], "loss_device": m_dev["loss"], "loss_terms_rel": terms,
                               "grad_norm_rel": rel(m_dev["grad_norm"], m_cpu["grad_norm"]),
                               "params_max_rel": param_rel, "params_max_abs": param_abs}
    result["pass_fp32_loss"] = bool(terms["loss"] <= args.tol)

    # Loss curves in bf16 (the cpu runs fp32 where it has no native bf16).
    curves = {}
    for name, backend in (("cpu", cpu), ("device", dev)):
        precision = resolve_precision(backend, "bf16") if name == "device" else (
            "bf16" if resolve_precision(backend, "auto") == "bf16" else "fp32")
        step, state = build(spec, backend, precision)
        losses = []
        for batch in batches:
            state, metrics = step(state, {k: v.to(backend.device) for k, v in batch.items()})
            losses.append(round(float(metrics["loss"]), 5))
        curves[name] = {"precision": precision, "loss": losses}
    result["bf16_curves"] = curves
    result["bf16_curve_max_rel"] = max(rel(a, b) for a, b in zip(curves["device"]["loss"], curves["cpu"]["loss"],
                                                                  strict=True))
    print_result(result)


if __name__ == "__main__":
    main()
