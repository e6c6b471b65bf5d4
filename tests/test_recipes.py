"""The mmdetection COCO recipes: they validate, carry mmdetection's numbers, and build what they promise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from centerpoint.data.paths import load_split
from centerpoint.optim.plan import build_optimizer
from centerpoint.spec_io import load_spec
from tests.helpers import write_coco

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {False: ROOT / "experiments" / "centernet_r18_coco.yaml",
           True: ROOT / "experiments" / "centernet_r18_dcn_coco.yaml"}


@pytest.mark.parametrize("dcn", [False, True])
def test_recipe_values(dcn):
    s = load_spec(RECIPES[dcn])
    d, m, o, sch, t = s.data, s.model, s.optim, s.schedule, s.train
    assert s.name == ("centernet_r18_dcn_coco" if dcn else "centernet_r18_coco")
    assert (d.dataset, d.root) == ("coco", None)
    assert (d.train_ann, d.train_images) == ("annotations/instances_train2017.json", "train2017")
    assert (d.val_ann, d.val_images) == ("annotations/instances_val2017.json", "val2017")
    assert (d.input_size, d.test_mode, d.scale_range, d.photometric, d.flip_prob) == (512, "pad", (0.6, 1.3),
                                                                                       True, 0.5)
    assert (d.mean, d.std, d.workers) == ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 4)
    assert (m.depth, m.num_classes, m.neck_channels, m.head_channels, m.dcn) == (18, 80, (256, 128, 64), 64, dcn)
    assert m.pretrained == Path("resnet18-f37072fd.pth")
    assert (s.loss.heatmap_weight, s.loss.wh_weight, s.loss.offset_weight) == (1.0, 0.1, 1.0)
    assert (o.name, o.lr, o.base_batch, o.momentum, o.nesterov) == ("sgd", 0.02, 128, 0.9, False)
    assert (o.weight_decay, o.decay_norm_and_bias, o.grad_clip) == (1e-4, True, 35.0)
    assert (sch.kind, sch.warmup_steps, sch.warmup_ratio, sch.milestones, sch.gamma) == (
        "multistep", 1000, 0.001, (90, 120), 0.1)
    assert (t.epochs, t.batch_size, t.eval_every, t.max_steps) == (140, 16, 10, None)
    assert (s.eval.topk, s.eval.flip_test, s.eval.batch_size) == (100, False, 1)
    assert (s.runtime.compile, s.runtime.precision, s.runtime.sync_bn) == ("auto", "fp32", False)
    assert "28 x 5 = 140" in RECIPES[dcn].read_text()  # the RepeatDataset note


def test_recipes_differ_only_in_dcn_and_names():
    plain, dcn = (load_spec(RECIPES[k]).model_dump() for k in (False, True))
    diff = {(sec, k) for sec in plain if isinstance(plain[sec], dict)
            for k in plain[sec] if plain[sec][k] != dcn[sec][k]}
    assert diff == {("model", "dcn"), ("logging", "workdir")} and plain["name"] != dcn["name"]


def test_schedule_and_decay_as_built():
    """Linear scaling 0.02 x 16/128, warmup from x0.001 over 1000 steps, drops at epochs 90 and 120, and
    weight decay on every parameter (norms and biases too)."""
    spec = load_spec(RECIPES[False])
    spe = 100  # steps per epoch
    plan = build_optimizer(spec, spe, global_batch=16)
    assert plan.lr == pytest.approx(0.0025) and plan.total_steps == 140 * spe and plan.max_grad_norm == 35.0
    lr = [float(plan.schedule(torch.tensor(s))) for s in (0, 1000, 90 * spe - 1, 90 * spe, 120 * spe, 14_000)]
    assert lr == pytest.approx([0.0025e-3, 0.0025, 0.0025, 0.00025, 0.000025, 0.000025], rel=1e-5)
    params = {"bbox_head.wh_head.2.bias": torch.ones(2), "backbone.bn1.weight": torch.ones(3),
              "backbone.conv1.weight": torch.ones(1, 1, 1, 1)}
    state = plan.transform.init(params)
    updates, _ = plan.transform.update({k: torch.zeros_like(v) for k, v in params.items()}, state, params)
    for k, u in updates.items():  # zero gradient: the update is -lr(0) * weight_decay * param
        assert torch.allclose(u, torch.full_like(u, -0.0025e-3 * 1e-4), rtol=1e-5, atol=0), k


def test_coco_file_layout_is_what_the_recipe_reads(tmp_path):
    cats = [{"id": i + 1 + (i > 10), "name": f"class{i}"} for i in range(80)]  # COCO's ids have gaps
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        write_coco(tmp_path / "annotations" / f"instances_{split}.json",
                   [{"id": 1, "file_name": "000000000001.jpg", "height": 40, "width": 60}],
                   [{"id": 1, "image_id": 1, "category_id": 13, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0}],
                   cats)
    spec = load_spec(RECIPES[False], [f"data.root={tmp_path}"])
    for train in (True, False):
        index = load_split(spec, tmp_path, train)
        assert index.num_classes == 80 and index.image_dir == tmp_path / ("train2017" if train else "val2017")
        assert index.labels[0].tolist() == [11]  # ids 1..11, 13, ...: id 13 is label 11


def test_short_form_flags_resolve_on_the_recipe():
    from cli.options import resolve_spec

    spec = resolve_spec(RECIPES[False], [], batch_size=4, lr=1e-3, epochs=10, device="sdaa",
                        data_dir=Path("data/coco"))
    assert (spec.train.batch_size, spec.optim.lr, spec.train.epochs, spec.runtime.device) == (4, 1e-3, 10, "sdaa")
    assert spec.data.root == Path("data/coco")
