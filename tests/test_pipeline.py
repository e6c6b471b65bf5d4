"""Tests for the training data pipeline: sample determinism, affine/box round trips, the photometric
distortion against the direct float32 HSV form it replaced, and targets/collate against their previous
formulation (same values, bit for bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from centerpoint.data.coco import load_index
from centerpoint.data.loader import DetectionDataset, collate_train, read_image, shared_empty
from centerpoint.data.photometric import Distortion, apply_distortion, draw_distortion, photometric_distort
from centerpoint.data.targets import gaussian_radius, make_targets
from centerpoint.data.train_image import warp_bgr
from centerpoint.data.transforms import (
    center_crop_affine,
    invert,
    scale_translate,
    train_affine,
    transform_boxes,
    warp,
)
from centerpoint.evaluation.decode import boxes_to_original
from centerpoint.spec import CenterCropSpec, DataSpec
from tests.helpers import write_box_coco

# ---- the previous formulations, kept verbatim as references ----------------------------------------


def previous_rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0.0)
    safe = np.where(delta > 0, delta, 1)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = np.where(delta > 0, (h * 60.0) % 360.0, 0.0)
    return np.stack([h, s, v], -1)


def previous_hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] % 360.0, hsv[..., 1], hsv[..., 2]
    c = v * s
    hp = h / 60.0
    x = c * (1 - np.abs(hp % 2 - 1))
    zero = np.zeros_like(c)
    sector = np.floor(hp).astype(np.int64) % 6
    choices = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    rgb = np.zeros(hsv.shape, dtype=hsv.dtype)
    for k, (rr, gg, bb) in enumerate(choices):
        sel = sector == k
        rgb[..., 0] = np.where(sel, rr, rgb[..., 0])
        rgb[..., 1] = np.where(sel, gg, rgb[..., 1])
        rgb[..., 2] = np.where(sel, bb, rgb[..., 2])
    return rgb + (v - c)[..., None]


def previous_photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img += rng.uniform(-32.0, 32.0)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img *= rng.uniform(0.5, 1.5)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = previous_rgb_to_hsv(img)
        if do_sat:
            hsv[..., 1] *= rng.uniform(0.5, 1.5)
        if do_hue:
            hsv[..., 0] += rng.uniform(-18.0, 18.0)
        img = previous_hsv_to_rgb(hsv)
    if not contrast_first and rng.random() < 0.5:
        img *= rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        img = img[..., rng.permutation(3)]
    return np.clip(img, 0, 255).astype(np.uint8)


def previous_apply(image: np.ndarray, d: Distortion) -> np.ndarray:
    """The previous arithmetic with given (not drawn) parameters."""
    img = image.astype(np.float32)
    if d.brightness is not None:
        img += d.brightness
    if d.contrast_first and d.contrast is not None:
        img *= d.contrast
    if d.saturation is not None or d.hue is not None:
        hsv = previous_rgb_to_hsv(img)
        if d.saturation is not None:
            hsv[..., 1] *= d.saturation
        if d.hue is not None:
            hsv[..., 0] += d.hue
        img = previous_hsv_to_rgb(hsv)
    if not d.contrast_first and d.contrast is not None:
        img *= d.contrast
    if d.channel_order is not None:
        img = img[..., list(d.channel_order)]
    return np.clip(img, 0, 255).astype(np.uint8)


def previous_heatmap(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, feat_hw: tuple[int, int],
                     stride: int) -> torch.Tensor:
    """The previous heatmap renderer: windows of the batch's largest radius, scatter-amax with a dump slot."""
    b, (h_map, w_map) = labels.shape[0], feat_hw
    bx = boxes.to(torch.float64) / stride
    cx, cy = (bx[..., 0] + bx[..., 2]) / 2, (bx[..., 1] + bx[..., 3]) / 2
    bw, bh = (bx[..., 2] - bx[..., 0]).clamp(min=0), (bx[..., 3] - bx[..., 1]).clamp(min=0)
    cx_int, cy_int = torch.floor(cx).clamp(0, w_map - 1).long(), torch.floor(cy).clamp(0, h_map - 1).long()
    radius = torch.trunc(gaussian_radius(bh, bw, 0.3)).clamp(min=0).to(torch.float32)
    half = int(radius.max()) if radius.numel() > 0 else 0
    sx, sy = min(2 * half + 1, w_map), min(2 * half + 1, h_map)
    xs = (cx_int - half).clamp(0, w_map - sx)[..., None] + torch.arange(sx)
    ys = (cy_int - half).clamp(0, h_map - sy)[..., None] + torch.arange(sy)
    dx, dy = xs - cx_int[..., None], ys - cy_int[..., None]
    r = radius[..., None]
    dx2, dy2 = (dx * dx).to(torch.float32), (dy * dy).to(torch.float32)
    sigma = ((2 * radius + 1) / 6)[..., None, None]
    gauss = torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2 * sigma * sigma))
    keep = ((dy.abs() <= r)[..., :, None] & (dx.abs() <= r)[..., None, :] & (labels >= 0)[..., None, None]
            & (gauss >= torch.finfo(torch.float32).eps))
    plane = torch.arange(b)[:, None] * num_classes + labels.clamp(min=0)
    flat = (plane[..., None, None] * h_map + ys[..., :, None]) * w_map + xs[..., None, :]
    dump = b * num_classes * h_map * w_map
    flat = torch.where(keep, flat, torch.full_like(flat, dump))
    heat = torch.zeros(dump + 1)
    heat.scatter_reduce_(0, flat.reshape(-1), gauss.reshape(-1), "amax")
    return heat[:dump].reshape(b, num_classes, h_map, w_map)


