"""Checkpoints: one self-describing .safetensors file per save, written atomically.

Tensors: `params.<name>`, `buffers.<name>`, `opt.<key>`, `scaler.<key>` (fp16 runs) and `step`.
Metadata (strings): `format_version`, `spec` (resolved spec JSON), `step`, `epoch` (epochs completed),
`batch_in_epoch` (batches of the current epoch already trained, for exact resume), `metrics` (JSON of the
latest evaluation), `data` (JSON of the data's identity, `data.coco.data_identity`; empty when unknown),
`run_id` (the run that wrote it: a run only replaces or deletes its own files), `classes` (JSON of the class
names and COCO category ids per label, `classes.Classes`; absent in files of earlier versions).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from centerpoint.atomic import atomic_path
from centerpoint.classes import Classes, from_meta
from centerpoint.errors import CenterpointError, first_line
from centerpoint.spec import ExperimentSpec, spec_from_json, spec_to_json
from centerpoint.step import TrainState
from centerpoint.tree import flatten, unflatten

FORMAT_VERSION = "1"
GROUPS = ("params", "buffers", "opt", "scaler")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the tensors (flat names, on cpu) and the decoded metadata."""

    path: Path
    tensors: dict[str, Tensor]
    spec: ExperimentSpec
    step: int
    epoch: int
    batch_in_epoch: int
    metrics: dict
    data: dict  # the identity of the data it was trained on ({} when unknown, e.g. imported weights)
    run_id: str = ""
    classes: Classes | None = None  # None: written before checkpoints recorded them (`classes.classes_of`)

    def group(self, name: str) -> dict[str, Tensor]:
        """Tensors of one group ('params', 'buffers', 'opt') without the prefix."""
        return unflatten({k: v for k, v in self.tensors.items() if k.startswith(name + ".")}, (name,))[name]


def state_tensors(state: TrainState) -> dict[str, Tensor]:
    """The flat tensor dict of a train state, contiguous and on cpu (safetensors needs both)."""
    flat = flatten({"params": state.params, "buffers": state.buffers, "opt": state.opt_state,
                    "scaler": state.scaler})
    flat["step"] = state.step
    return {k: v.detach().contiguous().cpu() for k, v in flat.items()}


def save_checkpoint(path: Path, state: TrainState, spec: ExperimentSpec, epoch: int, batch_in_epoch: int = 0,
                    metrics: dict | None = None, run_id: str = "", data: dict | None = None,
                    classes: Classes | None = None) -> Path:
    """Write `state` to `path` atomically (temp file, fsync, rename); refuses non-finite tensors.
    `run_id`: the run writing it; `data`: the identity of the data trained on (`data.coco.data_identity`),
    checked when resuming; `classes`: the model's class names and category ids."""
    tensors = state_tensors(state)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CenterpointError(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}")
    meta = {
        "format_version": FORMAT_VERSION,
        "spec": spec_to_json(spec),
        "step": str(int(state.step)),
        "epoch": str(epoch),
        "batch_in_epoch": str(batch_in_epoch),
        "metrics": json.dumps(metrics or {}),
        "data": json.dumps(data or {}),
        "run_id": run_id,
    }
    if classes is not None:
        meta["classes"] = classes.to_json()
    try:
        with atomic_path(path) as tmp:
            # Serialised here and written into our own temp file: safetensors' save_file would create a
            # second temp file of its own (left behind by a kill, and with mode 0600 instead of the umask).
            tmp.write_bytes(_serialize(tensors, meta))
    except OSError as err:
        raise CenterpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from None
    return path


