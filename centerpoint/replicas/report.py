"""What a replicated run reports: per-replica log values and TensorBoard runs, one metrics.jsonl row per
replica and evaluation, and the summary over replicas (mean, std, min, max of each COCO metric)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.progress import Progress
from torch import Tensor

from centerpoint.evaluation.evaluate import evaluate
from centerpoint.io.monitor import ImageCounter, TensorBoard, append_metrics
from centerpoint.optim.ema import with_ema
from centerpoint.replicas.settings import Replica, replica_tree
from centerpoint.state import TrainState

if TYPE_CHECKING:
    from centerpoint.run import Run

SUMMARY_KEYS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75")


def per_replica(values: dict[str, Tensor | float]) -> list[dict[str, float]]:
    """Log values with (K,) tensors -> one dict of floats per replica (0-dim and float values shared); a
    single run's 0-dim values -> one dict."""
    k = max((v.numel() for v in values.values() if isinstance(v, Tensor) and v.dim() == 1), default=1)
    out: list[dict[str, float]] = [{} for _ in range(k)]
    for key, v in values.items():
        flat = v.detach().double().reshape(-1).tolist() if isinstance(v, Tensor) else [float(v)]
        for i in range(k):
            out[i][key] = flat[i if len(flat) == k else 0]
    return out


def mean_row(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each key over the rows (a single row: itself)."""
    return rows[0] if len(rows) == 1 else {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample, n - 1; 0 for one value), min, max."""
    n, mean = len(values), sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


class ReplicaBoards:
    """One TensorBoard run per replica, `<workdir>/tensorboard/replica_<i>` (none when TensorBoard is off)."""

    def __init__(self, workdir: Path, replicas: Sequence[Replica], enabled: bool) -> None:
        self.boards = [TensorBoard(workdir / "tensorboard" / f"replica_{r.index}" if enabled else None)
                       for r in replicas]

    def scalars(self, rows: Sequence[dict[str, float]], step: int, prefix: str) -> None:
        if len(rows) == len(self.boards):
            for board, row in zip(self.boards, rows, strict=True):
                board.scalars(row, step, prefix)

    def close(self) -> None:
        for board in self.boards:
            board.close()


def evaluate_replicas(run: Run, state: TrainState, step: int, epoch: int, boards: ReplicaBoards,
                      say: Callable[[str], object], extra: dict, progress: Progress, workers: int | None) -> dict:
    """Evaluate every replica after `step` (its EMA weights with train.ema_decay; each with an eval bar on
    `progress`): one metrics.jsonl row each (with `replica`, its init seed and hyperparameters, and `extra`),
    its TensorBoard run's `val` scalars, a console line of the spread. Returns (rank 0) the record of the
    whole: each COCO metric's mean over replicas, `<key>_std`, `_min`, `_max` for the summary keys, and
    `replicas` (the per-replica rows); {} on other ranks."""
    rows = []
    for r in run.replicas:
        t0 = time.perf_counter()
        weights = with_ema(*(replica_tree(tree, r.index) for tree in (state.params, state.buffers, state.ema)))
        with ImageCounter(progress, f"eval replica {r.index}") as counter:
            record, _ = evaluate(run.predict_fn, *weights, run.val_index, run.spec, run.backend, run.dist, counter,
                                 workers=workers)
        if run.dist.rank != 0:
            continue
        row = {**r.describe(), "weights": "ema" if state.ema else "raw", "step": step, "epoch": epoch,
               **{k: v for k, v in record.items() if isinstance(v, (int, float))},
               "eval_s": time.perf_counter() - t0, **extra}
        append_metrics(run.workdir / "metrics.jsonl", row)
        boards.boards[r.index].scalars({k: v for k, v in row.items() if k.startswith("bbox_")}, step, "val")
        rows.append(row)
    if run.dist.rank != 0:
        return {}
    whole = {k: sum(row[k] for row in rows) / len(rows) for k in rows[0] if k.startswith("bbox_")}
    for key in SUMMARY_KEYS:
        whole.update({f"{key}_{name}": v for name, v in spread([row[key] for row in rows]).items() if name != "mean"})
    s = spread([row["bbox_mAP"] for row in rows])
    say(f"epoch {epoch}: bbox_mAP {s['mean']:.3f} +- {s['std']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}) over "
        f"{len(rows)} replicas")
    return {**whole, "step": step, "epoch": epoch, "replicas": rows}


def summary_table(record: dict) -> str:
    """The end-of-run table: one line per replica (init seed, lr, weight decay, its mAPs), then the mean
    +- std, min and max over replicas."""
    rows = record["replicas"]
    head = f"{'replica':>7} {'init_seed':>9} {'lr':>9} {'wd':>9} " + " ".join(f"{k:>11}" for k in SUMMARY_KEYS)
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(f"{row['replica']:>7} {row['init_seed']:>9} {row['lr']:>9.3g} {row['weight_decay']:>9.3g} "
                     + " ".join(f"{row[k]:>11.4f}" for k in SUMMARY_KEYS))
    lines.append("-" * len(head))
    for name in ("mean", "std", "min", "max"):
        cells = [spread([row[k] for row in rows])[name] for k in SUMMARY_KEYS]
        lines.append(f"{name:>7} {'':>9} {'':>9} {'':>9} " + " ".join(f"{c:>11.4f}" for c in cells))
    s = spread([row["bbox_mAP"] for row in rows])
    lines.append(f"bbox_mAP {s['mean']:.4f} +- {s['std']:.4f} over {len(rows)} replicas (std: sample, n - 1)")
    return "\n".join(lines)
