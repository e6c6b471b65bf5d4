"""Where a resumed run continues from: the checkpoint chosen (`--resume`: the run directory's newest usable
one; `--resume FILE`: that file), checked against the run directory's other files, this run's spec and its
data; and the global step it continues after."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from centerpoint.checkpoint import Checkpoint, header_position, latest_checkpoint, load_checkpoint, read_header
from centerpoint.errors import CenterpointError
from centerpoint.spec import ExperimentSpec


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
        if (header_position(meta) or (-1, -1, -1)) > position:
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


# Fields that fix the data order a checkpoint's position refers to.
RESUME_FIXED = ("train.seed", "train.batch_size", "data.dataset", "data.shapes_train", "data.shapes_seed")


def resume_step(ckpt: Checkpoint, spec: ExperimentSpec, steps_per_epoch: int, total_steps: int) -> int:
    """Global steps the checkpoint's run had taken (skipped ones included), from its (epoch, batch_in_epoch)
    metadata, checked against this run's spec.

    Raises a CenterpointError when resuming cannot continue that run exactly: the spec changed a field
    that decides which batch comes next, or the run is set to stop before the checkpoint's step.
    """
    from centerpoint.spec_io import spec_to_dict

    def get(data: dict, key: str) -> object:
        for part in key.split("."):
            data = data[part]
        return data

    old, new = spec_to_dict(ckpt.spec), spec_to_dict(spec)
    changed = [f"{k} {get(old, k)} -> {get(new, k)}" for k in RESUME_FIXED if get(old, k) != get(new, k)]
    if changed:
        raise CenterpointError(f"--resume: {ckpt.path} was trained with other data settings ({'; '.join(changed)}); "
                               "resume with the same values or train into a new --workdir")
    if ckpt.batch_in_epoch > steps_per_epoch:
        raise CenterpointError(f"--resume: {ckpt.path} stopped at batch {ckpt.batch_in_epoch} of an epoch, but an "
                               f"epoch now has {steps_per_epoch}: the train set changed; use a new --workdir")
    done = ckpt.epoch * steps_per_epoch + ckpt.batch_in_epoch
    if done > total_steps:
        raise CenterpointError(f"--resume: {ckpt.path} has already trained {done} steps, more than the {total_steps} "
                               "this run is set to (train.max_steps / train.epochs); raise them to continue")
    return done


def check_same_data(ckpt: Checkpoint, data: dict) -> None:
    """Refuse to resume `ckpt` on data other than it was trained on (`data.coco.data_identity`): another
    dataset root, edited annotations, a different number of usable images. A checkpoint that does not
    record its data (written by an earlier version) is not checked."""
    if not ckpt.data or ckpt.data == data:
        return
    changed = [f"{split} {key} {ckpt.data.get(split, {}).get(key)!r} -> {now!r}"
               for split, fields in data.items() for key, now in fields.items()
               if ckpt.data.get(split, {}).get(key) != now]
    raise CenterpointError(f"--resume: {ckpt.path} was trained on other data ({'; '.join(changed[:3])}); resume "
                           "with the same dataset or train into a new --workdir")
