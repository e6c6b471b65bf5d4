"""The data pipeline: decode -> affine warp -> (targets) -> batches, in worker processes.

Sampling is a pure function of (seed, epoch): `epoch_batches` gives the same batches whatever the
number of workers, and a resumed run restarts mid-epoch at the same batch. Each sample's augmentation
draws from `np.random.default_rng([seed, epoch, index])`, so it never depends on worker scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from centerpoint.data.coco import CocoIndex
from centerpoint.data.photometric import photometric_distort
from centerpoint.data.transforms import (
    center_crop_affine,
    invert,
    pad_affine,
    resize_affine,
    train_affine,
    transform_boxes,
    warp,
    zero_padding_,
)
from centerpoint.errors import CenterpointError
from centerpoint.spec import DataSpec
from centerpoint.targets import make_targets

Key = tuple[int, int]  # (epoch, sample index)


def read_image(path: str, shrink_to: float | None = None) -> Image.Image:
    """Decode an image file to RGB. `shrink_to`: the scale it will be resized by; JPEGs are decoded at
    the smallest power-of-two reduction that stays above it (much cheaper for big downscales)."""
    try:
        img = Image.open(path)
        if shrink_to is not None and shrink_to < 0.5 and img.format == "JPEG":
            w, h = img.size
            img.draft("RGB", (max(1, int(w * shrink_to)), max(1, int(h * shrink_to))))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
    except FileNotFoundError:
        raise CenterpointError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise CenterpointError(f"cannot decode image {path}: {err}") from None


@dataclass(frozen=True)
class Sample:
    """One transformed image. image: (3, H, W) uint8; boxes (n, 4) xyxy input pixels; labels (n,);
    to_original: (2, 3) affine from input pixels back to original image pixels."""

    image: Tensor
    boxes: Tensor
    labels: Tensor
    to_original: Tensor
    image_id: int
    ok: bool = True


class DetectionDataset(Dataset):
    """Indexable by (epoch, index) keys; train=True applies the random train transforms."""

    def __init__(self, index: CocoIndex, spec: DataSpec, seed: int, train: bool) -> None:
        self.index, self.spec, self.seed, self.train = index, spec, seed, train

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Key) -> Sample:
        epoch, i = key
        idx, spec = self.index, self.spec
        h, w = (int(v) for v in idx.sizes[i])
        boxes, labels = idx.boxes[i], idx.labels[i]
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, i])
            out_size = (spec.input_size, spec.input_size)
            if spec.center_crop is not None:
                crop = spec.center_crop
                a, crop_keep = center_crop_affine(
                    rng, w, h, boxes, spec.input_size, crop.ratios, crop.border, spec.flip_prob
                )
                boxes, labels = boxes[crop_keep], labels[crop_keep]  # the crop keeps boxes centred in its window
            else:
                # Train at the scale of the test images: native resolution for 'pad', the resize target otherwise.
                fit = max(w, h) if spec.test_mode == "pad" else (spec.test_size or spec.input_size)
                a = train_affine(rng, w, h, spec.input_size, spec.scale_range, spec.flip_prob, fit)
        elif spec.test_mode == "resize":
            a, out_size = resize_affine(w, h, spec.test_size or spec.input_size)
        else:
            a, out_size = pad_affine(w, h)
        path = str(idx.image_dir / idx.file_names[i])
        try:
            img = read_image(path, shrink_to=abs(a[0, 0]))
        except CenterpointError:
            if spec.on_bad_image == "fail":
                raise
            blank = torch.zeros(3, out_size[1], out_size[0], dtype=torch.uint8)
            return Sample(blank, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                          torch.from_numpy(invert(a)), idx.image_ids[i], ok=False)
        if img.size != (w, h):  # decoded at a reduced size (JPEG draft): rescale the map accordingly
            a = a @ np.diag([w / img.size[0], h / img.size[1], 1.0])
        pixels = warp(img, a, out_size)
        if img.size != (w, h):
            a = a @ np.diag([img.size[0] / w, img.size[1] / h, 1.0])
        if self.train and spec.photometric:  # (3, H, W) straight away, no transposing copy
            planes = photometric_distort(pixels, np.random.default_rng([self.seed, epoch, i, 1]), True)
            zero_padding_(planes, a, w, h)
        else:
            planes = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        boxes, keep = transform_boxes(boxes, a, out_size, spec.min_box_size if self.train else 0.0)
        image = torch.from_numpy(planes)
        return Sample(image, torch.from_numpy(boxes), torch.from_numpy(labels[keep]),
                      torch.from_numpy(invert(a)), idx.image_ids[i])


def pad_stack_images(images: Sequence[Tensor]) -> Tensor:
    """Stack (3, H_i, W_i) images into (B, 3, max H, max W), zero-padding right and bottom."""
    hmax = max(im.shape[1] for im in images)
    wmax = max(im.shape[2] for im in images)
    out = torch.zeros(len(images), 3, hmax, wmax, dtype=images[0].dtype)
    for j, im in enumerate(images):
        out[j, :, : im.shape[1], : im.shape[2]] = im
    return out


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised CPU tensor in shared memory, as DataLoader's own collate makes in its workers: a
    worker hands it to the main process as is, where a private tensor would first be copied there."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def collate_train(samples: list[Sample], num_classes: int, stride: int, min_overlap: float,
                  shared: bool | None = None) -> dict[str, Tensor]:
    """Batch samples and build their CenterNet targets (feature-map cells, see `make_targets`).

    shared: build the batch in shared memory (default: when running in a DataLoader worker process,
    which saves it copying the ~5 MB of heatmap per image of an 80-class, 512-pixel batch again).
    """
    if shared is None:
        shared = get_worker_info() is not None
    empty = shared_empty if shared else None
    first = samples[0].image
    images = torch.stack([s.image for s in samples],
                         out=shared_empty((len(samples), *first.shape), first.dtype) if shared else None)
    n = max(1, max(len(s.labels) for s in samples))
    boxes = torch.zeros(len(samples), n, 4)
    labels = torch.full((len(samples), n), -1, dtype=torch.int64)
    for j, s in enumerate(samples):
        boxes[j, : len(s.labels)] = s.boxes
        labels[j, : len(s.labels)] = s.labels
    feat_hw = (images.shape[2] // stride, images.shape[3] // stride)
    targets = make_targets(boxes, labels, num_classes, feat_hw, stride, min_overlap, empty)
    bad = torch.tensor(sum(not s.ok for s in samples))
    return {"images": images, **targets, "bad_images": bad}


def collate_eval(samples: list[Sample]) -> dict[str, Tensor]:
    """Batch test samples: padded images, affines back to original pixels, image ids."""
    return {
        "images": pad_stack_images([s.image for s in samples]),
        "to_original": torch.stack([s.to_original for s in samples]),
        "image_ids": torch.tensor([s.image_id for s in samples]),
        "bad_images": torch.tensor(sum(not s.ok for s in samples)),
    }


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches per epoch (the remainder is dropped so all ranks run the same steps)."""
    return num_samples // (batch_size * world_size)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[Key]]:
    """This rank's batches of one training epoch: a seeded permutation cut into global batches of
    batch_size * world_size, rank r taking slice r of each. Rank batches concatenated in rank order
    equal the single-process batches of size batch_size * world_size."""
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples)
    steps = steps_per_epoch(num_samples, batch_size, world_size)
    if steps == 0:
        raise CenterpointError(f"train.batch_size={batch_size} x {world_size} device(s) is larger than the "
                               f"train set ({num_samples} images); lower the batch size")
    out = []
    for s in range(steps):
        start = s * batch_size * world_size + rank * batch_size
        out.append([(epoch, int(i)) for i in perm[start : start + batch_size]])
    return out


def eval_batches(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 limit: int | None = None) -> list[list[Key]]:
    """This rank's evaluation batches: samples rank, rank + world, ... of the first `limit` images."""
    mine = list(range(rank, min(num_samples, limit or num_samples), world_size))
    return [[(0, i) for i in mine[j : j + batch_size]] for j in range(0, len(mine), batch_size)]


def make_loader(dataset: DetectionDataset, batches: list[list[Key]], workers: int, pin_memory: bool,
                num_classes: int = 0, stride: int = 4, min_overlap: float = 0.3) -> DataLoader:
    """A DataLoader over precomputed batches (train collate builds targets, eval collate keeps affines)."""
    collate = partial(collate_train, num_classes=num_classes, stride=stride, min_overlap=min_overlap) \
        if dataset.train else collate_eval
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)