def _serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes of a .safetensors file."""
    return save(tensors, metadata=metadata)


def remove_partial_writes(run_dir: Path) -> int:
    """Delete the temp files that killed checkpoint writes left in `run_dir/checkpoints`; returns how many.

    For the run's writer, holding the run directory's lock, before it starts. A temp file whose writer
    (the pid in its name) is still alive is left alone: it is another process's write in progress.
    """
    from centerpoint.atomic import writer_pid
    from centerpoint.rundir import alive

    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return 0
    removed = 0
    for path in ckpt_dir.glob(".*.safetensors.*.tmp"):
        pid = writer_pid(path)
        if pid is not None and pid != os.getpid() and alive(pid):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint file; a missing, truncated or foreign file gives a clear CenterpointError."""
    path = Path(path)
    if not path.is_file():
        raise CenterpointError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - any failure to parse foreign bytes: not a checkpoint
        raise CenterpointError(f"{path}: not a readable .safetensors checkpoint (truncated or another "
                               f"format?): {first_line(err)}") from None
    spec, step, epoch, batch_in_epoch, metrics, data = read_metadata(path, meta)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # save_checkpoint never writes these: a damaged or foreign file
        raise CenterpointError(f"{path}: non-finite values in {', '.join(bad[:3])}"
                               f"{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}; not a usable checkpoint")
    return Checkpoint(path, tensors, spec, step, epoch, batch_in_epoch, metrics, data, meta.get("run_id", ""),
                      from_meta(path, meta))


def read_metadata(path: Path, meta: dict[str, str]) -> tuple[ExperimentSpec, int, int, int, dict, dict]:
    """(spec, step, epoch, batch_in_epoch, metrics, data) of a checkpoint's metadata, checked as a whole: every
    field must be what `save_checkpoint` writes, else a CenterpointError names the file and the field."""
    if meta.get("format_version") != FORMAT_VERSION or "spec" not in meta:
        raise CenterpointError(f"{path}: not a centerpoint checkpoint (no format_version {FORMAT_VERSION} / "
                               "spec metadata); import foreign weights with `centerpoint checkpoint import`")
    counts = []
    for key in ("step", "epoch", "batch_in_epoch"):
        value = meta.get(key)
        if value is None or not value.isascii() or not value.isdigit():
            raise CenterpointError(f"{path}: metadata '{key}' must be a non-negative whole number, got {value!r}; "
                                   "the file was not written by centerpoint or is damaged")
        counts.append(int(value))
    try:
        metrics = json.loads(meta.get("metrics", "{}"))
    except ValueError:
        metrics = None
    numbers = isinstance(metrics, dict) and all(
        type(v) in (int, float) for k, v in metrics.items() if k in ("step", "epoch") or k.startswith("bbox_"))
    if not numbers:
        raise CenterpointError(f"{path}: metadata 'metrics' must be a JSON object of numbers, got "
                               f"{meta.get('metrics', '')[:80]!r}; the file was not written by centerpoint or "
                               "is damaged")
    try:
        data = json.loads(meta.get("data", "{}"))  # absent in checkpoints of earlier versions
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise CenterpointError(f"{path}: metadata 'data' must be a JSON object, got {meta.get('data', '')[:80]!r}; "
                               "the file was not written by centerpoint or is damaged")
    return spec_from_json(meta["spec"], str(path)), counts[0], counts[1], counts[2], metrics, data


