"""Object classes: their names and COCO category ids, read from a dataset's annotations, stored in every
checkpoint (metadata key `classes`) and matched between a checkpoint and the data it meets.

A model's label k (heatmap channel k) is the k-th category of its train annotations in the order of their
category ids. `Classes` records, per label, the category's name and id. Checkpoints written before the key
existed (and imported weights without class names) fall back to what their spec says (`classes_of`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from centerpoint.errors import CenterpointError
from centerpoint.spec import ExperimentSpec

if TYPE_CHECKING:
    from centerpoint.data.coco import CocoIndex

META_KEY = "classes"


@dataclass(frozen=True)
class Classes:
    """names[k], ids[k]: the name and COCO category id of model label k. `ids` is empty when unknown
    (weights imported with class names only)."""

    names: tuple[str, ...]
    ids: tuple[int, ...] = ()

    def to_json(self) -> str:
        """The checkpoint metadata value: {"names": [...], "ids": [...]}."""
        return json.dumps({"names": list(self.names), "ids": list(self.ids)})


def of_index(index: CocoIndex) -> Classes:
    """The classes of a dataset split, in label order."""
    return Classes(tuple(index.class_names), tuple(int(i) for i in index.cat_ids))


def from_meta(path: Path | str, meta: dict[str, str]) -> Classes | None:
    """The `classes` entry of a checkpoint's metadata (None when absent: an earlier version wrote it);
    anything but what `Classes.to_json` writes is an error naming the file."""
    text = meta.get(META_KEY)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    names = value.get("names") if isinstance(value, dict) else None
    ids = value.get("ids", []) if isinstance(value, dict) else None
    good = (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and isinstance(ids, list) and all(type(i) is int for i in ids) and len(ids) in (0, len(names)))
    if not good:
        raise CenterpointError(f"{path}: metadata 'classes' must be a JSON object with a list of names and a list "
                               f"of as many integer ids, got {text[:80]!r}; the file was not written by centerpoint "
                               "or is damaged")
    return Classes(tuple(names), tuple(ids))


def spec_classes(spec: ExperimentSpec) -> Classes:
    """What a spec says of its classes (for checkpoints without the `classes` key): the built-in dataset's
    names; the categories of its val json when that is at hand and has as many; else the labels' numbers."""
    n = spec.model.num_classes or 0
    if spec.data.dataset == "shapes":
        from centerpoint.data.synthetic import CLASSES

        if n == len(CLASSES):
            return Classes(CLASSES, tuple(range(1, n + 1)))
    elif spec.data.root is not None:
        from centerpoint.data.coco_json import load_coco

        try:
            coco = load_coco(Path(spec.data.root) / spec.data.val_ann)  # reads only
        except (CenterpointError, OSError):
            coco = None
        if coco is not None and len(coco.getCatIds()) == n:
            ids = tuple(sorted(coco.getCatIds()))
            return Classes(tuple(coco.cats[c]["name"] for c in ids), ids)
    return Classes(tuple(str(i) for i in range(n)))


class Checkpoint(Protocol):
    """What this module reads of a loaded `checkpoint.Checkpoint` (which imports this module)."""

    spec: ExperimentSpec
    classes: Classes | None


def checkpoint_classes(ckpt: Checkpoint) -> Classes:
    """The classes of a loaded checkpoint: its metadata, else what its spec says."""
    return ckpt.classes if ckpt.classes is not None else spec_classes(ckpt.spec)


def classes_of(ckpt: Checkpoint | Path | str) -> list[str]:
    """The class names of a checkpoint (a loaded one, or its file: only its header is read), in label
    order: `names[label]`."""
    if hasattr(ckpt, "tensors"):
        return list(checkpoint_classes(ckpt).names)
    from safetensors import safe_open

    from centerpoint.spec_io import spec_from_json

    path = Path(ckpt)
    if not path.is_file():
        raise CenterpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - any failure to parse foreign bytes: not a checkpoint
        raise CenterpointError(f"{path}: not a readable .safetensors checkpoint") from None
    if "spec" not in meta:
        raise CenterpointError(f"{path}: not a centerpoint checkpoint (no spec metadata)")
    classes = from_meta(path, meta)
    return list((classes or spec_classes(spec_from_json(meta["spec"], str(path)))).names)


def with_num_classes(spec: ExperimentSpec, index: CocoIndex) -> ExperimentSpec:
    """`spec` with model.num_classes set from the train split when it is null (the count of its categories)."""
    if spec.model.num_classes is not None:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"num_classes": index.num_classes})})


def _listed(names: tuple[str, ...], limit: int = 12) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"


def align(index: CocoIndex, classes: Classes, model: str) -> tuple[CocoIndex, bool]:
    """`index` (a split the model with `classes` is evaluated on) with labels, category ids and names in the
    model's label order; True when that needed a mapping by name (the same names in another order).

    Classes that differ by name are an error naming both lists (`model`: what the model's classes come from)."""
    data = tuple(index.class_names)
    if data == classes.names:
        return index, False
    if sorted(data) != sorted(classes.names) or len(set(data)) != len(data):
        raise CenterpointError(f"{index.ann_file}: its classes {_listed(data)} differ from the classes of {model} "
                               f"{_listed(classes.names)}; evaluate on data with the model's classes, or fine-tune "
                               "on this data (model.init_from)")
    to_model = np.array([classes.names.index(n) for n in data], dtype=np.int64)  # data label -> model label
    id_of = dict(zip(data, index.cat_ids, strict=True))
    return replace(index, labels=tuple(to_model[lab] for lab in index.labels),
                   cat_ids=tuple(id_of[n] for n in classes.names), class_names=classes.names), True
