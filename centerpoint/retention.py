"""Which checkpoints a run writes and keeps: `latest`, periodic `epoch_NNNN` (the newest `keep_last` of them)
and `best` (highest bbox_mAP).

Every file carries its run's id and position in its metadata. Ranking reads them from there (never from
file names or a side file that could disagree), and a run replaces or deletes only files with its own id.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from centerpoint.checkpoint import (
    Checkpoint,
    header_position,
    latest_checkpoint,
    load_checkpoint,
    read_header,
    save_checkpoint,
)
from centerpoint.classes import Classes
from centerpoint.errors import CenterpointError
from centerpoint.spec import ExperimentSpec
from centerpoint.step import TrainState


def _position(meta: dict[str, str]) -> tuple[int, int, int]:
    return header_position(meta) or (-1, -1, -1)


def save_own(path: Path, state: TrainState, spec: ExperimentSpec, epoch: int, batch_in_epoch: int,
             metrics: dict | None, run_id: str, data: dict | None = None, classes: Classes | None = None) -> Path:
    """`save_checkpoint`, refusing to replace a checkpoint that another run wrote."""
    if path.exists():
        meta = read_header(path)
        if meta is not None and meta.get("run_id", "") != run_id:
            raise CenterpointError(f"refusing to replace {path}: another run wrote it; train into another --workdir")
    return save_checkpoint(path, state, spec, epoch, batch_in_epoch, metrics, run_id, data, classes)


def own_checkpoints(ckpt_dir: Path, pattern: str, run_id: str) -> list[tuple[tuple[int, int, int], Path]]:
    """(position, path) of this run's files matching `pattern`, oldest first."""
    found = []
    for path in ckpt_dir.glob(pattern):
        meta = read_header(path)
        if meta is not None and meta.get("run_id", "") == run_id:
            found.append((_position(meta), path))
    return sorted(found)


def check_resume_dir(run_dir: Path, run_id: str, position: tuple[int, int, int], source: Path) -> None:
    """Before a run resumed from `source` writes into `run_dir`: every checkpoint there must be this run's
    and none newer than `source` (continuing would replace them)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    for path in sorted(ckpt_dir.glob("*.safetensors")) if ckpt_dir.is_dir() else []:
        meta = read_header(path)
        if meta is None:
            continue
        if meta.get("run_id", "") != run_id:
            raise CenterpointError(f"--resume: {path} belongs to another run than {source}; resume into that run's "
                                   "own directory or an empty --workdir")
        if _position(meta) > position:
            raise CenterpointError(f"--resume: {path} is newer (step {meta.get('step')}) than {source}; resuming "
                                   "from the older file would replace it: pass another --workdir")


def resume_checkpoint(run_dir: Path, resume_from: Path | None, say: Callable[[str], object]) -> Checkpoint | None:
    """The checkpoint a resumed run continues from: `resume_from`, else the run directory's newest usable one
    (None, said with `say`, when the run has none: it starts fresh); checked against the directory's files."""
    if resume_from is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            say(f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'}; starting fresh")
            return None
    else:
        ckpt = load_checkpoint(resume_from)
    position = header_position(read_header(ckpt.path) or {}) or (ckpt.step, ckpt.epoch, ckpt.batch_in_epoch)
    check_resume_dir(run_dir, ckpt.run_id, position, ckpt.path)
    return ckpt


def best_map(ckpt_dir: Path, run_id: str) -> float:
    """bbox_mAP stored in this run's `best` checkpoint (-1 if there is none)."""
    import json

    meta = read_header(ckpt_dir / "best.safetensors")
    if meta is None or meta.get("run_id", "") != run_id:
        return -1.0
    try:
        value = json.loads(meta.get("metrics", "{}")).get("bbox_mAP", -1.0)
        return float(value)
    except (ValueError, TypeError, AttributeError):
        return -1.0


def save_epoch(workdir: Path, state: TrainState, spec: ExperimentSpec, epoch: int, metrics: dict, last: bool,
               position: tuple[int, int] | None, run_id: str, data: dict | None = None,
               classes: Classes | None = None) -> None:
    """latest (always), epoch_N every checkpoint_every epochs (keeping the newest keep_last), best by bbox_mAP.

    `position`: (epochs completed, batches of the next one done) stored for resuming; (epoch, 0) unless
    the run stopped inside an epoch (train.max_steps)."""
    ckpt_dir = workdir / "checkpoints"
    at_epoch, at_batch = position or (epoch, 0)
    save_own(ckpt_dir / "latest.safetensors", state, spec, at_epoch, at_batch, metrics, run_id, data, classes)
    every = spec.train.checkpoint_every
    if (every and epoch % every == 0) or last:
        save_own(ckpt_dir / f"epoch_{epoch:04d}.safetensors", state, spec, at_epoch, at_batch, metrics, run_id, data,
                 classes)
        periodic = own_checkpoints(ckpt_dir, "epoch_*.safetensors", run_id)
        for _, old in periodic[: -spec.train.keep_last]:
            old.unlink(missing_ok=True)
    if "bbox_mAP" in metrics and metrics["bbox_mAP"] > best_map(ckpt_dir, run_id):
        save_own(ckpt_dir / "best.safetensors", state, spec, at_epoch, at_batch, metrics, run_id, data, classes)
