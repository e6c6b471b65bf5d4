"""A checkpoint whose network gives detections like a trained one's, made in a second without training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from centerpoint.checkpoint import save_checkpoint
from centerpoint.model import init
from centerpoint.optim.plan import build_optimizer
from centerpoint.spec_io import load_spec
from centerpoint.state import init_state

# The built-in network at 64 px, fp32 (the precision an exported graph computes in).
SMALL = ["data.input_size=64", "data.test_size=64", "runtime.precision=fp32", "eval.batch_size=4"]


def write_checkpoint(path: Path, *overrides: str) -> Path:
    """The built-in spec with `overrides`, seed-0 weights whose last head layers are scaled so that heatmap
    logits spread over several units (distinct peak scores, no near-ties in the top-k order) and boxes span
    tens of pixels: what a comparison of detections needs to be able to fail."""
    spec = load_spec(None, [*SMALL, *overrides])
    params, buffers = init(spec.model, 0)
    params["bbox_head.heatmap_head.2.weight"] = params["bbox_head.heatmap_head.2.weight"] * 3
    params["bbox_head.wh_head.2.weight"] = params["bbox_head.wh_head.2.weight"] * 3000
    params["bbox_head.wh_head.2.bias"] = torch.full((2,), 4.0)
    params["bbox_head.offset_head.2.weight"] = params["bbox_head.offset_head.2.weight"] * 300
    state = init_state(params, buffers, build_optimizer(spec, 3, 8).transform)
    return save_checkpoint(path, state, spec, epoch=1)


def photos(folder: Path, sizes: tuple[tuple[int, int], ...] = ((70, 50), (96, 64), (40, 80))) -> list[Path]:
    """JPEGs of the given (width, height): noise with a few coloured rectangles."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (w, h) in enumerate(sizes):
        img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        for _ in range(3):
            x, y = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
            img[y:y + int(rng.integers(8, 30)), x:x + int(rng.integers(8, 30))] = rng.integers(120, 255, 3)
        files.append(folder / f"photo{i + 1}.jpg")
        Image.fromarray(img).save(files[-1], quality=95)
    return files
