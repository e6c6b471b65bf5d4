"""Checkpoints: one self-describing .safetensors file per save, written atomically.

Tensors: the flat train state (`state.flatten_state`): `params.<name>`, `buffers.<name>`, `opt.<key>`,
`scaler.<key>` (fp16 runs), `ema.<name>` (train.ema_decay: the weights eval and predict use) and `step`.
Format 2 names optimizer state by role (`opt.adam.mu.<name>`, `opt.sgd.momentum.<name>`, `opt.lr.count`,
...); format 1 by chain position (`opt.1.adam.mu.<name>`, `opt.2.trace.<name>`, `opt.3.count`), which
loading renames (`upgrade_tensors`).
Metadata (strings): `format_version`, `spec` (resolved spec JSON), `step`, `epoch` (epochs completed),
`batch_in_epoch` (batches of the current epoch already trained, for exact resume), `metrics` (JSON of the
latest evaluation), `data` (JSON of the data's identity, `data.coco.data_identity`; empty when unknown),
`run_id` (the run that wrote it: a run only replaces or deletes its own files), `classes` (JSON of the class
names and COCO category ids per label, `classes.Classes`; absent in files of earlier versions).

Which files a run writes and keeps is the `Checkpointer`'s: `latest`, periodic `epoch_NNNN` (the newest
`train.keep_last`) and `best` (highest bbox_mAP). Ranking and ownership are read from each file's metadata
(never from file names or a side file that could disagree), and a run replaces or deletes only files with
its own id. (Longer than most modules: the rules over a run's files are written in terms of the metadata
the format defines, and read with it.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from centerpoint.cadence import epoch_of, itstime
from centerpoint.classes import Classes, from_meta
from centerpoint.errors import CenterpointError, first_line, warn
from centerpoint.io.atomic import atomic_path
from centerpoint.spec import ExperimentSpec
from centerpoint.spec_io import spec_from_json, spec_to_json
from centerpoint.state import TrainState, flatten_state, unflatten, unflatten_state

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", FORMAT_VERSION)


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
    return {k: v.detach().contiguous().cpu() for k, v in flatten_state(state).items()}


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
        "step": str(int(state.step.max())),  # a replicated state's (K,) counts: the furthest replica's
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
    tensors = upgrade_tensors(tensors, meta["format_version"])
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # save_checkpoint never writes these: a damaged or foreign file
        raise CenterpointError(f"{path}: non-finite values in {', '.join(bad[:3])}"
                               f"{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}; not a usable checkpoint")
    return Checkpoint(path, tensors, spec, step, epoch, batch_in_epoch, metrics, data, meta.get("run_id", ""),
                      from_meta(path, meta))


def read_metadata(path: Path, meta: dict[str, str]) -> tuple[ExperimentSpec, int, int, int, dict, dict]:
    """(spec, step, epoch, batch_in_epoch, metrics, data) of a checkpoint's metadata, checked as a whole: every
    field must be what `save_checkpoint` writes, else a CenterpointError names the file and the field."""
    if meta.get("format_version") not in READABLE_VERSIONS or "spec" not in meta:
        raise CenterpointError(f"{path}: not a centerpoint checkpoint (no format_version "
                               f"{' or '.join(READABLE_VERSIONS)} / spec metadata); import foreign weights with "
                               "`centerpoint checkpoint import`")
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


def upgrade_tensors(tensors: dict[str, Tensor], version: str) -> dict[str, Tensor]:
    """A checkpoint's tensors in the current format. Format 1 keyed the optimizer state of the built-in
    optimizers (a chain of clip, decay or Adam, momentum or Adam, lr) by position: `opt.<i>.trace.<name>`
    was SGD's momentum, `opt.<i>.adam.*` Adam's moments, `opt.3.count` the lr schedule's count (the last
    element) and any other `opt.<i>.count` Adam's."""
    if version == FORMAT_VERSION:
        return tensors

    def renamed(key: str) -> str:
        if not key.startswith("opt."):
            return key
        position, _, rest = key[len("opt."):].partition(".")
        if rest.startswith("trace."):
            return "opt.sgd.momentum." + rest[len("trace."):]
        if rest == "count":
            return "opt.lr.count" if position == "3" else "opt.adam.count"
        return "opt." + rest  # adam.mu.<name>, adam.nu.<name>

    return {renamed(k): v for k, v in tensors.items()}


