"""What only a GPU can check: the step on cuda (eager and compiled; fp32, bf16, fp16 with loss scaling),
device augmentation against the workers path, decoding, evaluation and checkpoints across devices.

Marked `cuda`: skipped without a GPU. `benchmarks/gpu_check.sh` runs them (`pytest -m cuda`); its cpu dry
run (`--device cpu`) sets CENTERPOINT_TEST_DEVICE=cpu so they run here on the cpu, without the slow
compiled variants (CENTERPOINT_TEST_QUICK=1), and cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from centerpoint.checkpoint import load_checkpoint, restore_state, save_checkpoint
from centerpoint.data.coco import load_index
from centerpoint.data.device_augment import augment_batch
from centerpoint.data.loader import DetectionDataset, collate_source, collate_train
from centerpoint.data.targets import make_targets
from centerpoint.evaluation.decode import boxes_to_original, decode_heatmap
from centerpoint.evaluation.evaluate import compute_metrics, predict_split
from centerpoint.model import build_network, init, make_apply
from centerpoint.optim.loss_scale import init_loss_scale
from centerpoint.optim.plan import build_optimizer
from centerpoint.runtime.devices import make_backend, resolve_precision, step_mode
from centerpoint.runtime.memory_format import channels_last
from centerpoint.spec_io import load_spec
from centerpoint.state import TrainState, init_state
from centerpoint.step import make_predict_step, make_train_step
from tests.helpers import write_box_coco

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("CENTERPOINT_TEST_DEVICE") == "cpu":
        return "cpu"  # gpu_check.sh --device cpu: the dry run
    pytest.skip("needs a CUDA GPU")


def _quick() -> bool:
    return os.environ.get("CENTERPOINT_TEST_QUICK") == "1"


def _batch(b: int = 4, size: int = 64, classes: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, 3, 2, generator=g) * (size - 24)
    boxes = torch.cat([xy, xy + 8 + torch.rand(b, 3, 2, generator=g) * 14], -1)
    labels = torch.randint(0, classes, (b, 3), generator=g)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)
    return {"images": images, **make_targets(boxes, labels, classes, (size // 4, size // 4), 4)}


def _step(device: str, precision: str, compiled: bool = False, *sets: str):  # noqa: ANN202
    spec = load_spec(None, ["schedule.warmup_steps=0", "runtime.channels_last=true", *sets])
    backend = make_backend(device)  # type: ignore[arg-type]
    plan = build_optimizer(spec, 10, 4)
    params, buffers = init(spec.model, 0)
    dev = backend.device
    scaler = init_loss_scale(spec.runtime.loss_scale, dev) if precision == "fp16" else None
    state = init_state({k: channels_last(v.to(dev)) for k, v in params.items()},
                       {k: channels_last(v.to(dev)) for k, v in buffers.items()}, plan.transform, scaler)
    net = build_network(spec.model).to(dev, memory_format=torch.channels_last)
    step = make_train_step(make_apply(net, traced=compiled), spec, plan.transform, step_mode(backend, compiled),
                           autocast=lambda: backend.autocast(precision))
    return (torch.compile(step) if compiled else step), state


def _run(step, state: TrainState, device: str, steps: int = 3) -> tuple[TrainState, list[dict[str, float]]]:  # noqa: ANN001
    out = []
    for s in range(steps):
        batch = {k: v.to(device) for k, v in _batch(seed=s).items()}
        state, metrics = step(state, batch)
        out.append({k: float(v) for k, v in metrics.items()})
    return state, out


def test_eager_fp32_step_on_the_device_matches_cpu(device: str) -> None:
    step, state = _step("cpu", "fp32")
    _, want = _run(step, state, "cpu")
    step, state = _step(device, "fp32")
    with torch.backends.cudnn.flags(allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        _, got = _run(step, state, device)
    for g, w in zip(got, want, strict=True):
        assert g["finite"] == 1.0
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train(device: str, precision: str) -> None:
    if device == "cpu" and precision == "fp16":
        pytest.skip("fp16 needs an accelerator")
    backend = make_backend(device)  # type: ignore[arg-type]
    if device == "cpu" and resolve_precision(backend, "auto") != "bf16":
        pytest.skip("this cpu has no native bf16")
    step, state = _step("cpu", "fp32")
    _, ref = _run(step, state, "cpu")
    step, state = _step(device, precision)
    state, got = _run(step, state, device, steps=3)
    assert all(g["finite"] == 1.0 for g in got)
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=5e-2)  # same state, lower precision
    if precision == "fp16":  # the dynamic loss scale halves on each overflow step, which is skipped
        overflows = int(sum(g["overflow"] for g in got))
        assert float(state.scaler["scale"]) == 65536.0 * 0.5**overflows and int(state.step) == 3 - overflows
        assert overflows < 3


def test_fp16_loss_scale_halves_on_overflow_and_skips(device: str) -> None:
    if device == "cpu":
        pytest.skip("fp16 needs an accelerator")
    step, state = _step(device, "fp16", False, "runtime.loss_scale=1e38")
    before = {k: v.clone() for k, v in state.params.items()}
    state, metrics = step(state, {k: v.to(device) for k, v in _batch().items()})
    # the loss is finite (not a failure), its scaled gradients are not: skipped, and the scale halves
    assert float(metrics["finite"]) == 1.0 and float(metrics["overflow"]) == 1.0
    assert float(state.scaler["scale"]) == pytest.approx(5e37, rel=1e-6) and int(state.step) == 0
    assert all(torch.equal(before[k], v) for k, v in state.params.items())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_step_matches_eager(device: str, precision: str) -> None:
    if _quick():
        pytest.skip("compiling takes minutes on a cpu; the GPU run checks it")
    eager, state = _step(device, precision)
    _, want = _run(eager, state, device)
    compiled, state = _step(device, precision, True)
    _, got = _run(compiled, state, device)
    tol = 1e-3 if precision == "fp32" else 3e-2
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=tol)


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    def draw(rng: np.random.Generator, w: int, h: int) -> Image.Image:
        base = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        return base

    return write_box_coco(tmp_path_factory.mktemp("cuda_coco"), 6, 3, ".jpg", draw)


def test_device_augmentation_matches_the_workers_path(device: str, small_coco: tuple[Path, Path]) -> None:
    spec = load_spec(None, ["data.dataset=coco", "data.input_size=64", "data.photometric=true",
                            "data.test_size=null", "model.num_classes=3"]).data
    index = load_index(small_coco[0], small_coco[1], train=True)
    keys = [(1, i) for i in range(len(index))]
    workers = collate_train([DetectionDataset(index, spec, 0, True)[k] for k in keys], 3, 4, 0.3)
    source = collate_source([DetectionDataset(index, spec, 0, True, on_device=True)[k] for k in keys],
                            3, 4, 0.3, 64)
    radius = int(source.pop("max_radius"))
    source.pop("bad_images")
    out = augment_batch({k: v.to(device) for k, v in source.items()}, radius, 64, 3, 4, 0.3)
    for key in ("heatmap", "wh", "offset", "reg_weight"):  # exp() may differ in the last bit between devices
        torch.testing.assert_close(out[key].cpu(), workers[key], rtol=1e-6, atol=1e-7, msg=key)
    diff = (out["images"].cpu() - workers["images"].float()).abs()
    assert float(diff.max()) <= 8 and float(diff.mean()) < 1  # the workers path rounds to uint8


def test_decode_on_the_device_matches_cpu(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(2, 5, 32, 32, generator=g) ** 8
    wh, offset = torch.rand(2, 2, 32, 32, generator=g) * 20, torch.rand(2, 2, 32, 32, generator=g)
    want = decode_heatmap(heat, wh, offset, 4, k=20)
    got = decode_heatmap(heat.to(device), wh.to(device), offset.to(device), 4, k=20)
    for w, x in zip(want, got, strict=True):
        torch.testing.assert_close(x.cpu(), w)
    affine = torch.tensor([[[0.5, 0.0, 3.0], [0.0, 0.5, -2.0]]]).repeat(2, 1, 1)
    torch.testing.assert_close(boxes_to_original(got[0], affine.to(device)).cpu(), boxes_to_original(want[0], affine))


def test_evaluation_on_the_device_matches_cpu(device: str, small_coco: tuple[Path, Path]) -> None:
    spec = load_spec(None, ["data.dataset=coco", "data.input_size=64", "data.test_size=64", "model.num_classes=3",
                            "data.workers=0", "eval.batch_size=4"])
    index = load_index(small_coco[0], small_coco[1], train=False)
    params, buffers = init(spec.model, 0)
    results = {}
    for where in ("cpu", device):
        backend = make_backend(where)  # type: ignore[arg-type]
        net = build_network(spec.model).to(backend.device)
        predict = make_predict_step(make_apply(net, traced=False), spec)
        with torch.backends.cudnn.flags(allow_tf32=False):
            rows, bad = predict_split(predict, {k: v.to(backend.device) for k, v in params.items()},
                                      {k: v.to(backend.device) for k, v in buffers.items()}, index, spec, backend)
        results[where] = (rows, compute_metrics(index, rows, spec))
        assert bad == 0
    (rows_cpu, m_cpu), (rows_dev, m_dev) = results["cpu"], results[device]
    assert abs(len(rows_cpu) - len(rows_dev)) <= 2  # a box clipped to zero size at a border may come and go
    for image_id in np.unique(rows_cpu[:, 0]):  # each image's scores (near-ties may swap places in the top-k)
        a, b = (np.sort(r[r[:, 0] == image_id, 5])[::-1][:50] for r in (rows_cpu, rows_dev))
        assert np.allclose(a, b, atol=1e-4), image_id
    assert abs(m_cpu["bbox_mAP"] - m_dev["bbox_mAP"]) < 1e-3


def test_checkpoint_round_trip_between_devices(device: str, tmp_path: Path) -> None:
    spec = load_spec(None, ["runtime.precision=fp16"]) if device == "cuda" else load_spec(None)
    step, state = _step(device, "fp16" if device == "cuda" else "fp32")
    state, _ = _run(step, state, device, steps=1)
    path = save_checkpoint(tmp_path / "a.safetensors", state, spec, 1)
    ckpt = load_checkpoint(path)
    _, cpu_template = _step("cpu", "fp16" if device == "cuda" else "fp32")
    on_cpu = restore_state(ckpt, cpu_template)
    assert all(v.device.type == "cpu" and torch.equal(v, state.params[k].cpu()) for k, v in on_cpu.params.items())
    assert all(torch.equal(v, state.opt_state[k].cpu()) for k, v in on_cpu.opt_state.items())
    save_checkpoint(tmp_path / "b.safetensors", on_cpu, spec, 1)
    back = restore_state(load_checkpoint(tmp_path / "b.safetensors"), state)
    assert all(v.device == state.params[k].device and torch.equal(v, state.params[k]) for k, v in back.params.items())
    assert int(back.step) == int(state.step) and sorted(back.scaler) == sorted(state.scaler)
    assert all(torch.equal(v, state.scaler[k]) for k, v in back.scaler.items())