def check_compatible(source: str, got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Raise naming the missing, unexpected and mis-shaped tensors of `got` against `expected`."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(got) & set(expected) if tuple(got[k].shape) != tuple(expected[k].shape))
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if names:
            extra = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            problems.append(f"{label}: {', '.join(names[:3])}{extra}")
    if shapes:
        k = shapes[0]
        problems.append(f"{k} is {tuple(got[k].shape)}, expected {tuple(expected[k].shape)}")
    if problems:
        raise CenterpointError(f"{source}: does not fit this model ({'; '.join(problems)})")


def restore_state(ckpt: Checkpoint, template: TrainState) -> TrainState:
    """A TrainState with the checkpoint's tensors, on the template's devices and dtypes."""
    expected = state_tensors(template)
    # The loss scaler exists only in fp16 runs: a run may switch precision at resume, and then starts a
    # fresh scaler (or drops the old one) instead of refusing the checkpoint.
    tensors = {k: v for k, v in ckpt.tensors.items() if not k.startswith("scaler.")}
    scaler = {k: v for k, v in ckpt.tensors.items() if k.startswith("scaler.")}
    check_compatible(str(ckpt.path), tensors, {k: v for k, v in expected.items() if not k.startswith("scaler.")})
    if template.scaler and sorted(scaler) == sorted(k for k in expected if k.startswith("scaler.")):
        tensors.update(scaler)
    groups = unflatten({k: v for k, v in tensors.items() if k != "step"}, GROUPS)

    def like(tree: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, Tensor]:
        # empty_like keeps the template's memory format (channels-last weights stay channels-last, so a
        # resumed run computes exactly what the uninterrupted one did). The template's key order, not the
        # file's (sorted): ranks that did not read the file broadcast and compare in that order.
        return {k: torch.empty_like(r).copy_(tree[k]) for k, r in ref.items()}

    return TrainState(like(groups["params"], template.params), like(groups["buffers"], template.buffers),
                      like(groups["opt"], template.opt_state), ckpt.tensors["step"].to(template.step.device),
                      like(groups["scaler"], template.scaler) if groups.get("scaler") else dict(template.scaler))


# Fields that fix the data order a checkpoint's position (epoch, batch_in_epoch) refers to.
RESUME_FIXED = ("train.seed", "train.batch_size", "data.dataset", "data.shapes_train", "data.shapes_seed")


def resume_position(ckpt: Checkpoint, spec: ExperimentSpec, steps_per_epoch: int, total_steps: int) -> int:
    """Steps the checkpoint's run had taken (skipped ones included), checked against this run's spec.

    Raises a CenterpointError when resuming cannot continue that run exactly: the spec changed a field
    that decides which batch comes next, or the run is set to stop before the checkpoint's step.
    """
    from centerpoint.spec import spec_to_dict

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


def header_position(meta: dict[str, str]) -> tuple[int, int, int] | None:
    """(updates applied, epochs completed, batches of the next epoch) recorded in a checkpoint header, in
    the order of training progress; None if the header does not hold them as numbers."""
    try:
        return int(meta["step"]), int(meta.get("epoch", 0)), int(meta.get("batch_in_epoch", 0))
    except (KeyError, ValueError):
        return None


def read_header(path: Path) -> dict[str, str] | None:
    """A checkpoint's metadata, read without its tensors; None if the file is not readable safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def run_dir_of(path: Path) -> Path:
    """The run directory a checkpoint file belongs to: the parent of its `checkpoints/` folder (else its
    own folder)."""
    parent = Path(path).parent
    return parent.parent if parent.name == "checkpoints" else parent


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest usable checkpoint of a run: the highest step (most recent file among equal steps); None
    when the run has no checkpoint files at all.

    Headers pick the order, so only the chosen file is loaded in full. Files whose header cannot be read
    (truncated, not safetensors) are skipped with a warning. A CenterpointError names every file and why
    when none is usable, and when the newest one is readable but unusable (e.g. written by a newer version):
    silently going back to an older state would then overwrite the newer one."""
    from centerpoint.errors import warn

    ckpt_dir = Path(run_dir) / "checkpoints"
    files = sorted(ckpt_dir.glob("*.safetensors")) if ckpt_dir.is_dir() else []
    if not files:
        return None
    ranked, skipped, unusable = [], [], []
    for path in files:
        meta = read_header(path)
        position = header_position(meta) if meta is not None else None
        if position is None:
            skipped.append(f"{path}: header cannot be read (truncated or not a checkpoint)")
        else:
            ranked.append((position, path.stat().st_mtime, path))
    for _, _, path in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True):
        try:
            ckpt = load_checkpoint(path)
        except CenterpointError as err:
            unusable.append(str(err))
            continue
        if unusable:
            raise CenterpointError(f"--resume: the newest checkpoint cannot be used ({'; '.join(unusable)}); "
                                   f"resume from an older one with --resume FILE (e.g. --resume {path}), or "
                                   "use the centerpoint version that wrote it")
        for problem in skipped:
            warn(f"--resume: skipping unreadable checkpoint {problem}")
        return ckpt
    raise CenterpointError(f"--resume: no usable checkpoint in {ckpt_dir}: {'; '.join(unusable + skipped)}; resume "
                           "with the centerpoint version that wrote them, or train afresh into another --workdir")
