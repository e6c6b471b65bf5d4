"""Inference latency per image of the three ways to run a trained detector on the cpu: the eager PyTorch
predict step (what `centerpoint predict` and `Detector` run), the same step under `torch.compile`, and the
`centerpoint export --format onnx` graph in onnxruntime, at batch 1 and batch 8, in one process.

The network is the COCO recipe's (experiments/centernet_r18_coco.yaml: CenterNet-R18, 80 classes, fp32,
no flip test) with seed-0 weights, on uint8 (B, 3, S, S) inputs; every way includes normalisation and
decoding (3x3 peaks, top-100). The outputs are checked to agree (scores within 1e-4, boxes 1e-3 px).
Times are wall-clock medians over interleaved rounds (after warm-up and, for compile, the compilation).

Prints one JSON line: ms per image for each way and batch, their ratio to eager, compile and export
seconds.

    python benchmarks/export.py [--size 512] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from centerpoint.export.formats import ExportOptions, export_bytes
from centerpoint.export.graph import ExportedDetector
from centerpoint.model import build_network, init, make_apply
from centerpoint.runtime.memory_format import channels_last
from centerpoint.spec_io import load_spec
from centerpoint.step import make_predict_step

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "centernet_r18_coco.yaml"
BATCHES = (1, 8)


def ways(size: int, threads: int) -> tuple[dict[str, Callable[[torch.Tensor], tuple]], dict[str, float]]:
    """{name: images -> (boxes, scores, labels) as numpy} and the seconds spent exporting."""
    import onnxruntime

    spec = load_spec(RECIPE, ["model.pretrained=null", "runtime.precision=fp32", "eval.flip_test=false"])
    params, buffers = init(spec.model, 0)
    net = build_network(spec.model).eval()
    net.load_state_dict({**params, **buffers})
    eager = make_predict_step(make_apply(build_network(spec.model), traced=False), spec)
    compiled = torch.compile(make_predict_step(make_apply(build_network(spec.model), traced=True), spec))
    cl_params = {k: channels_last(v) for k, v in params.items()} if spec.runtime.channels_last else params
    start = time.perf_counter()
    onnx = export_bytes(ExportedDetector(net, spec, decode=True), ExportOptions("onnx", size, None, True), {})
    export_s = time.perf_counter() - start
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])

    def torch_way(fn: Callable) -> Callable[[torch.Tensor], tuple]:
        def run(images: torch.Tensor) -> tuple:
            with torch.no_grad():
                return tuple(t.numpy() for t in fn(cl_params, buffers, images))
        return run

    return ({"eager": torch_way(eager), "compiled": torch_way(compiled),
             "onnxruntime": lambda images: tuple(session.run(None, {"images": images.numpy()}))},
            {"onnx_export_s": round(export_s, 1)})


def agree(a: tuple, b: tuple) -> bool:
    """Same detections: scores within 1e-4, boxes within 1e-3 px where the labels agree (ties may reorder)."""
    same = a[2] == b[2]
    return bool(np.abs(a[1] - b[1]).max() <= 1e-4 and same.mean() > 0.95
                and np.abs(a[0] - b[0])[same].max() <= 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs, result = ways(args.size, args.threads)
    result = {"bench": "export", "network": RECIPE.stem, "size": args.size, "threads": args.threads,
              "torch": torch.__version__, **result}
    rng = np.random.default_rng(0)
    images = {b: torch.from_numpy(rng.integers(0, 256, (b, 3, args.size, args.size), dtype=np.uint8))
              for b in BATCHES}
    times: dict[tuple[str, int], list[float]] = {}
    ok = True
    for b in BATCHES:  # warm-up (and compile) per batch size, checking the outputs against eager
        reference = runs["eager"](images[b])
        for name, run in runs.items():
            start = time.perf_counter()
            ok &= agree(run(images[b]), reference)
            if name == "compiled":
                result[f"compile_s_b{b}"] = round(time.perf_counter() - start, 1)
    for _ in range(args.rounds):  # interleaved, so drifting machine load hits every way alike
        for b in BATCHES:
            for name, run in runs.items():
                start = time.perf_counter()
                run(images[b])
                times.setdefault((name, b), []).append(time.perf_counter() - start)
    ms = {f"{name}_b{b}": round(statistics.median(t) / b * 1e3, 1) for (name, b), t in times.items()}
    result["ms_per_image"] = ms
    result["ratio_vs_eager"] = {key: round(ms[key.replace(key.split("_b")[0], "eager")] / v, 2)
                                for key, v in ms.items() if not key.startswith("eager")}
    result["agree"] = ok
    print(json.dumps(result))


if __name__ == "__main__":
    main()
