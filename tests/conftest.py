"""Shared fixtures: a tiny synthetic dataset in a per-session cache, small spec overrides."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Small, fast settings for end-to-end runs (R18 at 64x64 on a few images).
TINY = [
    "data.shapes_train=24", "data.shapes_val=8", "data.input_size=64", "data.test_size=64", "data.workers=0",
    "train.batch_size=8", "eval.batch_size=8", "train.log_every=1", "logging.progress=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["CENTERPOINT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir: Path) -> list[str]:
    return list(TINY)


def write_box_coco(root: Path, count: int, seed: int, suffix: str,
                   draw: Callable[[np.random.Generator, int, int], Image.Image]) -> tuple[Path, Path]:
    """A small COCO set under `root`: `count` images of 72x96 / 120x80 pixels made by `draw(rng, w, h)`,
    three 25x20 boxes each over 3 classes; returns (annotation file, image dir)."""
    (root / "img").mkdir()
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(count):
        w, h = (120, 80) if i % 2 else (72, 96)
        draw(rng, w, h).save(root / "img" / f"{i}{suffix}")
        images.append({"id": i + 1, "file_name": f"{i}{suffix}", "width": w, "height": h})
        for j in range(3):
            x, y = rng.uniform(0, w - 30), rng.uniform(0, h - 30)
            anns.append({"id": 3 * i + j + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 4)),
                         "bbox": [x, y, 25.0, 20.0], "area": 500.0, "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "ann.json", root / "img"


def call_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the real CLI entry point (`cli.main.main`, as the `centerpoint` script does) in this process;
    returns (exit code, stdout, stderr). Restores what `main` installs process-wide (signal handlers,
    the warnings printer)."""
    import signal
    import sys
    import warnings

    from cli.main import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    show, argv = warnings.showwarning, sys.argv
    capsys.readouterr()
    sys.argv = ["centerpoint", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv, warnings.showwarning = argv, show
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    return code, out, err
