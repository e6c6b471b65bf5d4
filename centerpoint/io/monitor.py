"""Progress bars (the project's one factory of them), TensorBoard scalars/images and the run's metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from centerpoint.io.atomic import atomic_write_text


def make_progress(console: Console | None = None, enabled: bool = True, *, transfer: bool = False,
                  transient: bool = False) -> Progress:
    """A rich progress display.

    By default one for counted steps, with a free-text `info` field (give each task `info=`) for loss and
    speed, shown on `console` (default: stdout) while `enabled` and left standing when it ends
    (`transient`: removed). Only on a terminal: in a piped log rich would print each bar's last state, so
    the callers write plain lines there instead.

    transfer=True: one for bytes (size, speed, time left), on stderr so stdout keeps the command's own
    output, shown only on an interactive terminal (elsewhere rich would end it with an empty line) and
    transient: it vanishes when done, so a failure leaves its one `error:` line alone. `console` is
    ignored then.
    """
    if transfer:
        console = Console(stderr=True)
        return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=console, disable=not (enabled and console.is_interactive),
                        transient=True)
    console = console or Console()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not (enabled and console.is_terminal), transient=transient,
    )


class ImageCounter:
    """An evaluation's or predict's progress callback, called with (images just done, images in all): first
    with (0, total) once the model is ready (`evaluate.predict_split`, `predict.predict_files`), then after
    each batch. A `description` task on `progress`, added at the first call, shows the images/s since
    then (loading the model is not counted; starting the loader's workers is). `remove()`, or leaving a
    `with ImageCounter(...)` block, takes the task off the display (a training run's evaluation leaves only
    the train bar standing)."""

    def __init__(self, progress: Progress, description: str) -> None:
        self.progress, self.description = progress, description
        self.task: TaskID | None = None
        self.done, self.t0 = 0, time.perf_counter()

    def __call__(self, images: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total, info="")
            self.t0 = time.perf_counter()
        self.done += images
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(self.task, advance=images, info=f"{rate:.1f} img/s" if self.done else "")

    def remove(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def __enter__(self) -> ImageCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object to metrics.jsonl, rewriting the file atomically (it stays small)."""
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(record) + "\n")

class TensorBoard:
    """A SummaryWriter that is a no-op when disabled (so callers need no branches)."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and np.isfinite(v):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def evaluation(self, index: Any, rows: np.ndarray, metrics: dict, curves: dict, step: int, spec: Any) -> None:
        """An evaluation's pictures, per-class AP, time and PR curves (`visualize.log_evaluation`)."""
        if self.writer is not None:
            from centerpoint.evaluation.visualize import log_evaluation

            log_evaluation(self.writer, index, rows, metrics, curves, step, spec.eval.num_visualize,
                           spec.data.max_image_pixels)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class Throughput:
    """Images/s and data-wait time over the steps since the last read."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0
        self.wait = 0.0
        self.steps = 0

    def add(self, images: int, wait_s: float) -> None:
        self.images += images
        self.wait += wait_s
        self.steps += 1

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"img_per_s": self.images / dt, "data_wait_s": self.wait / max(self.steps, 1)}
        self.reset()
        return out