def require_single_model(ckpt: Checkpoint, use: str) -> None:
    """Refuse a replicated run's checkpoint (its tensors hold K models) where one model is expected."""
    if (k := ckpt.spec.train.replicas) > 1:
        raise CenterpointError(f"{ckpt.path}: holds the {k} replicas of a replicated run; {use} needs one model: "
                               f"`centerpoint checkpoint extract {ckpt.path} OUT.safetensors --replica I` writes one")


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
    """A TrainState with the checkpoint's tensors, on the template's devices and dtypes.

    A run may switch the fp16 loss scaler (precision) or the EMA (train.ema_decay) on or off at resume: a
    group the checkpoint lacks starts afresh (the template's new scaler; an EMA copied from the checkpoint's
    weights, with a warning, as mmengine's EMAHook does), one the run does not keep is dropped."""
    expected, optional = state_tensors(template), ("scaler.", "ema.")
    loaded = {k: v for k, v in ckpt.tensors.items() if not k.startswith(optional)}
    check_compatible(str(ckpt.path), loaded, {k: v for k, v in expected.items() if not k.startswith(optional)})
    for prefix in optional:
        got = {k: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
        want = [k for k in expected if k.startswith(prefix)]
        if sorted(got) != sorted(want) and prefix == "ema." and want:
            warn(f"{ckpt.path} holds no EMA of these weights: train.ema_decay starts its average from them")
            got = {k: loaded.get("params" + k[3:], loaded.get("buffers" + k[3:])) for k in want}
        elif sorted(got) != sorted(want):
            got = {k: expected[k] for k in want}  # the template's new scaler, or none
        loaded.update(got)
    # empty_like keeps the template's memory format (channels-last weights stay channels-last, so a resumed
    # run computes exactly what the uninterrupted one did). The template's key order, not the file's
    # (sorted): ranks that did not read the file broadcast and compare in that order.
    return unflatten_state({k: torch.empty_like(r).copy_(loaded[k]) for k, r in flatten_state(template).items()})


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


# --- a run's files: ownership, retention, best ---------------------------------------------------------

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


def best_map(ckpt_dir: Path, run_id: str) -> float:
    """bbox_mAP stored in this run's `best` checkpoint (-1 if there is none)."""
    meta = read_header(ckpt_dir / "best.safetensors")
    if meta is None or meta.get("run_id", "") != run_id:
        return -1.0
    try:
        return float(json.loads(meta.get("metrics", "{}")).get("bbox_mAP", -1.0))
    except (ValueError, TypeError, AttributeError):
        return -1.0


@dataclass(frozen=True)
class Checkpointer:
    """The checkpoints of one run, in `directory` (`<workdir>/checkpoints`), written by rank 0:

    - `latest` every `train.checkpoint_every_steps` steps, at the end of every epoch, and where the run
      stops (`save_latest`);
    - `epoch_NNNN` every `train.checkpoint_every` epochs and at the last step, keeping this run's newest
      `train.keep_last` of them;
    - `best` whenever an evaluation beats the bbox_mAP stored in this run's `best`.

    Steps are global steps taken (skipped non-finite ones included); each file records its position as
    (epochs completed, batches of the next epoch), the step's `divmod` by the epoch's steps."""

    directory: Path
    spec: ExperimentSpec
    run_id: str
    data: dict  # the data's identity (`data.coco.data_identity`), checked when resuming
    steps_per_epoch: int
    total_steps: int
    classes: Classes | None = None  # the model's class names and category ids, recorded in every file

    def latest_due(self, step: int) -> bool:
        """Whether `save` writes `latest` after `step`."""
        return (itstime(step, self.spec.train.checkpoint_every_steps, self.total_steps)
                or itstime(step, self.steps_per_epoch, self.total_steps))

    def save(self, state: TrainState, step: int, metrics: dict) -> bool:
        """Write what is due after `step` (`metrics`: that step's evaluation, {} if none); returns whether
        `latest` was written."""
        if not self.latest_due(step):
            return False
        self._write("latest", state, step, metrics)
        every_epochs = self.spec.train.checkpoint_every
        if itstime(step, every_epochs and every_epochs * self.steps_per_epoch, self.total_steps):
            self._write(f"epoch_{epoch_of(step, self.steps_per_epoch):04d}", state, step, metrics)
            periodic = own_checkpoints(self.directory, "epoch_*.safetensors", self.run_id)
            for _, old in periodic[: -self.spec.train.keep_last]:
                old.unlink(missing_ok=True)
        if "bbox_mAP" in metrics and metrics["bbox_mAP"] > best_map(self.directory, self.run_id):
            self._write("best", state, step, metrics)
        return True

    def save_latest(self, state: TrainState, step: int) -> None:
        """`latest` after `step`, without an evaluation (a run stopping between its regular saves)."""
        self._write("latest", state, step, {})

    def _write(self, name: str, state: TrainState, step: int, metrics: dict) -> None:
        epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
        save_own(self.directory / f"{name}.safetensors", state, self.spec, epoch, batch_in_epoch, metrics,
                 self.run_id, self.data, self.classes)
