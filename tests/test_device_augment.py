"""data.augment_on=device: the batched warp, photometric distortion and targets on the training device
against the worker path (PIL warp, numpy distortion, targets in the collate) on the same draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from centerpoint.data.coco import load_index
from centerpoint.data.device_augment import augment_batch, distort_batch, warp_batch, window_mask
from centerpoint.data.loader import (
    DetectionDataset,
    SourceSample,
    collate_source,
    collate_train,
    distortion_vector,
)
from centerpoint.data.photometric import Distortion, apply_distortion, draw_distortion
from centerpoint.data.targets import make_targets
from centerpoint.data.transforms import inside_mask, inside_window, invert, scale_translate, warp
from centerpoint.errors import CenterpointError
from centerpoint.runtime import devices
from centerpoint.spec import CenterCropSpec, DataSpec
from tests.helpers import write_box_coco

CLASSES, STRIDE = 3, 4


def test_warp_batch_equals_pil_on_images_of_different_sizes() -> None:
    """Two images of different sizes on one canvas, warped by scale-ups, scale-downs, mirrors and shifts:
    inside each image every pixel is within PIL's rounding (1 level) of PIL's bilinear warp, and the
    inside mask is exactly `inside_mask` (the worker path's padding)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), rng.integers(0, 256, (61, 29, 3), dtype=np.uint8)]
    canvas = torch.zeros(2, 61, 53, 3, dtype=torch.uint8)
    for j, arr in enumerate(arrays):
        canvas[j, : arr.shape[0], : arr.shape[1]] = torch.from_numpy(arr)
    hw = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.float32)
    affines = [scale_translate(1.3, -5.2, 3.7), scale_translate(0.6, 4.1, 2.2, 64.0), scale_translate(1.0, 3, 4),
               scale_translate(2.1, -20.5, -11.25, 64.0), scale_translate(0.45, 30.0, 1.5)]
    for a in affines:
        for b in affines[::-1]:
            pair = (a, b)
            to_source = torch.tensor(np.stack([invert(m) for m in pair]), dtype=torch.float32)
            out = warp_batch(canvas, to_source, hw, (64, 64))
            windows = torch.tensor([inside_window(m, arr.shape[1], arr.shape[0], (64, 64))
                                    for arr, m in zip(arrays, pair, strict=True)])
            inside = window_mask(windows, (64, 64))
            for j, (arr, m) in enumerate(zip(arrays, pair, strict=True)):
                cols, rows = inside_mask(m, arr.shape[1], arr.shape[0], (64, 64))
                mask = rows[:, None] & cols[None, :]
                assert np.array_equal(inside[j, 0].numpy(), mask)
                want = warp(Image.fromarray(arr), m, (64, 64)).astype(np.float32)[mask]
                got = out[j].permute(1, 2, 0).numpy()[mask]
                assert mask.sum() > 100 and np.abs(got - want).max() <= 1.01


