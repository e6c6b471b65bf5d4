"""Foreign data through the real CLI, checked where it is loaded: specs whose numbers cannot train, COCO
files with ids or sizes the project cannot use, image headers claiming absurd sizes, checkpoint metadata
the project does not write. Each is one `error:` line and exit 2, with nothing changed; non-finite boxes
and oversized images under `data.on_bad_image: skip` are dropped and counted instead."""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from centerpoint.spec_io import load_spec
from tests.conftest import TINY
from tests.helpers import call_cli, run_cli
from tests.test_bad_input import COCO, SETS, Shared, snapshot

Setup = Callable[[Path, Shared], list[str]]

SPEC_CASES = {  # --set override -> what the one-line error must name
    "data.std=[58.4,0,57.4]": ["data.std.1", "greater than 0"],
    "data.mean=[.nan,116.3,103.5]": ["data.mean.0", "finite number"],
    "optim.betas=[0.9,1.0]": ["optim.betas.1", "less than 1"],
    "optim.betas=[-0.1,0.999]": ["optim.betas.0", "greater than or equal to 0"],
    "optim.weight_decay=.inf": ["optim.weight_decay", "finite number"],
    "optim.lr=nan": ["optim.lr", "finite number"],
    "loss.wh_weight=1e400": ["loss.wh_weight", "finite number"],
    "schedule.milestones=[90,-1]": ["schedule.milestones.1", "greater than or equal to 0"],
    "model.neck_channels=[128,0,32]": ["model.neck_channels.1", "greater than or equal to 1"],
    "train.seed=18446744073709551616": ["train.seed", "less than or equal to 18446744073709551615"],
    "data.max_image_pixels=0": ["data.max_image_pixels"],
    "logging.workdir=runs/a\x00b": ["logging.workdir", "must not contain a NUL character"],
}

COCO_CASES = {  # an edit of a valid COCO dict -> what the error must name
    "height not a number": (lambda j: j["images"][0].update(height="96"), "images[0] (0.jpg, id 1): height must"),
    "fractional width": (lambda j: j["images"][1].update(width=72.5), "images[1] (1.jpg, id 2): width must"),
    "file name not a string": (lambda j: j["images"][1].update(file_name=7), "images[1] (id 2): file_name must"),
    "boolean image id": (lambda j: j["images"][0].update(id=True), "images[0]: id must be an integer"),
    "negative id": (lambda j: j["categories"][0].update(id=-1), "categories[0]: id must be an integer"),
    "boolean category ref": (lambda j: j["annotations"][0].update(category_id=True),
                             "annotations[0] refers to unknown category_id True (annotation id 1)"),
    "string image ref": (lambda j: j["annotations"][0].update(image_id="1"),
                         "annotations[0] refers to unknown image_id '1'"),
    "area not a number": (lambda j: j["annotations"][2].update(area="big"), "annotation id 3: area must be a number"),
    "bbox of strings": (lambda j: j["annotations"][1].update(bbox=["1", 2, 3, 4]), "annotation id 2: bbox must be 4"),
    "iscrowd of 2": (lambda j: j["annotations"][0].update(iscrowd=2), "annotation id 1: iscrowd must be 0 or 1"),
    "category name not a string": (lambda j: j["categories"][0].update(name=None),
                                   "categories[0] (id 1): name must be a string"),
    "entry not an object": (lambda j: j["images"].append([1]), "images[4] must be an object, got list"),
}


@pytest.mark.parametrize("override", list(SPEC_CASES))
def test_spec_rejects(override: str) -> None:
    from centerpoint.errors import CenterpointError

    with pytest.raises(CenterpointError) as info:
        load_spec(None, [override])
    assert "\n" not in str(info.value) and all(f in str(info.value) for f in SPEC_CASES[override]), info.value


@pytest.mark.parametrize("name", list(COCO_CASES))
def test_coco_json_rejects(name: str, tmp_path: Path) -> None:
    from centerpoint.data.coco_json import load_coco
    from centerpoint.errors import CenterpointError

    edit, fragment = COCO_CASES[name]
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in range(4)]
    anns = [{"id": k + 1, "image_id": k % 4 + 1, "category_id": 1, "bbox": [1, 2, 10, 12], "area": 120, "iscrowd": 0}
            for k in range(6)]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    edit(data)
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(CenterpointError, match=re.escape(f"{tmp_path / 'ann.json'}: {fragment}")):
        load_coco(tmp_path / "ann.json")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Shared:
    """A small COCO-format dataset (a copy of the tiny synthetic one) and a checkpoint of its model."""
    from centerpoint.checkpoint import save_checkpoint
    from centerpoint.data.paths import data_root
    from centerpoint.model import init
    from centerpoint.optim.plan import build_optimizer
    from centerpoint.state import init_state

    base = tmp_path_factory.mktemp("foreign")
    spec = load_spec(None, TINY)
    for part in ("train", "val", "annotations"):
        shutil.copytree(data_root(spec) / part, base / "data" / part)
    params, buffers = init(spec.model, 0)
    state = init_state(params, buffers, build_optimizer(spec, 3, 8).transform)
    ckpt = save_checkpoint(base / "ckpt.safetensors", state, spec, epoch=1)
    return Shared(base / "data", ckpt, base / "run")


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # its checksum covers type and data
    return bytes(data)


