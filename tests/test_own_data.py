"""A user's own COCO dataset end to end, as README's "Train on your own data" says (its commands run
verbatim), plus the class checks of eval, predict and checkpoints, and the TensorBoard pictures."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.own_coco import CATEGORIES, write_own_coco

ROOT = Path(__file__).resolve().parents[1]
NAMES = [c["name"] for c in CATEGORIES]


def readme_commands(section: str = "## Train on your own data") -> list[list[str]]:
    """The `centerpoint ...` command lines of a README section, split as a shell would."""
    text = (ROOT / "README.md").read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line.strip()) for line in body.splitlines() if line.startswith("    centerpoint ")]


def run_in(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "centerpoint", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def tensorboard_tags(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_readme_own_data_section_runs_verbatim(tmp_path: Path, cache_dir: Path) -> None:
    write_own_coco(tmp_path / "mydata")
    commands = readme_commands()
    assert [c[1] for c in commands] == ["data", "train", "eval", "predict", "checkpoint", "train"]
    out = {}
    for cmd in commands:
        res = run_in(tmp_path, cmd[1:])
        assert res.returncode == 0, (cmd, res.stderr[-3000:])
        out[" ".join(cmd[1:3])] = res.stdout
    check = out["data check"]
    assert "suggested: --set data.input_size=" in check and "image longer side" in check
    table_lines = [line for line in check.splitlines() if line[:1] in "┃│┏┡└┗"]
    assert table_lines and max(len(line) for line in table_lines) <= 80  # readable in an 80-column log
    # classes from the data: 4 categories, their names everywhere
    inspect = out["checkpoint inspect"]
    assert "classes 4: bolt (id 3), nut (id 7), washer (id 12), spring (id 40)" in inspect
    assert "num_classes: 4" in inspect
    assert all(name in out["eval --checkpoint"] for name in NAMES)
    assert (tmp_path / "predictions" / "val_000.jpg").is_file()
    predicted = json.loads((tmp_path / "predictions" / "detections.json").read_text())
    assert {d["label"] for d in predicted} <= set(NAMES)
    assert {d["category_id"] for d in predicted} <= {c["id"] for c in CATEGORIES}  # COCO results, the data's ids
    ft = " ".join(out["train --data-dir"].split())
    assert "model.init_from runs/mydata/checkpoints/best.safetensors: loaded" in ft
    assert "re-initialised none, ignored none" in ft  # same classes: every tensor fits
    # TensorBoard of the first run: pictures, per-class AP, eval time and PR curves
    acc = tensorboard_tags(tmp_path / "runs" / "mydata")
    tags = acc.Tags()
    assert [f"val_images/{k}" for k in range(4)] == sorted(tags["images"])
    picture = acc.Images("val_images/0")[-1]
    assert picture.width > 2 * 160 and picture.height >= 240  # two panels, enlarged for readable labels
    present = {"nut", "washer", "spring"}  # classes with validation boxes (the val split has no bolt)
    assert {f"val_AP/{n}" for n in present} <= set(tags["scalars"]) and "val/eval_s" in tags["scalars"]
    assert {f"val_PR/{n}" for n in present} <= set(tags["tensors"])
    curve = acc.Tensors("val_PR/nut")[-1]
    from tensorboard.util import tensor_util

    values = tensor_util.make_ndarray(curve.tensor_proto)  # (6 rows: tp fp tn fn precision recall, 101)
    assert values.shape == (6, 101) and np.allclose(values[5], np.linspace(0, 1, 101))


def _checkpoint(path: Path, classes: tuple[str, ...] | None, ids: tuple[int, ...] = ()) -> Path:
    """A checkpoint of a small untrained network for the 4 classes, recording `classes` (None: nothing, as
    earlier versions wrote)."""
    from centerpoint.checkpoint import save_checkpoint
    from centerpoint.classes import Classes
    from centerpoint.model import init
    from centerpoint.optim.plan import build_optimizer
    from centerpoint.spec_io import load_spec
    from centerpoint.state import init_state

    spec = load_spec(None, ["data.dataset=coco", "model.num_classes=4", "model.width=8",
                            "model.neck_channels=[16,16,8]", "model.head_channels=8", "data.workers=0",
                            "eval.flip_test=false"])
    params, buffers = init(spec.model, 0)
    params["bbox_head.wh_head.2.bias"] += 4.0  # boxes of 4 cells (16 pixels), not of ~0: predict keeps them
    state = init_state(params, buffers, build_optimizer(spec, 1, 8).transform)
    recorded = Classes(classes, ids) if classes is not None else None
    return save_checkpoint(path, state, spec, epoch=1, classes=recorded)


def test_eval_maps_classes_by_name_and_refuses_other_classes(tmp_path: Path, cache_dir: Path) -> None:
    data = write_own_coco(tmp_path / "mydata", train=2, val=3)
    shuffled = ("spring", "bolt", "washer", "nut")  # the data's names in another order
    ckpt = _checkpoint(tmp_path / "shuffled.safetensors", shuffled, (1, 2, 3, 4))
    res = run_in(tmp_path, ["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--out", "m.json"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mapped by class name" in res.stderr
    from centerpoint.classes import classes_of

    assert classes_of(ckpt) == list(shuffled)
    # detections carry the data's category id of the checkpoint's class: label 0 ("spring") -> id 40
    dets = json.loads((tmp_path / "m.detections.json").read_text())
    assert {d["category_id"] for d in dets} <= {3, 7, 12, 40} and dets
    res = run_in(tmp_path, ["predict", "--checkpoint", str(ckpt), "mydata/val/val_000.jpg", "--out", "p",
                            "--score-thr", "0"])
    labels = {d["label"] for d in json.loads((tmp_path / "p" / "detections.json").read_text())}
    # the checkpoint's names in its own label order: label 0 is "spring" (in the data's order it would be "bolt")
    assert res.returncode == 0 and "spring" in labels and labels <= set(shuffled)
    other = _checkpoint(tmp_path / "other.safetensors", ("cat", "dog", "bird", "fish"))
    res = run_in(tmp_path, ["eval", "--checkpoint", str(other), "--data-dir", str(data)])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "[bolt, nut, washer, spring] differ from the classes of" in lines[0] and "[cat, dog, bird, fish]" in lines[0]


def test_checkpoints_without_classes_stay_loadable(tmp_path: Path, cache_dir: Path) -> None:
    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.classes import classes_of

    old = _checkpoint(tmp_path / "old.safetensors", None)
    assert load_checkpoint(old).classes is None
    assert classes_of(old) == ["0", "1", "2", "3"]  # its spec names no data at hand: the labels' numbers
    res = run_in(tmp_path, ["checkpoint", "inspect", str(old)])
    assert res.returncode == 0 and "classes 4 (not recorded in the file: from its spec): 0, 1, 2, 3" in res.stdout


def test_bad_classes_metadata_is_one_line_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = _checkpoint(tmp_path / "c.safetensors", tuple(NAMES), (3, 7, 12, 40))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**meta, "classes": '{"names": [1, 2]}'})
    res = run_in(tmp_path, ["checkpoint", "inspect", str(path)])
    assert res.returncode == 2 and "metadata 'classes' must be a JSON object" in res.stderr


def test_data_check_names_the_field_of_a_missing_file(tmp_path: Path) -> None:
    data = write_own_coco(tmp_path / "mydata", train=2, val=2)
    res = run_in(tmp_path, ["data", "check", "--data-dir", str(data), "--set", "data.val_ann=annotations/v.json"])
    assert res.returncode == 2 and "(data.val_ann: annotations/v.json" in res.stderr
    res = run_in(tmp_path, ["train", "--data-dir", str(data), "--set", "data.train_ann=t.json"])
    assert res.returncode == 2 and "train annotations not found" in res.stderr
    assert "(data.train_ann: t.json" in res.stderr


@pytest.mark.parametrize("n", [2, 5])
def test_tags_never_overprint(n: int) -> None:
    from centerpoint.evaluation.visualize import draw_boxes, place_tags

    boxes = np.array([[10, 10, 60, 40]] * n, dtype=np.float64)  # the same box n times: tags must move
    tags = place_tags(boxes, [(50, 16)] * n, (200, 150))
    shown = [t for t in tags if t is not None]
    assert len(shown) >= 2
    for i, a in enumerate(shown):
        for b in shown[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    picture = draw_boxes(np.zeros((150, 200, 3), np.uint8), boxes, list(range(n)), ["a", "b", "c", "d", "e"],
                         [0.9] * n, min_side=0)
    assert picture.shape == (150, 200, 3) and picture.any()


def test_drawing_survives_a_diverged_model() -> None:
    from centerpoint.evaluation.visualize import draw_boxes

    boxes = np.array([[50, 40, 10, 10], [np.nan, 0, 5, 5], [0, 0, np.inf, 3], [5, 5, 30, 30]], dtype=np.float64)
    picture = draw_boxes(np.zeros((60, 80, 3), np.uint8), boxes, [0, 1, 2, 3], ["a", "b", "c", "d"],
                         [0.5, float("nan"), 0.4, 0.9], min_side=0)
    assert picture.shape == (60, 80, 3) and picture.any()
