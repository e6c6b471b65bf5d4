"""Where a spec's dataset is: the synthetic set's folder (generated there if needed) or the COCO root, and
each split indexed and checked against the model's class count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from centerpoint.data.coco import CocoIndex, load_index
from centerpoint.errors import CenterpointError
from centerpoint.spec import ExperimentSpec


def shapes_root(spec: ExperimentSpec) -> Path:
    """Where dataset=shapes lives: `data.root`, or by default a folder of the cache directory named for its
    seed and counts."""
    from centerpoint.data.synthetic import VERSION
    from centerpoint.io.cache import default_cache_dir

    data = spec.data
    return Path(data.root) if data.root else default_cache_dir() / (
        f"shapes-v{VERSION}-seed{data.shapes_seed}-{data.shapes_train}x{data.shapes_val}")


def data_root(spec: ExperimentSpec, progress: Callable[[int, int], None] | None = None) -> Path:
    """The dataset root; for dataset=shapes the synthetic dataset is generated there first if needed (only
    into the cache, an empty directory, or over a synthetic set this project wrote: never over other data)."""
    data = spec.data
    if data.dataset == "shapes":
        from centerpoint.data.shapes_cache import ensure_shapes_dataset

        return ensure_shapes_dataset(shapes_root(spec), data.shapes_seed, data.shapes_train, data.shapes_val,
                                     progress)
    return coco_root(spec)


def coco_root(spec: ExperimentSpec) -> Path:
    """`data.root`, checked to be a directory (dataset=coco)."""
    data = spec.data
    if data.root is None:
        raise CenterpointError("data.root is not set: pass --data-dir DIR (the COCO root holding "
                               "train2017/, val2017/ and annotations/)")
    if not Path(data.root).is_dir():
        raise CenterpointError(f"data directory not found: {data.root} (see `centerpoint data download`)")
    return Path(data.root)


def existing_data_root(spec: ExperimentSpec) -> Path | None:
    """The dataset root without writing anything: None when dataset=shapes is not generated yet."""
    if spec.data.dataset == "coco":
        return coco_root(spec)
    from centerpoint.data.shapes_cache import is_shapes_dataset

    d = spec.data
    root = shapes_root(spec)
    return root if is_shapes_dataset(root, d.shapes_seed, d.shapes_train, d.shapes_val) else None


def load_split(spec: ExperimentSpec, root: Path, train: bool) -> CocoIndex:
    """Index the train or val split and check its classes against model.num_classes (when set)."""
    d = spec.data
    ann, images = (d.train_ann, d.train_images) if train else (d.val_ann, d.val_images)
    if not (root / ann).is_file():
        field = "data.train_ann" if train else "data.val_ann"
        raise CenterpointError(f"{'train' if train else 'val'} annotations not found: {root / ann} ({field}: {ann}, "
                               f"under the dataset root {root}); set --set {field}=PATH relative to the root")
    index = load_index(root / ann, root / images, train=train, min_box_size=d.min_box_size if train else 0.0,
                       min_image_size=d.min_image_size)
    if spec.model.num_classes is not None and index.num_classes != spec.model.num_classes:
        raise CenterpointError(f"{root / ann}: {index.num_classes} categories but model.num_classes="
                               f"{spec.model.num_classes}; set --set model.num_classes={index.num_classes}")
    return index