def _spec(*sets: str) -> Setup:
    return lambda d, s: ["spec", "show", *[x for o in sets for x in ("--set", o)]]


def _spec_file(text: str, command: str = "train") -> Setup:
    def setup(d: Path, s: Shared) -> list[str]:
        (d / "spec.yaml").write_text(text)
        return [command, str(d / "spec.yaml"), "--workdir", str(d / "run")] if command == "train" else \
            [command, "show", str(d / "spec.yaml")]
    return setup


def _train_on(edit: Callable[[Path], None], *extra: str) -> Setup:
    def setup(d: Path, s: Shared) -> list[str]:
        shutil.copytree(s.data, d / "data")
        edit(d / "data")
        return ["train", *SETS, *COCO, "--data-dir", str(d / "data"), "--workdir", str(d / "run"), *extra]
    return setup


def _json(split: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


def _string_ids(data: dict, which: slice) -> None:
    for image in data["images"][which]:
        for ann in data["annotations"]:
            if ann["image_id"] == image["id"]:
                ann["image_id"] = f"img{image['id']}"
        image["id"] = f"img{image['id']}"


def _bomb(root: Path) -> None:
    (root / "train" / "000000.jpg").write_bytes(bomb_png())


def _ckpt_with(key: str, value: str) -> Callable[[Path, Shared], Path]:
    def make(d: Path, s: Shared) -> Path:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(s.ckpt), framework="pt") as f:
            meta = {**(f.metadata() or {}), key: value}
        save_file(load_file(str(s.ckpt)), str(d / "odd.safetensors"), metadata=meta)
        return d / "odd.safetensors"
    return make


def _inspect(make: Callable[[Path, Shared], Path]) -> Setup:
    return lambda d, s: ["checkpoint", "inspect", str(make(d, s))]


def _eval(make: Callable[[Path, Shared], Path]) -> Setup:
    return lambda d, s: ["eval", "--checkpoint", str(make(d, s)), "--set", "eval.max_images=1"]


def _empty_pth(d: Path, s: Shared) -> list[str]:
    (d / "empty.pth").write_bytes(b"")
    return ["checkpoint", "import", "mmdet", str(d / "empty.pth"), str(d / "out.safetensors")]


def _predict_bomb(d: Path, s: Shared) -> list[str]:
    (d / "bomb.png").write_bytes(bomb_png())
    return ["predict", "--checkpoint", str(s.ckpt), str(d / "bomb.png"), "--out", str(d / "pred")]


CASES: dict[str, tuple[Setup, list[str]]] = {
    # specs that would train nothing: each field named (every field's rule: test_spec_rejects)
    "std with a zero": (_spec("data.std=[58.4,0,57.4]"), ["data.std.1", "greater than 0"]),
    "nan in mean": (_spec("data.mean=[.nan,116.3,103.5]"), ["data.mean.0", "finite number"]),
    "seed beyond 64 bits": (_spec("train.seed=18446744073709551616"), ["train.seed", "18446744073709551615"]),
    "nan in a spec file": (_spec_file("data:\n  scale_range: [.nan, 1.3]\n"), ["data.scale_range.0", "finite"]),
    # COCO files: checked when loaded, before training, naming the file and the entry
    "string image ids": (_train_on(_json("train", lambda j: _string_ids(j, slice(None)))),
                         ["instances_train.json: images[0]: id must be an integer from 0 to 2**53, got 'img1'"]),
    "mixed image ids": (_train_on(_json("train", lambda j: _string_ids(j, slice(3, 4)))),
                        ["instances_train.json: images[3]: id must be an integer from 0 to 2**53, got 'img4'"]),
    "image id beyond 2**53": (_train_on(_json("val", lambda j: j["images"][0].update(id=2**63))),
                              ["instances_val.json: images[0]: id must be an integer", str(2**63)]),
    "val image of width 0": (_train_on(_json("val", lambda j: j["images"][2].update(width=0))),
                             ["instances_val.json: images[2] (000002.jpg, id 3): width must be a positive whole "
                              "number of pixels, got 0"]),
    # image headers
    "decompression bomb in training": (_train_on(_bomb), ["000000.jpg is 10000000000 pixels, more than "
                                                          "data.max_image_pixels=89478485"]),
    "decompression bomb in predict": (_predict_bomb, ["bomb.png is 10000000000 pixels, more than "
                                                      "data.max_image_pixels"]),
    "image over a lowered pixel limit": (_train_on(lambda r: None, "--set", "data.max_image_pixels=1000"),
                                         [" x ", "pixels, more than data.max_image_pixels=1000"]),
    "image over the pixel limit but under twice Pillow's": (
        _train_on(lambda r: (r / "train" / "000000.jpg").write_bytes(bomb_png(10_000, 10_000))),
        ["000000.jpg is 10000 x 10000 = 100000000 pixels, more than data.max_image_pixels=89478485"]),
    # checkpoint metadata the project does not write
    "step not a number (inspect)": (_inspect(_ckpt_with("step", "three")), ["metadata 'step' must be a "
                                                                            "non-negative whole number, got 'three'"]),
    "step not a number (eval)": (_eval(_ckpt_with("step", "3.5")), ["odd.safetensors: metadata 'step'"]),
    "metrics not json": (_inspect(_ckpt_with("metrics", "{bbox_mAP: 0.3")), ["metadata 'metrics' must be a JSON "
                                                                              "object"]),
    "metrics not an object": (_inspect(_ckpt_with("metrics", "[0.3]")), ["metadata 'metrics'", "'[0.3]'"]),
    "metric not a number": (_inspect(_ckpt_with("metrics", '{"bbox_mAP": "high"}')), ["metadata 'metrics'"]),
    "data identity not an object": (_inspect(_ckpt_with("data", "7")), ["metadata 'data' must be a JSON object"]),
    "mmdet import of a 0-byte file": (_empty_pth, ["empty.pth: empty file (0 bytes)"]),
}


