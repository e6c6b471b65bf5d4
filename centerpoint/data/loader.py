"""The data pipeline: decode -> affine warp -> (targets) -> batches, in worker processes.

Sampling is a pure function of (seed, epoch): `epoch_batches` gives the same batches whatever the
number of workers, and a resumed run restarts mid-epoch at the same batch. Each sample's augmentation
draws from `np.random.default_rng([seed, epoch, index])`, so it never depends on worker scheduling.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from centerpoint.data.coco import CocoIndex
from centerpoint.data.images import decode, open_image
from centerpoint.data.photometric import Distortion, draw_distortion
from centerpoint.data.targets import make_targets, max_radius
from centerpoint.data.train_image import decode_bgr, to_planes, warp_bgr, zero_outside_
from centerpoint.data.transforms import (
    center_crop_affine,
    eval_affine,
    inside_window,
    invert,
    train_affine,
    transform_boxes,
    warp,
)
from centerpoint.errors import CenterpointError
from centerpoint.spec import PILLOW_MAX_PIXELS, DataSpec

Key = tuple[int, int]  # (epoch, sample index)


def read_image(path: str, shrink_to: float | None = None, max_pixels: int = PILLOW_MAX_PIXELS) -> Image.Image:
    """Decode an image file to RGB. `shrink_to`: the scale it will be resized by; JPEGs are decoded at
    the smallest power-of-two reduction that stays above it (much cheaper for big downscales). A file that
    is missing, not an image or over `max_pixels` raises a CenterpointError (`images.open_image`)."""
    img = open_image(path, max_pixels)
    if shrink_to is not None and shrink_to < 0.5 and img.format == "JPEG":
        w, h = img.size
        img.draft("RGB", (max(1, int(w * shrink_to)), max(1, int(h * shrink_to))))
    return decode(img, path)


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


@dataclass(frozen=True)
class SourceSample:
    """One training image for `data.augment_on: device`: decoded and its augmentation drawn, not applied.

    source: (h, w, 3) uint8 decoded image (h, w: its decoded size, smaller than the original for a JPEG
    decoded at a reduced scale); to_source: (2, 3) float32 affine from input pixels to source pixels;
    window: (4,) int64 input columns [x0, x1) and rows [y0, y1) that show the image (the rest is
    padding; `transforms.inside_window`, so both paths pad the same pixels); boxes (n, 4) xyxy input
    pixels and labels (n,), as the worker path gives them; distortion: (9,) float32 photometric draw
    (`distortion_vector`), None without photometric distortion."""

    source: Tensor
    to_source: Tensor
    window: Tensor
    boxes: Tensor
    labels: Tensor
    distortion: Tensor | None
    ok: bool = True


def distortion_vector(d: Distortion) -> np.ndarray:
    """A photometric draw as the (9,) float32 row `device_augment.distort_batch` reads: brightness,
    contrast-first factor, saturation, hue, contrast-last factor, colour-space flag, channel order (3);
    steps not drawn are written as identities."""
    first = d.contrast if d.contrast_first and d.contrast is not None else 1.0
    last = d.contrast if not d.contrast_first and d.contrast is not None else 1.0
    hsv = d.saturation is not None or d.hue is not None
    return np.array([d.brightness or 0.0, first, 1.0 if d.saturation is None else d.saturation, d.hue or 0.0,
                     last, float(hsv), *(d.channel_order or (0, 1, 2))], dtype=np.float32)


class DetectionDataset(Dataset):
    """Indexable by (epoch, index) keys; train=True applies the random train transforms.

    on_device (train only): return `SourceSample`s, leaving the warp, the photometric distortion and the
    targets to `device_augment` on the training device (`data.augment_on: device`)."""

    def __init__(self, index: CocoIndex, spec: DataSpec, seed: int, train: bool, on_device: bool = False) -> None:
        self.index, self.spec, self.seed, self.train = index, spec, seed, train
        self.on_device = on_device and train

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Key) -> Sample | SourceSample:
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
        else:
            a, out_size = eval_affine(w, h, spec)
        path = str(idx.image_dir / idx.file_names[i])
        if self.train and not self.on_device:
            return self._train_sample(path, a, boxes, labels, (w, h), out_size, epoch, i)
        try:
            img = read_image(path, shrink_to=abs(a[0, 0]), max_pixels=spec.max_image_pixels)
        except CenterpointError:
            if spec.on_bad_image == "fail":
                raise
            if self.on_device:  # an empty source: the warp gives a blank image
                return SourceSample(torch.zeros(1, 1, 3, dtype=torch.uint8), torch.from_numpy(invert(a)).float(),
                                    torch.zeros(4, dtype=torch.int64), torch.zeros(0, 4),
                                    torch.zeros(0, dtype=torch.int64), None, ok=False)
            blank = torch.zeros(3, out_size[1], out_size[0], dtype=torch.uint8)
            return Sample(blank, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                          torch.from_numpy(invert(a)), idx.image_ids[i], ok=False)
        if self.on_device:
            return self._source_sample(img, a, boxes, labels, (w, h), out_size, epoch, i)
        if img.size != (w, h):  # decoded at a reduced size (JPEG draft): rescale the map accordingly
            a = a @ np.diag([w / img.size[0], h / img.size[1], 1.0])
        pixels = warp(img, a, out_size)
        if img.size != (w, h):
            a = a @ np.diag([img.size[0] / w, img.size[1] / h, 1.0])
        planes = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        boxes, keep = transform_boxes(boxes, a, out_size, 0.0)
        return Sample(torch.from_numpy(planes), torch.from_numpy(boxes), torch.from_numpy(labels[keep]),
                      torch.from_numpy(invert(a)), idx.image_ids[i])

    def _train_sample(self, path: str, a: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                      size: tuple[int, int], out_size: tuple[int, int], epoch: int, i: int) -> Sample:
        """The workers path's training sample (`train_image`): decode, warp, distort, padding set to 0."""
        w, h = size
        image_id = self.index.image_ids[i]
        try:
            bgr = decode_bgr(path, size, shrink_to=abs(a[0, 0]), max_pixels=self.spec.max_image_pixels)
        except CenterpointError:
            if self.spec.on_bad_image == "fail":
                raise
            blank = torch.zeros(3, out_size[1], out_size[0], dtype=torch.uint8)
            return Sample(blank, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                          torch.from_numpy(invert(a)), image_id, ok=False)
        decoded = a @ np.diag([w / bgr.shape[1], h / bgr.shape[0], 1.0])  # a JPEG may be decoded reduced
        pixels = warp_bgr(bgr, decoded, out_size)
        draw = draw_distortion(np.random.default_rng([self.seed, epoch, i, 1])) if self.spec.photometric else None
        planes = zero_outside_(to_planes(pixels, draw), a, w, h)  # the warp repeats edges; outside is 0
        boxes, keep = transform_boxes(boxes, a, out_size, self.spec.min_box_size)
        return Sample(torch.from_numpy(planes), torch.from_numpy(boxes), torch.from_numpy(labels[keep]),
                      torch.from_numpy(invert(a)), image_id)

    def _source_sample(self, img: Image.Image, a: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                       size: tuple[int, int], out_size: tuple[int, int], epoch: int, i: int) -> SourceSample:
        """The device path's sample: the same draws as the worker path (same generators), nothing applied."""
        w, h = size
        distortion = None
        if self.spec.photometric:
            draw = draw_distortion(np.random.default_rng([self.seed, epoch, i, 1]))
            distortion = torch.from_numpy(distortion_vector(draw))
        to_source = invert(a @ np.diag([w / img.size[0], h / img.size[1], 1.0]))  # input -> decoded pixels
        window = torch.tensor(inside_window(a, w, h, out_size))
        boxes, keep = transform_boxes(boxes, a, out_size, self.spec.min_box_size)
        with warnings.catch_warnings():  # PIL's pixels are a fresh read-only buffer: no copy, nobody writes it
            warnings.simplefilter("ignore", UserWarning)
            source = torch.from_numpy(np.asarray(img))
        return SourceSample(source, torch.from_numpy(to_source).float(), window,
                            torch.from_numpy(boxes), torch.from_numpy(labels[keep]), distortion)


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU tensor in fresh shared memory, as DataLoader's own collate makes in its workers: a worker
    hands it to the main process as is, where a private tensor would first be copied there. Its bytes
    are 0: a new shared-memory object is zero-filled by the kernel (POSIX `ftruncate`)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def pad_boxes(samples: Sequence[Sample | SourceSample]) -> tuple[Tensor, Tensor]:
    """The samples' boxes and labels as (B, N, 4) float32 and (B, N) int64, N the most boxes of a sample
    (at least 1); padding is a zero box with label -1."""
    n = max(1, max(len(s.labels) for s in samples))
    boxes = torch.zeros(len(samples), n, 4)
    labels = torch.full((len(samples), n), -1, dtype=torch.int64)
    for j, s in enumerate(samples):
        boxes[j, : len(s.labels)] = s.boxes
        labels[j, : len(s.labels)] = s.labels
    return boxes, labels


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
    boxes, labels = pad_boxes(samples)
    feat_hw = (images.shape[2] // stride, images.shape[3] // stride)
    targets = make_targets(boxes, labels, num_classes, feat_hw, stride, min_overlap, empty,
                           zeros=shared_empty if shared else None)  # fresh shared memory is zero-filled
    bad = torch.tensor(sum(not s.ok for s in samples))
    return {"images": images, **targets, "bad_images": bad}


def collate_source(samples: list[SourceSample], num_classes: int, stride: int, min_overlap: float,
                   input_size: int, shared: bool | None = None) -> dict[str, Tensor]:
    """Batch `SourceSample`s for `device_augment.augment_batch`: "source" (B, H, W, 3) uint8 (each image
    top-left on a zero canvas of the batch's largest sides), "to_source" (B, 2, 3), "source_hw" (B, 2),
    "window" (B, 4), "distortion" (B, 9) (with photometric distortion), "boxes" (B, N, 4) input pixels,
    "labels" (B, N) (-1 pads), and two host-side entries: "max_radius" (the targets' window, checked here, see
    `targets.max_radius`) and "bad_images". shared: as in `collate_train`."""
    if shared is None:
        shared = get_worker_info() is not None
    hmax = max(s.source.shape[0] for s in samples)
    wmax = max(s.source.shape[1] for s in samples)
    shape = (len(samples), hmax, wmax, 3)
    source = shared_empty(shape, torch.uint8) if shared else torch.empty(shape, dtype=torch.uint8)
    for j, s in enumerate(samples):
        h, w, _ = s.source.shape
        source[j, :h, :w] = s.source
        source[j, h:] = 0
        source[j, :h, w:] = 0
    boxes, labels = pad_boxes(samples)
    feat = (input_size // stride, input_size // stride)
    batch = {"source": source, "to_source": torch.stack([s.to_source for s in samples]),
             "window": torch.stack([s.window for s in samples]),
             "source_hw": torch.tensor([list(s.source.shape[:2]) for s in samples], dtype=torch.float32),
             "boxes": boxes, "labels": labels,
             "max_radius": torch.tensor(max_radius(boxes, labels, num_classes, feat, stride, min_overlap)),
             "bad_images": torch.tensor(sum(not s.ok for s in samples))}
    drawn = [s.distortion for s in samples]
    if any(d is not None for d in drawn):  # a skipped bad image has no draw: it gets the identity
        identity = torch.from_numpy(distortion_vector(Distortion()))
        batch["distortion"] = torch.stack([identity if d is None else d for d in drawn])
    return batch


def collate_eval(samples: list[Sample]) -> dict[str, Tensor]:
    """Batch test samples of one input size (`eval_batches`): images, affines back to original pixels,
    image ids."""
    return {
        "images": torch.stack([s.image for s in samples]),
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


def eval_batches(input_sizes: Sequence[tuple[int, int]], batch_size: int, rank: int = 0, world_size: int = 1,
                 limit: int | None = None) -> list[list[Key]]:
    """This rank's evaluation batches of samples rank, rank + world, ... of the first `limit` images.

    input_sizes: each sample's network input (W, H) (`transforms.eval_affine`). A batch holds images of one
    input size only, so no image is padded to another's size and no detection depends on the batch size
    (mmdetection tests one image at a time); batches of a size follow the order of its first image."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(rank, min(len(input_sizes), limit or len(input_sizes)), world_size):
        groups.setdefault(tuple(input_sizes[i]), []).append(i)
    return [[(0, i) for i in group[j : j + batch_size]] for group in groups.values()
            for j in range(0, len(group), batch_size)]


def make_loader(dataset: DetectionDataset, batches: Iterable[list[Key]], *,
                collate: Callable[[list], dict[str, Tensor]], workers: int, pin_memory: bool,
                pin_device: str) -> DataLoader:
    """A DataLoader over precomputed batches of sample keys. collate: `collate_eval`, or for training
    `train_batches.train_collate` (targets built in the workers, or decoded images for `device_augment`).
    pin_device: `Backend.pin_memory_device`."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=init_worker if workers > 0 else None,
                      **({"pin_memory_device": pin_device} if pin_memory and pin_device else {}))


def init_worker(worker_id: int) -> None:
    """Set up a loader worker process: its own process group (`interrupt.loader_worker_init`), one OpenCV
    thread (torch already gives it one), and freed memory kept for reuse, since every image allocates and
    frees the same few-MB arrays, and fresh pages cost more than the arithmetic on them (measured: 3.3 ms ->
    0.15 ms for `(x + b) * c` on a 512 px image)."""
    import cv2

    from centerpoint.runtime.devices import keep_freed_host_memory
    from centerpoint.runtime.interrupt import loader_worker_init

    loader_worker_init(worker_id)
    cv2.setNumThreads(1)
    keep_freed_host_memory()
