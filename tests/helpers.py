"""What the tests share: the real CLI (in a subprocess, or in this process), a local HTTP server on 127.0.0.1,
and writers of tiny COCO datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


# --- the CLI ----------------------------------------------------------------------------------------------

def cli_env(env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a CLI subprocess runs in: this checkout's code, one math thread (the machines running
    the suite are small), lines wide enough that rich never wraps an error message."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "1000", **(env_extra or {})}


def run_cli(*args: str, env_extra: dict[str, str] | None = None, cwd: Path = ROOT,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m centerpoint ARGS` in a subprocess, as a user runs it; output captured as text."""
    return subprocess.run([sys.executable, "-m", "centerpoint", *args], capture_output=True, text=True,
                          env=cli_env(env_extra), cwd=cwd, timeout=timeout)


class CliResult(NamedTuple):
    """What a command left: its exit code and its output (the fields `subprocess.CompletedProcess` has)."""

    returncode: int
    stdout: str
    stderr: str


def call_cli(*args: str) -> CliResult:
    """The real CLI entry point (`cli.main.main`, as the `centerpoint` script runs it) in this process, its
    output captured by Typer's CliRunner: the exit codes and error lines of a subprocess without starting
    Python. Restores what `main` installs process-wide (signal handlers, the warnings printer)."""
    import signal
    import warnings

    from typer.testing import CliRunner

    from cli.main import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    show, argv = warnings.showwarning, sys.argv
    sys.argv = ["centerpoint", *args]
    code = 0
    try:
        with CliRunner().isolation(env={"COLUMNS": "1000"}) as (out, err, _):
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    finally:
        sys.argv, warnings.showwarning = argv, show
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return CliResult(code, stdout, stderr)


# --- a local HTTP server ----------------------------------------------------------------------------------

@contextmanager
def serve(handler: Callable[..., BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler` in a thread; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class _Files(SimpleHTTPRequestHandler):
    """Serves a directory, records each GET's path, logs nothing."""

    requests: list[str]

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
        pass


@contextmanager
def serve_dir(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """The files under `directory` over HTTP on 127.0.0.1; yields (base URL, the paths requested so far)."""
    requests: list[str] = []
    handler = type("Files", (_Files,), {"requests": requests})
    with serve(lambda *a: handler(*a, directory=str(directory))) as url:
        yield url, requests


# --- tiny COCO datasets -----------------------------------------------------------------------------------

def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    """A COCO annotation file at `path` (its directory created) from its three lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


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
    return write_coco(root / "ann.json", images, anns, cats), root / "img"


def write_user_coco(root: Path, classes: int = 3, train: int = 16, val: int = 8) -> Path:
    """A COCO layout as users have it: annotations/instances_{train,val}.json, train/, val/ (PNG images,
    noise with a bright rectangle per box)."""
    rng = np.random.default_rng(0)
    cats = [{"id": c + 1, "name": f"thing{c}"} for c in range(classes)]
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(count):
            w, h = (96, 64) if i % 2 else (64, 80)
            pixels = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
            x, y = int(rng.integers(0, w - 24)), int(rng.integers(0, h - 24))
            pixels[y:y + 20, x:x + 20] = 230
            Image.fromarray(pixels).save(root / split / f"img{i:03d}.png")
            images.append({"id": 100 + i, "file_name": f"img{i:03d}.png", "width": w, "height": h})
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": i % classes + 1,
                         "bbox": [x, y, 20, 20], "area": 400, "iscrowd": 0})
        write_coco(root / "annotations" / f"instances_{split}.json", images, anns, cats)
    return root