# ---- photometric ------------------------------------------------------------------------------------


def _test_image(seed: int, h: int = 29, w: int = 37) -> np.ndarray:
    """Random colours plus grey, black, white and saturated pixels (the branch edges of HSV)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[:4] = img[:4, :, :1]  # grey
    img[4:7] = rng.choice(np.array([0, 255], dtype=np.uint8), (3, w, 3))
    img[7, :, 1] = img[7, :, 0]  # ties between channels
    return img


def test_photometric_equals_previous_for_drawn_distortions() -> None:
    for seed in range(300):
        img = _test_image(seed)
        want = previous_photometric_distort(img, np.random.default_rng([seed, 1]))
        got = photometric_distort(img, np.random.default_rng([seed, 1]))
        assert got.shape == img.shape and got.dtype == np.uint8
        assert np.array_equal(got, want), seed


@pytest.mark.parametrize("d", [
    Distortion(saturation=1.5), Distortion(saturation=0.5), Distortion(hue=18.0), Distortion(hue=-18.0),
    Distortion(-32.0, 1.5, True, 1.5, -18.0, (2, 1, 0)), Distortion(32.0, 0.5, False, 0.5, 18.0, (1, 2, 0)),
    Distortion(-31.9, 1.49, False, 1.37, 0.001, None), Distortion(7.5, None, True, None, -17.99, (0, 2, 1)),
    Distortion(-20.0, 1.3, False, None, None, (1, 0, 2)),
])  # fmt: skip
def test_photometric_equals_previous_on_all_colour_levels(d: Distortion) -> None:
    levels = np.arange(0, 256, 5, dtype=np.uint8)  # 52^3 colours, every channel order of them
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 52, 3)
    assert np.array_equal(apply_distortion(cube, d), previous_apply(cube, d))


def test_photometric_channels_first_and_block_size_do_not_change_values() -> None:
    img = _test_image(3, 40, 23)
    d = Distortion(10.0, 1.2, False, 1.3, 7.0, (2, 0, 1))
    hwc = apply_distortion(img, d)
    chw = apply_distortion(img, d, channels_first=True)
    assert chw.flags["C_CONTIGUOUS"] and chw.shape == (3, 40, 23)
    assert np.array_equal(chw, hwc.transpose(2, 0, 1))
    for block in (1, 23, 24, 100, 10_000):
        assert np.array_equal(apply_distortion(img, d, block_pixels=block), hwc), block


def test_photometric_identity_when_no_step_is_drawn_and_range() -> None:
    img = _test_image(5)
    assert np.array_equal(apply_distortion(img, Distortion()), img)
    quiet = [s for s in range(200) if draw_distortion(np.random.default_rng(s)) == Distortion(contrast_first=True)
             or draw_distortion(np.random.default_rng(s)) == Distortion(contrast_first=False)]
    assert quiet  # about 1 in 32 draws applies nothing
    assert np.array_equal(photometric_distort(img, np.random.default_rng(quiet[0])), img)
    # A strong draw changes the image and stays a valid uint8 image (clipped, not wrapped).
    loud = apply_distortion(img, Distortion(32.0, 1.5, True, 1.5, 18.0, None))
    assert loud.dtype == np.uint8 and not np.array_equal(loud, img)
    assert (loud[img.astype(int).min(-1) >= 200] == 255).any()  # bright pixels saturate at 255


def test_draws_follow_mmdetection_probabilities() -> None:
    draws = [draw_distortion(np.random.default_rng([9, i])) for i in range(4000)]
    for field in ("brightness", "contrast", "saturation", "hue", "channel_order"):
        rate = np.mean([getattr(d, field) is not None for d in draws])
        assert abs(rate - 0.5) < 0.03, field
    assert all(abs(d.brightness) <= 32 for d in draws if d.brightness is not None)
    assert all(0.5 <= d.contrast <= 1.5 for d in draws if d.contrast is not None)
    assert all(-18 <= d.hue <= 18 for d in draws if d.hue is not None)


# ---- affine warp and boxes --------------------------------------------------------------------------


def test_train_affine_box_round_trip() -> None:
    rng = np.random.default_rng(0)
    for k in range(50):
        w, h = int(rng.integers(100, 700)), int(rng.integers(100, 700))
        a = train_affine(np.random.default_rng([1, k]), w, h, 512, (0.6, 1.4), 0.5)
        assert np.allclose(invert(invert(a)), a)
        xy = rng.uniform(0, [w, h], (20, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 60, (20, 2))], 1).astype(np.float32)
        mapped, keep = transform_boxes(boxes, a, (512, 512), 0.0)
        inside = np.flatnonzero(keep)
        unclipped = (mapped > 0).all(1) & (mapped < 512).all(1)  # clipping is not invertible
        back = boxes_to_original(torch.from_numpy(mapped[None]), torch.from_numpy(invert(a))[None])[0].numpy()
        assert np.allclose(back[unclipped], boxes[inside][unclipped], atol=1e-3)
        assert (mapped[:, 2] >= mapped[:, 0]).all() and (mapped[:, 3] >= mapped[:, 1]).all()


def test_warp_shift_and_flip_are_exact() -> None:
    img = Image.fromarray(_test_image(2, 12, 16))
    pixels = np.asarray(img)
    shifted = warp(img, scale_translate(1.0, 3.0, 2.0), (20, 16))
    assert np.array_equal(shifted[2:14, 3:19], pixels) and shifted[:2].max() == 0 and shifted[:, :3].max() == 0
    flipped = warp(img, scale_translate(1.0, 0.0, 0.0, flip_width=16.0), (16, 12))
    assert np.array_equal(flipped, pixels[:, ::-1])


def test_read_image_matches_pil_convert(tmp_path: Path) -> None:
    rgb = Image.fromarray(_test_image(4, 64, 96))
    rgb.save(tmp_path / "c.jpg", quality=90)
    rgb.convert("L").save(tmp_path / "g.jpg", quality=90)
    for name in ("c.jpg", "g.jpg"):
        full = Image.open(tmp_path / name).convert("RGB")
        got = read_image(str(tmp_path / name))
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(full))
        small = Image.open(tmp_path / name)
        small.draft("RGB", (24, 16))
        assert np.array_equal(np.asarray(read_image(str(tmp_path / name), shrink_to=0.25)),
                              np.asarray(small.convert("RGB")))


# ---- dataset samples, collate and targets -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four noise JPEGs with three boxes each."""
    return write_box_coco(tmp_path_factory.mktemp("coco"), 4, 0, ".jpg",
                          lambda rng, w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))