@pytest.mark.parametrize("seed", range(4))
def test_distort_batch_is_the_worker_distortion_before_truncation(seed: int) -> None:
    """Per-image draws on a batch: the float result is the worker's uint8 result before it truncates,
    so 0 <= device - worker < 1 on every pixel, including all 256 grey levels and saturated colours."""
    rng = np.random.default_rng(seed)
    levels = np.arange(256, dtype=np.uint8).reshape(8, 32)
    image = np.concatenate([rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), np.stack([levels] * 3, -1),
                            np.stack([levels, 255 - levels, levels // 2], -1)])
    draws = [draw_distortion(np.random.default_rng([seed, k])) for k in range(48)]
    draws += [Distortion(), Distortion(brightness=-32.0, contrast=1.5, contrast_first=False, saturation=1.5,
                                       hue=-18.0, channel_order=(2, 0, 1))]
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float().expand(len(draws), -1, -1, -1)
    got = distort_batch(batch, torch.from_numpy(np.stack([distortion_vector(d) for d in draws]))).numpy()
    for j, d in enumerate(draws):
        diff = got[j] - apply_distortion(image, d, channels_first=True).astype(np.float32)
        assert diff.min() >= 0 and diff.max() < 1, (j, d)
    assert len({d.channel_order for d in draws}) > 2 and any(d.hue for d in draws)  # the draws vary


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six smooth images (so the warps' rounding stays small) with three boxes each."""
    return write_box_coco(tmp_path_factory.mktemp("coco"), 6, 1, ".png", lambda rng, w, h: Image.fromarray(
        rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("photometric", [False, True])
@pytest.mark.parametrize("center_crop", [False, True])
def test_augment_batch_equals_the_worker_pipeline(coco: tuple[Path, Path], photometric: bool,
                                                  center_crop: bool) -> None:
    """Same keys through both paths: the targets are identical; the images agree within the rounding of
    the worker path (PIL rounds the warp, the distortion truncates, contrast and saturation scale that)."""
    index = load_index(*coco, train=True)
    spec = DataSpec(dataset="coco", input_size=64, test_size=None, photometric=photometric, scale_range=(0.3, 1.6),
                    center_crop=CenterCropSpec(ratios=(0.6, 1.0, 2.6)) if center_crop else None)
    workers = DetectionDataset(index, spec, 0, train=True)
    device = DetectionDataset(index, spec, 0, train=True, on_device=True)
    for epoch in range(4):
        keys = [(epoch, i) for i in range(len(index))]
        want = collate_train([workers[k] for k in keys], CLASSES, STRIDE, 0.3)
        sources = [device[k] for k in keys]
        assert all(isinstance(s, SourceSample) for s in sources)
        batch = collate_source(sources, CLASSES, STRIDE, 0.3, 64)
        radius = int(batch.pop("max_radius"))
        assert int(batch.pop("bad_images")) == 0 and ("distortion" in batch) == photometric
        got = augment_batch(batch, radius, 64, CLASSES, STRIDE, 0.3)
        for key in ("heatmap", "wh", "offset", "reg_weight"):
            assert torch.equal(got[key], want[key]), key
        diff = (got["images"] - want["images"].float()).abs()
        assert got["images"].shape == want["images"].shape == (len(keys), 3, 64, 64)
        assert float(diff.max()) <= (4.0 if photometric else 1.01), epoch
        assert float(diff.mean()) < (1.0 if photometric else 0.6)  # (truncation alone averages 0.5)
        padding = (want["images"] == 0).all(1)
        assert torch.equal((got["images"] == 0).all(1) & padding, padding)  # the padding is 0 in both


def test_collate_source_canvas_radius_and_bad_images(coco: tuple[Path, Path], tmp_path: Path) -> None:
    doc = json.loads(coco[0].read_text())  # the same images plus one whose file is missing
    doc["images"].append({"id": 99, "file_name": "missing.png", "width": 50, "height": 40})
    doc["annotations"].append({"id": 99, "image_id": 99, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400,
                               "iscrowd": 0})
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    index = load_index(tmp_path / "ann.json", coco[1], train=True)
    spec = DataSpec(dataset="coco", input_size=64, test_size=None, photometric=True, on_bad_image="skip")
    ds = DetectionDataset(index, spec, 0, train=True, on_device=True)
    samples = [ds[(0, i)] for i in (0, 1, 2, len(index) - 1)]
    assert not samples[3].ok and samples[3].distortion is None
    batch = collate_source(samples, CLASSES, STRIDE, 0.3, 64)
    assert batch["source"].shape == (4, 96, 120, 3) and int(batch["bad_images"]) == 1
    for j, s in enumerate(samples[:3]):
        h, w, _ = s.source.shape
        assert torch.equal(batch["source"][j, :h, :w], s.source)
        assert int(batch["source"][j].sum()) == int(s.source.sum())  # zero canvas around it
        assert batch["source_hw"][j].tolist() == [h, w]
    radius = int(batch.pop("max_radius"))
    batch.pop("bad_images")
    out = augment_batch(batch, radius, 64, CLASSES, STRIDE, 0.3)
    assert float(out["images"][3].abs().max()) == 0 and float(out["heatmap"][3].max()) == 0  # the missing one
    assert float(out["images"][:3].amin((1, 2, 3)).max()) < float(out["images"][:3].amax((1, 2, 3)).min())
    full = make_targets(batch["boxes"], batch["labels"], CLASSES, (16, 16), STRIDE, 0.3)
    assert all(torch.equal(full[k], out[k]) for k in full)  # the host radius renders what a sync would
    bad = [SourceSample(s.source, s.to_source, s.window, s.boxes, torch.full_like(s.labels, CLASSES), s.distortion)
           for s in samples[:3]]
    with pytest.raises(CenterpointError, match="num_classes"):  # labels are checked in the worker
        collate_source(bad, CLASSES, STRIDE, 0.3, 64)


def test_augment_on_and_loader_workers_resolution() -> None:
    cpu, cuda, sdaa = devices.make_backend("cpu"), devices.make_backend("cuda"), devices.make_backend("sdaa")
    assert devices.augments_on_device(cuda, "auto") and not devices.augments_on_device(cpu, "auto")
    assert not devices.augments_on_device(sdaa, "auto")
    assert devices.augments_on_device(cpu, "device") and not devices.augments_on_device(cuda, "workers")
    assert [devices.loader_workers(b, None) for b in (cpu, cuda, sdaa)] == [0, 4, 4]
    assert devices.loader_workers(cpu, 3) == 3 and devices.loader_workers(cuda, 0) == 0


def test_train_loop_batches_agree_between_the_two_paths(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Through the train loop's own pieces (`build_run`, `train_batches`, the step): the first batch's
    targets are identical, its images and the first step's loss agree to the images' rounding."""
    from centerpoint.data.train_batches import train_batches
    from centerpoint.run import build_run
    from centerpoint.spec_io import load_spec

    losses, batches = {}, {}
    for where in ("workers", "device"):
        spec = load_spec(None, [*tiny_overrides, f"data.augment_on={where}", "runtime.precision=fp32",
                                "data.photometric=true", f"logging.workdir={tmp_path / where}",
                                "logging.tensorboard=false"])
        run = build_run(spec, False, Console(quiet=True))
        assert run.spec.resolved.augment_on == where
        first = next(train_batches(run.train_index, run.spec, run.backend, rank=0, world_size=1,
                                   steps_per_epoch=run.steps_per_epoch, start_step=0, total_steps=1))
        assert (first.step, first.epoch, first.bad_images) == (1, 0, 0)
        batch = first.batch
        assert set(batch) == {"images", "heatmap", "wh", "offset", "reg_weight"}
        batches[where] = {k: v.clone() for k, v in batch.items()}  # (the eager cpu step donates its inputs)
        _, metrics = run.step_fn(run.state, batch)
        losses[where] = float(metrics["loss"])
    for key in ("heatmap", "wh", "offset", "reg_weight"):
        assert torch.equal(batches["device"][key], batches["workers"][key]), key
    images = (batches["device"]["images"] - batches["workers"]["images"].float()).abs()
    # The worker's warp rounds to uint8 (OpenCV 4.x also snaps sample positions to 1/32 pixel: up to 1/64 of
    # a sharp edge's 255 levels per axis) and the distortion then scales such differences by up to 1.5 x 1.5.
    assert float(images.max()) <= 8 and float(images.mean()) < 1
    assert losses["device"] == pytest.approx(losses["workers"], rel=1e-2)
