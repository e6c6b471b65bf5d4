"""Detection decoding throughput: `decode_heatmap` + `boxes_to_original` on a batch of head outputs,
against a straightforward per-image numpy reference written here (3x3 peak test, top-k by sorting,
boxes built and mapped back one image at a time), on the same inputs.

Inputs: sigmoid heatmaps (B, 80, 128, 128) with ~20 sharp peaks per image on a noisy background, random
wh/offset maps, and a scale + translate + flip affine back to original pixels per image. The two results
are checked to agree (same scores and labels; boxes to 1e-3 pixels).

Prints one JSON line: detections/s (B * k per call) from this process's CPU time (best call and median;
less disturbed by other load than wall time, which is given too) for both, the ratio, and the CPU ms of
the steps of `decode_heatmap`.

    python benchmarks/decode.py [--batch 16] [--classes 80] [--size 128] [--k 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from common import clocked, print_result

from centerpoint.evaluation.decode import boxes_to_original, decode_heatmap, local_max

STRIDE = 4


def make_inputs(batch: int, classes: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Head outputs: heatmap probabilities, wh and offset maps (cells), inverse affines (B, 2, 3)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, size, size, generator=g) - 4.0
    for b in range(batch):  # a few confident objects per image
        n = 20
        c = torch.randint(0, classes, (n,), generator=g)
        y, x = torch.randint(0, size, (n,), generator=g), torch.randint(0, size, (n,), generator=g)
        logits[b, c, y, x] = 3.0 + torch.rand(n, generator=g) * 3
    heat = torch.sigmoid(logits)
    wh = torch.rand(batch, 2, size, size, generator=g) * size / 3
    offset = torch.rand(batch, 2, size, size, generator=g)
    scale = 1.0 / (0.5 + torch.rand(batch, generator=g))
    flip = torch.rand(batch, generator=g) < 0.5
    inv = torch.zeros(batch, 2, 3)
    inv[:, 0, 0] = torch.where(flip, -scale, scale)
    inv[:, 0, 2] = torch.where(flip, size * STRIDE * scale, torch.zeros(batch)) - 20.0
    inv[:, 1, 1] = scale
    inv[:, 1, 2] = -10.0
    return {"heatmap": heat, "wh": wh, "offset": offset, "to_original": inv}


def project(inputs: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The project's batched decode: boxes in original pixels, scores, labels."""
    boxes, scores, labels = decode_heatmap(inputs["heatmap"], inputs["wh"], inputs["offset"], STRIDE, k)
    return boxes_to_original(boxes, inputs["to_original"]), scores, labels


def reference(inputs: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: keep cells equal to their 3x3 maximum, sort, take k, build boxes, map them back."""
    out_boxes, out_scores, out_labels = [], [], []
    for heat, wh, off, inv in zip(inputs["heatmap"], inputs["wh"], inputs["offset"], inputs["to_original"],
                                  strict=True):
        c, h, w = heat.shape
        padded = np.pad(heat, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
        pooled = np.max([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
        peaks = np.where(pooled == heat, heat, 0).reshape(-1)
        top = np.argsort(-peaks, kind="stable")[:k]
        labels, cell = top // (h * w), top % (h * w)
        ys, xs = cell // w, cell % w
        cx, cy = xs + off[0, ys, xs], ys + off[1, ys, xs]
        bw, bh = wh[0, ys, xs], wh[1, ys, xs]
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) * STRIDE
        x_o = boxes[:, [0, 2]] * inv[0, 0] + inv[0, 2]
        y_o = boxes[:, [1, 3]] * inv[1, 1] + inv[1, 2]
        out_boxes.append(np.stack([x_o.min(1), y_o.min(1), x_o.max(1), y_o.max(1)], 1))
        out_scores.append(peaks[top])
        out_labels.append(labels)
    return np.stack(out_boxes), np.stack(out_scores), np.stack(out_labels)


def timed(fn: Callable[[], object], rounds: int) -> list[tuple[float, float]]:
    """(CPU seconds of this process, wall seconds) of each of `rounds` calls, after one warm-up call."""
    fn()
    return [clocked(fn) for _ in range(rounds)]


def stage_ms(inputs: dict[str, torch.Tensor], k: int) -> dict[str, float]:
    """CPU ms per batch of the steps of `decode_heatmap` (best of 3)."""
    heat = inputs["heatmap"]
    pooled = local_max(heat, 3)
    peaks = heat * (pooled == heat).to(heat.dtype)
    steps = {
        "local_max": lambda: local_max(heat, 3),
        "max_pool2d (before local_max)": lambda: F.max_pool2d(heat, 3, stride=1, padding=1),
        "peak_mask": lambda: heat * (pooled == heat).to(heat.dtype),
        "topk": lambda: torch.topk(peaks.reshape(heat.shape[0], -1), k, dim=1),
    }
    return {name: round(min(t[0] for t in timed(fn, 3)) * 1e3, 2) for name, fn in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--size", type=int, default=128, help="heatmap side, cells")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.batch, args.classes, args.size)
    as_numpy = {key: v.numpy() for key, v in inputs.items()}
    got = project(inputs, args.k)
    want = reference(as_numpy, args.k)
    agree = (np.array_equal(got[1].numpy(), want[1]) and np.array_equal(got[2].numpy(), want[2])
             and np.allclose(got[0].numpy(), want[0], atol=1e-3))
    result: dict[str, object] = {"bench": "decode", "batch": args.batch, "classes": args.classes, "size": args.size,
                                 "k": args.k, "threads": args.threads, "agree": bool(agree)}
    ref_t, proj_t = [], []
    for _ in range(2):  # interleaved, so drifting machine load hits both alike
        ref_t += timed(lambda: reference(as_numpy, args.k), max(1, args.rounds // 2))
        proj_t += timed(lambda: project(inputs, args.k), args.rounds)
    dets = args.batch * args.k
    for name, ts in (("reference", ref_t), ("project", proj_t)):
        cpu, wall = [t[0] for t in ts], [t[1] for t in ts]
        result[f"{name}_det_s"] = round(dets / min(cpu))  # best call, CPU time
        result[f"{name}_det_s_median"] = round(dets / statistics.median(cpu))
        result[f"{name}_det_s_wall_median"] = round(dets / statistics.median(wall))
    result["ratio"] = round(result["project_det_s"] / result["reference_det_s"], 2)  # type: ignore[operator]
    result["ratio_median"] = round(result["project_det_s_median"] / result["reference_det_s_median"], 2)  # type: ignore[operator]
    result["project_cpu_ms_per_batch"] = round(min(t[0] for t in proj_t) * 1e3, 1)
    result["project_steps_cpu_ms"] = stage_ms(inputs, args.k)
    print_result(result)


if __name__ == "__main__":
    main()