# Cases that train on a dataset run in a subprocess (an `e2e` test); the others fail before any data is read and
# run in this process, through the same entry point.
SUBPROCESS = {"string image ids", "mixed image ids", "image id beyond 2**53", "val image of width 0",
              "decompression bomb in training", "image over a lowered pixel limit",
              "image over the pixel limit but under twice Pillow's"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.e2e) if name in SUBPROCESS else name
                                  for name in CASES])
def test_foreign_input_is_one_line_exit_2_nothing_changed(name: str, shared: Shared, tmp_path: Path) -> None:
    setup, fragments = CASES[name]
    args = setup(tmp_path, shared)
    before = snapshot(tmp_path, shared.data.parent)
    res = run_cli(*args) if name in SUBPROCESS else call_cli(*args)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    after = snapshot(tmp_path, shared.data.parent)
    assert [p for p, digest in before.items() if after.get(p) != digest] == []
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def _last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.e2e
def test_bombs_are_skipped_and_counted_with_on_bad_image_skip(shared: Shared, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shared.data, data)
    _bomb(data)
    sorted((data / "val").iterdir())[1].write_bytes(bomb_png(20_000, 20_000))  # over Pillow's own limit too
    run = tmp_path / "run"
    res = run_cli("train", *SETS, *COCO, "--data-dir", str(data), "--workdir", str(run), "--max-steps", "3",
                  "--set", "data.on_bad_image=skip")
    assert res.returncode == 0, res.stderr[-3000:]
    record = _last_metrics(run)
    assert record["bad_train_images"] == 1 and record["bad_images"] == 1


@pytest.mark.e2e
def test_non_finite_boxes_are_dropped_and_counted(shared: Shared, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shared.data, data)
    for split, bbox in (("train", [10.0, 10.0, float("inf"), 20.0]), ("val", [float("nan"), 5.0, 10.0, 10.0])):
        path = data / "annotations" / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        coco["annotations"][0]["bbox"] = bbox
        path.write_text(json.dumps(coco))  # json writes Infinity / NaN, as other tools do
    assert "Infinity" in (data / "annotations" / "instances_train.json").read_text()
    res = run_cli("train", *SETS, *COCO, "--data-dir", str(data), "--workdir", str(tmp_path / "run"),
                  "--max-steps", "1", "--set", "eval.max_images=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dropped 2 boxes of zero, negative or non-finite size" in " ".join(res.stdout.split())


def test_data_check_reports_a_bomb_as_undecodable(shared: Shared, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shared.data, data)
    _bomb(data)
    res = call_cli("data", "check", "--data-dir", str(data), "--split", "train")
    assert res.returncode == 2 and "train: 1 undecodable image(s): 000000.jpg (is 10000000000 pixels" in \
        " ".join(res.stderr.split()), res.stderr


@pytest.mark.e2e
def test_a_run_whose_every_step_was_skipped_fails(shared: Shared, tmp_path: Path) -> None:
    """train.nonfinite=skip, and no step was finite: exit 2 (the spec or the data must change), not 0."""
    res = run_cli("train", *SETS, "--workdir", str(tmp_path / "run"), "--max-steps", "2",
                  "--set", "loss.heatmap_weight=1e39", "--set", "eval.max_images=1")  # finite, but overflows fp32
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "all 2 steps of this run had a non-finite loss or gradient and were skipped" in lines[0]
