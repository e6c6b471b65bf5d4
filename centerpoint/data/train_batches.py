"""The end of the training data pipeline: `train_batches`, the train step's batches on the device, from
any global step on.

Step s (1-based) trains batch (s - 1) % steps_per_epoch of epoch (s - 1) // steps_per_epoch
(`loader.epoch_batches`: a pure function of (seed, epoch)), so a run resumed after step s draws exactly
what the uninterrupted run drew next. One dataset and one DataLoader serve all the remaining steps: worker
processes start once, not once per epoch, and keep loading across epoch boundaries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from centerpoint.data.coco import CocoIndex
from centerpoint.data.device_augment import augment_batch
from centerpoint.data.loader import DetectionDataset, Key, collate_source, collate_train, epoch_batches, make_loader
from centerpoint.runtime.devices import Backend
from centerpoint.spec import ExperimentSpec


@dataclass(frozen=True)
class TrainBatch:
    """One step's batch. step: the global step it trains (1-based); epoch: its epoch (0-based); batch: the
    train step's input on the device ("images" and the targets); bad_images: unreadable images in it,
    replaced by blanks (data.on_bad_image=skip)."""

    step: int
    epoch: int
    batch: dict[str, Tensor]
    bad_images: int


@dataclass(frozen=True)
class StepBatches:
    """A DataLoader batch sampler: this rank's sample keys for global steps first + 1 .. last, crossing
    epochs (each epoch's order drawn when it is reached)."""

    num_samples: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    steps_per_epoch: int
    first: int
    last: int

    def __len__(self) -> int:
        return self.last - self.first

    def __iter__(self) -> Iterator[list[Key]]:
        step = self.first
        while step < self.last:
            epoch, start = divmod(step, self.steps_per_epoch)
            batches = epoch_batches(self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world_size)
            yield from batches[start: start + self.last - step]
            step += len(batches) - start


def train_collate(spec: ExperimentSpec, on_device: bool) -> Callable[[list], dict[str, Tensor]]:
    """The loader's collate for training: samples -> a batch with its targets (data.augment_on=workers),
    or decoded sources and draws for `device_augment` (data.augment_on=device)."""
    targets = {"num_classes": spec.model.num_classes, "stride": spec.model.stride,
               "min_overlap": spec.loss.min_overlap}
    if on_device:
        return partial(collate_source, input_size=spec.data.input_size, **targets)
    return partial(collate_train, **targets)


def to_step_batch(batch: dict[str, Tensor], spec: ExperimentSpec, device: torch.device) -> dict[str, Tensor]:
    """A loader batch without its "bad_images" count -> the train step's batch on `device`; a
    `collate_source` batch is augmented there (its host-side "max_radius" entry bounds the targets)."""
    radius = batch.pop("max_radius", None)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if radius is None:
        return batch
    return augment_batch(batch, int(radius), spec.data.input_size, spec.model.num_classes, spec.model.stride,
                         spec.loss.min_overlap)


def train_batches(index: CocoIndex, spec: ExperimentSpec, backend: Backend, *, rank: int, world_size: int,
                  steps_per_epoch: int, start_step: int, total_steps: int) -> Iterator[TrainBatch]:
    """The batches of global steps start_step + 1 .. total_steps for this rank, device-ready.

    `spec` is resolved (`spec.resolved`: loader workers, where augmentation runs). Close the iterator
    (`contextlib.closing`) to stop the loader's workers early."""
    on_device = spec.resolved.augment_on == "device"
    t = spec.train
    dataset = DetectionDataset(index, spec.data, t.seed, train=True, on_device=on_device)
    steps = StepBatches(len(index), t.batch_size, t.seed, rank, world_size, steps_per_epoch, start_step, total_steps)
    loader = make_loader(dataset, steps, collate=train_collate(spec, on_device), workers=spec.resolved.workers,
                         pin_memory=backend.pin_memory, pin_device=backend.pin_memory_device)
    for step, batch in enumerate(loader, start=start_step + 1):
        bad = int(batch.pop("bad_images"))
        yield TrainBatch(step, (step - 1) // steps_per_epoch, to_step_batch(batch, spec, backend.device), bad)