def reference_zero_padding(pixels: np.ndarray, a: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) with every pixel whose centre maps outside the original image set to 0, pixel by pixel."""
    out = pixels.copy()
    inv = invert(a)
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            sx, sy = inv @ [x + 0.5, y + 0.5, 1.0]
            if not (0 <= sx < width and 0 <= sy < height):
                out[y, x] = 0
    return out


def opencv_warp(img: Image.Image, a: np.ndarray) -> np.ndarray:
    """The training warp on an RGB image (`train_image.warp_bgr`, which tests/test_train_image.py compares
    with the exact bilinear values and PIL's), to a 64 x 64 (H, W, 3) RGB array."""
    return warp_bgr(np.ascontiguousarray(np.asarray(img)[..., ::-1]), a, (64, 64))[..., ::-1]


def within_one_level(got: np.ndarray, want: np.ndarray) -> bool:
    """The OpenCV colour-space round trip against the exact numpy form: at most one level apart, and
    rarely (`test_train_image.py`); black (the padding, among others) stays black."""
    diff = np.abs(got.astype(int) - want)
    black = (want == 0).all(0)
    return bool(diff.max() <= 1 and (diff > 0).mean() < 0.1 and (got[:, black] == 0).all())


def _dataset(tiny_coco: tuple[Path, Path], seed: int = 0) -> DetectionDataset:
    index = load_index(tiny_coco[0], tiny_coco[1], train=True)
    # test_size=None: training rescales are drawn relative to input_size (what train_affine does by default)
    spec = DataSpec(dataset="coco", input_size=64, test_size=None, photometric=True, scale_range=(0.3, 1.4))
    return DetectionDataset(index, spec, seed, train=True)


def _same(a: object, b: object) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("image", "boxes", "labels", "to_original"))


