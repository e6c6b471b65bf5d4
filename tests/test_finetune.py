"""`model.init_from`: what is loaded, re-initialised and ignored, how it composes with `model.pretrained`,
its errors, and that fine-tuning beats training from scratch for the same number of steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from centerpoint.errors import CenterpointError
from centerpoint.spec_io import load_spec

NET = ["model.width=8", "model.neck_channels=[16,16,8]", "model.head_channels=8"]


def _save(path: Path, sets: list[str], seed: int = 1) -> Path:
    from centerpoint.checkpoint import save_checkpoint
    from centerpoint.model import init
    from centerpoint.optim.plan import build_optimizer
    from centerpoint.state import init_state

    spec = load_spec(None, [*NET, *sets])
    params, buffers = init(spec.model, seed)
    params = {k: v + 0.5 for k, v in params.items()}  # unlike any fresh init
    return save_checkpoint(path, init_state(params, buffers, build_optimizer(spec, 1, 8).transform), spec, epoch=1)


def test_other_class_count_reinitialises_only_the_heatmap_output(tmp_path: Path) -> None:
    from centerpoint.model import init
    from centerpoint.weights.finetune import init_from

    ckpt = _save(tmp_path / "five.safetensors", ["model.num_classes=5"])
    spec3 = load_spec(None, [*NET, "model.num_classes=3"]).model
    fresh_p, fresh_b = init(spec3, 0)
    lines: list[str] = []
    params, buffers = init_from(ckpt, fresh_p, fresh_b, lines.append)
    from centerpoint.checkpoint import load_checkpoint

    saved = load_checkpoint(ckpt)
    src = {**saved.group("params"), **saved.group("buffers")}
    out = {**params, **buffers}
    head = {"bbox_head.heatmap_head.2.weight", "bbox_head.heatmap_head.2.bias"}
    assert all(torch.equal(out[k], src[k]) for k in out if k not in head)
    assert all(torch.equal(params[k], fresh_p[k]) for k in head)  # as a new head starts
    assert torch.allclose(params["bbox_head.heatmap_head.2.bias"], torch.full((3,), -math.log(9.0)))
    assert len(lines) == 1
    assert f"loaded {len(out) - 2} tensors, re-initialised 2 (the class count differs)" in lines[0]
    assert lines[0].endswith("bbox_head.heatmap_head.2.bias, bbox_head.heatmap_head.2.weight, ignored none")


def test_init_from_wins_over_pretrained_and_both_apply(tmp_path: Path, cache_dir: Path) -> None:
    """Through the run builder: the backbone file gives every backbone tensor, the checkpoint then replaces
    them (it has them all), and the heads come from the checkpoint except the re-initialised heatmap output."""
    from rich.console import Console

    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.model import init
    from centerpoint.run import build_run
    from tests.own_coco import OTHER_CATEGORIES, write_own_coco

    data = write_own_coco(tmp_path / "data", train=2, val=1, categories=OTHER_CATEGORIES)
    ckpt = _save(tmp_path / "five.safetensors", ["model.num_classes=5"])
    backbone, bn = init(load_spec(None, NET).model, 7)
    torchvision_like = {k.removeprefix("backbone."): v + 3.0 if v.is_floating_point() else v
                        for k, v in {**backbone, **bn}.items() if k.startswith("backbone.")}
    torch.save(torchvision_like, tmp_path / "resnet.pth")
    console = Console(record=True, width=300)
    spec = load_spec(None, [*NET, "data.dataset=coco", f"data.root={data}", "data.workers=0", "train.batch_size=2",
                            f"logging.workdir={tmp_path / 'run'}", f"model.pretrained={tmp_path / 'resnet.pth'}",
                            f"model.init_from={ckpt}"])
    run = build_run(spec, False, console)
    run.lock.release(remove_created=True)
    assert run.spec.model.num_classes == 3  # null: from the data
    saved = load_checkpoint(ckpt).group("params")
    got = {k: v.cpu() for k, v in run.state.params.items()}
    assert all(torch.equal(got[k], saved[k]) for k in got if k.startswith("backbone."))
    assert torch.equal(got["bbox_head.wh_head.2.weight"], saved["bbox_head.wh_head.2.weight"])
    assert got["bbox_head.heatmap_head.2.weight"].shape[0] == 3
    text = console.export_text()
    assert "model.init_from" in text and "re-initialised 2" in text


@pytest.mark.parametrize("what,message", [
    ("missing.safetensors", "checkpoint not found"),
    ("weights.pth", "convert it first with `centerpoint checkpoint import mmdet"),
    ("wide.safetensors", "fits under half of this model's parameters"),
])
def test_init_from_errors(tmp_path: Path, what: str, message: str) -> None:
    from centerpoint.model import init
    from centerpoint.weights.finetune import init_from

    _save(tmp_path / "wide.safetensors", ["model.width=16", "model.neck_channels=[32,32,16]",
                                          "model.head_channels=16"])
    params, buffers = init(load_spec(None, NET).model, 0)
    with pytest.raises(CenterpointError, match=message.replace("`", ".").replace("(", ".")):
        init_from(tmp_path / what, params, buffers)


def test_fine_tuning_beats_training_from_scratch_for_the_same_steps(tmp_path: Path, cache_dir: Path) -> None:
    """A model trained on synthetic shapes (4 classes: coloured ellipses and rectangles) is fine-tuned on a
    3-class dataset of other shapes; after the same few steps it detects them, from scratch nothing does."""
    from rich.console import Console

    from centerpoint.run import build_run
    from centerpoint.train import train
    from tests.own_coco import OTHER_CATEGORIES, write_own_coco

    pre_data = write_own_coco(tmp_path / "pre", train=64, val=8, seed=1, scale=0.5)
    new_data = write_own_coco(tmp_path / "new", train=16, val=16, seed=2, categories=OTHER_CATEGORIES, scale=0.5)
    common = ["model.width=8", "model.neck_channels=[16,16,16]", "model.head_channels=16", "data.input_size=64",
              "data.test_size=96", "data.scale_range=[0.9,1.1]", "train.batch_size=8", "optim.lr=0.01",
              "schedule.kind=constant", "schedule.warmup_steps=10", "loss.wh_weight=1.0", "eval.flip_test=false",
              "data.dataset=coco", "data.workers=0", "train.eval_every=0", "logging.progress=false",
              "logging.tensorboard=false", "runtime.threads=2"]

    def run(name: str, data: Path, steps: int, *more: str) -> dict:
        spec = load_spec(None, [*common, f"data.root={data}", f"logging.workdir={tmp_path / name}",
                                f"train.max_steps={steps}", *more])
        console = Console(quiet=True)
        return train(build_run(spec, False, console), console)

    run("pretrained", pre_data, 200)
    steps = 25
    scratch = run("scratch", new_data, steps)
    tuned = run("tuned", new_data, steps, f"model.init_from={tmp_path / 'pretrained/checkpoints/latest.safetensors'}")
    print(f"after {steps} steps: fine-tuned bbox_mAP {tuned['bbox_mAP']:.4f} mAP_50 {tuned['bbox_mAP_50']:.4f}, "
          f"from scratch {scratch['bbox_mAP']:.4f} mAP_50 {scratch['bbox_mAP_50']:.4f}")
    assert tuned["bbox_mAP_50"] > scratch["bbox_mAP_50"] + 0.005
    assert tuned["bbox_mAP"] > scratch["bbox_mAP"]