def test_samples_are_a_function_of_seed_epoch_index(tiny_coco: tuple[Path, Path]) -> None:
    ds = _dataset(tiny_coco)
    first = ds[(3, 1)]
    for key in [(0, 0), (3, 2), (5, 1)]:  # other draws in between change nothing
        ds[key]
    assert _same(ds[(3, 1)], first)
    assert _same(_dataset(tiny_coco)[(3, 1)], first)  # a fresh dataset (another worker) agrees
    assert not torch.equal(ds[(4, 1)].image, first.image)  # another epoch draws anew
    assert not torch.equal(_dataset(tiny_coco, seed=1)[(3, 1)].image, first.image)
    assert first.image.shape == (3, 64, 64) and first.image.dtype == torch.uint8


def test_sample_equals_previous_pipeline(tiny_coco: tuple[Path, Path]) -> None:
    ds = _dataset(tiny_coco)
    idx, spec = ds.index, ds.spec
    padded = 0
    for epoch in range(6):  # scales down to 0.3 take the JPEG draft path on some draws
        for i in range(len(idx)):
            h, w = (int(v) for v in idx.sizes[i])
            a = train_affine(np.random.default_rng([0, epoch, i]), w, h, 64, spec.scale_range, spec.flip_prob)
            img = Image.open(idx.image_dir / idx.file_names[i])
            if abs(a[0, 0]) < 0.5:
                img.draft("RGB", (max(1, int(w * abs(a[0, 0]))), max(1, int(h * abs(a[0, 0])))))
            img = img.convert("RGB")
            a = a @ np.diag([w / img.size[0], h / img.size[1], 1.0])
            pixels = previous_photometric_distort(opencv_warp(img, a), np.random.default_rng([0, epoch, i, 1]))
            pixels = reference_zero_padding(pixels, a @ np.diag([img.size[0] / w, img.size[1] / h, 1.0]), w, h)
            assert within_one_level(ds[(epoch, i)].image.numpy(), pixels.transpose(2, 0, 1)), (epoch, i)
            padded += int((pixels == 0).all(-1).sum())
    assert padded > 0  # scales below 1 leave padding around the image


@pytest.mark.parametrize("ratios", [(0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3), (2.5, 3.0)])
def test_center_crop_samples(tiny_coco: tuple[Path, Path], ratios: tuple[float, ...]) -> None:
    """The recipes' crop in the dataset: boxes and labels are the crop's, aligned, and a function of
    (seed, epoch, index). Ratios 2.5 and 3 shrink a 64-pixel window's image below half size: the JPEG
    draft decode path."""
    index = load_index(tiny_coco[0], tiny_coco[1], train=True)
    crop = CenterCropSpec(ratios=ratios)
    spec = DataSpec(dataset="coco", input_size=64, test_mode="pad", photometric=True, center_crop=crop)
    ds = DetectionDataset(index, spec, 0, train=True)
    dropped = kept = 0
    for epoch in range(5):
        for i in range(len(index)):
            s = ds[(epoch, i)]
            h, w = (int(v) for v in index.sizes[i])
            rng = np.random.default_rng([0, epoch, i])
            a, keep = center_crop_affine(rng, w, h, index.boxes[i], 64, ratios, 128, 0.5)
            want, keep2 = transform_boxes(index.boxes[i][keep], a, (64, 64), spec.min_box_size)
            assert (abs(a[0, 0]) < 0.5) == (min(ratios) > 2)  # the draft path is taken
            assert s.image.shape == (3, 64, 64) and len(s.boxes) == len(s.labels)
            assert torch.allclose(s.boxes, torch.from_numpy(want), atol=1e-4)
            assert torch.equal(s.labels, torch.from_numpy(index.labels[i][keep][keep2]))
            assert torch.allclose(s.to_original, torch.from_numpy(invert(a)), atol=1e-6)
            img = Image.open(index.image_dir / index.file_names[i])
            if abs(a[0, 0]) < 0.5:
                img.draft("RGB", (max(1, int(w * abs(a[0, 0]))), max(1, int(h * abs(a[0, 0])))))
            img = img.convert("RGB")
            pixels = opencv_warp(img, a @ np.diag([w / img.size[0], h / img.size[1], 1.0]))
            pixels = previous_photometric_distort(pixels, np.random.default_rng([0, epoch, i, 1]))
            pixels = reference_zero_padding(pixels, a, w, h)
            assert within_one_level(s.image.numpy(), pixels.transpose(2, 0, 1)), (epoch, i)
            kept += len(s.labels)
            dropped += len(index.labels[i]) - len(s.labels)
    assert kept > 0 and (dropped > 0 or min(ratios) > 2)  # the crop's box filter is exercised
    first = ds[(3, 1)]
    assert _same(DetectionDataset(index, spec, 0, train=True)[(3, 1)], first)
    assert not torch.equal(ds[(4, 1)].image, first.image)


def test_collate_in_shared_memory_equals_private(tiny_coco: tuple[Path, Path]) -> None:
    ds = _dataset(tiny_coco)
    samples = [ds[(1, i)] for i in range(4)]
    private = collate_train(samples, 3, 4, 0.3)  # not in a worker: private memory
    shared = collate_train(samples, 3, 4, 0.3, shared=True)
    assert private.keys() == shared.keys()
    for key in private:
        assert torch.equal(private[key], shared[key]), key
    assert all(shared[k].is_shared() for k in ("images", "heatmap", "wh", "offset", "reg_weight"))
    assert not private["heatmap"].is_shared()


def test_targets_heatmap_equals_previous_renderer() -> None:
    gen = torch.Generator().manual_seed(0)
    for b, n, feat in [(4, 30, (32, 40)), (2, 7, (128, 128)), (3, 1, (9, 5))]:
        centre = torch.rand(b, n, 2, generator=gen) * torch.tensor([feat[1], feat[0]]) * 4
        size = torch.rand(b, n, 2, generator=gen) ** 2 * 200 + 1
        boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
        labels = torch.randint(-1, 6, (b, n), generator=gen)
        want = previous_heatmap(boxes, labels, 6, feat, 4)
        got = make_targets(boxes, labels, 6, feat, 4)
        assert torch.equal(got["heatmap"], want)
        into_shared = make_targets(boxes, labels, 6, feat, 4, empty=shared_empty)
        assert all(torch.equal(into_shared[k], got[k]) and into_shared[k].is_shared() for k in got)
