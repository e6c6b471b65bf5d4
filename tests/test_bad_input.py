"""Every bad input through the real CLI: exit code 2, one stderr line naming the problem, no traceback,
and no file that existed before the command changed. Plus the inputs that are not errors by design
(unreadable images with data.on_bad_image=skip, degenerate boxes) and a full disk."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from centerpoint.spec_io import load_spec
from tests.conftest import TINY
from tests.helpers import call_cli, run_cli

SETS = [x for o in TINY for x in ("--set", o)]
COCO = ["--set", "data.dataset=coco"]
HEAD = load_spec(None).model.head_channels


def snapshot(*dirs: Path) -> dict[str, str]:
    """Content digest of every file (big files: size, mtime and inode, which any write or replace changes)."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 4 << 20 else \
                    f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    return out


@dataclass(frozen=True)
class Shared:
    """Inputs the cases start from: a small COCO-format dataset, a checkpoint, a run stopped at step 3."""

    data: Path
    ckpt: Path
    run: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Shared:
    import torch

    from centerpoint.checkpoint import save_checkpoint
    from centerpoint.data.paths import data_root
    from centerpoint.model import init
    from centerpoint.optim.plan import build_optimizer
    from centerpoint.state import init_state

    base = tmp_path_factory.mktemp("shared")
    spec = load_spec(None, [*TINY, f"logging.workdir={base / 'run'}"])
    shapes = data_root(spec)
    data = base / "data"
    for part in ("train", "val", "annotations"):
        shutil.copytree(shapes / part, data / part)
    params, buffers = init(spec.model, 0)
    state = init_state(params, buffers, build_optimizer(spec, 3, 8).transform)._replace(step=torch.tensor(3))
    ckpt = save_checkpoint(base / "ckpt.safetensors", state, spec, epoch=1)
    run = base / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.link(ckpt, run / "checkpoints" / "latest.safetensors")  # 3 steps done = epoch 1, batch 0
    return Shared(data, ckpt, run)


# --- setups: each gets the case's own directory and returns the command line ----------------------------

def _spec_file(text: str) -> Callable[[Path, Shared], list[str]]:
    def setup(d: Path, s: Shared) -> list[str]:
        (d / "spec.yaml").write_text(text)
        return ["spec", "show", str(d / "spec.yaml")]
    return setup


def _data(edit: Callable[[Path], None], *extra: str) -> Callable[[Path, Shared], list[str]]:
    """Train on a copy of the dataset changed by `edit`."""
    def setup(d: Path, s: Shared) -> list[str]:
        shutil.copytree(s.data, d / "data")
        edit(d / "data")
        return ["train", *SETS, *COCO, "--data-dir", str(d / "data"), "--workdir", str(d / "run"), *extra]
    return setup


def _edit_json(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "annotations" / "instances_train.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


def _first_train_image(root: Path) -> Path:
    return sorted((root / "train").iterdir())[0]


def _write(rel: str, content: bytes) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).write_bytes(content)
    return edit


def _eval_ckpt(make: Callable[[Path, Shared], Path], *extra: str) -> Callable[[Path, Shared], list[str]]:
    def setup(d: Path, s: Shared) -> list[str]:
        return ["eval", "--checkpoint", str(make(d, s)), *extra]
    return setup


def _truncated(d: Path, s: Shared) -> Path:
    (d / "t.safetensors").write_bytes(s.ckpt.read_bytes()[: s.ckpt.stat().st_size // 2])
    return d / "t.safetensors"


def _foreign(d: Path, s: Shared) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(d / "f.safetensors"))
    return d / "f.safetensors"


def _pickle_as_safetensors(d: Path, s: Shared) -> Path:
    (d / "model.safetensors").write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    return d / "model.safetensors"


class _Payload:
    """Unpickling this runs a shell command: what a malicious .pth does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _evil_pth(d: Path, s: Shared) -> list[str]:
    import torch

    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": _Payload(d / "PWNED")}, d / "evil.pth")
    return ["checkpoint", "import", "mmdet", str(d / "evil.pth"), str(d / "out.safetensors")]


def _a_file(d: Path) -> Path:
    (d / "afile").write_text("a regular file, so nothing can be created under it\n")
    return d / "afile"


def _resume(*extra: str) -> Callable[[Path, Shared], list[str]]:
    def setup(d: Path, s: Shared) -> list[str]:
        return ["train", *SETS, "--workdir", str(s.run), "--resume", *extra]
    return setup


CASES: dict[str, tuple[Callable[[Path, Shared], list[str]], list[str]]] = {
    # spec files and overrides
    "spec unknown key": (_spec_file("optim:\n  lrr: 0.1\n"), ["unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
    "spec wrong type": (_spec_file("train:\n  batch_size: eight\n"), ["train.batch_size", "integer", "'eight'"]),
    "spec out of range": (_spec_file("optim:\n  lr: -1\n"), ["optim.lr", "greater than 0"]),
    "spec not yaml": (_spec_file("train: [1, 2\n"), ["spec.yaml: not valid YAML"]),
    "spec not a mapping": (_spec_file("- 1\n- 2\n"), ["must be a YAML mapping"]),
    "spec missing": (lambda d, s: ["train", str(d / "nope.yaml")], ["nope.yaml: spec file not found"]),
    "set unknown key": (lambda d, s: ["spec", "show", "--set", "train.epochz=3"],
                        ["--set train.epochz: unknown key", "did you mean 'train.epochs'"]),
    "set out of range": (lambda d, s: ["spec", "show", "--set", "data.input_size=100"],
                         ["data.input_size", "multiple of 32"]),
    "set without value": (lambda d, s: ["spec", "show", "--set", "optim.lr"], ["expected KEY=VALUE"]),
    "unknown flag": (lambda d, s: ["train", "--epoch", "3"],
                     ["No such option: --epoch", "centerpoint train --help"]),
    "flag of the wrong type": (lambda d, s: ["train", "--epochs", "many"],
                               ["Invalid value for '--epochs'", "valid integer"]),
    # datasets
    "data dir missing": (lambda d, s: ["train", *SETS, *COCO, "--data-dir", str(d / "nope"), "--workdir",
                                       str(d / "run")], ["data directory not found", "nope"]),
    "annotations not json": (_data(_write("annotations/instances_train.json", b"{'images': [")),
                             ["instances_train.json is not valid JSON"]),
    "annotations missing key": (_data(_edit_json(lambda j: j.pop("annotations"))),
                                ["instances_train.json: missing required key(s) annotations"]),
    "annotation lacks bbox": (_data(_edit_json(lambda j: j["annotations"][0].pop("bbox"))),
                              ["annotations[0] lacks 'bbox'"]),
    "bbox not numbers": (_data(_edit_json(lambda j: j["annotations"][0].update(bbox=["a", 1, 2, 3]))),
                         ["instances_train.json: annotation id 1: bbox must be 4 numbers", "'a'"]),
    "unknown category id": (_data(_edit_json(lambda j: j["annotations"][0].update(category_id=99))),
                            ["annotations[0] refers to unknown category_id 99"]),
    "image missing": (_data(lambda r: _first_train_image(r).unlink()), ["image file not found", "000000.jpg"]),
    "image not decodable": (_data(lambda r: _first_train_image(r).write_bytes(b"\xff\xd8 not a jpeg")),
                            ["cannot decode image", "000000.jpg"]),
    "image not decodable in a worker": (
        _data(lambda r: _first_train_image(r).write_bytes(b"GIF89a broken"), "--workers", "1"),
        ["cannot decode image", "000000.jpg"]),
    "classes do not match the model": (_data(lambda r: None, "--set", "model.num_classes=3"),
                                       ["5 categories but model.num_classes=3"]),
    # checkpoints
    "checkpoint missing": (_eval_ckpt(lambda d, s: d / "nope.safetensors"), ["checkpoint not found"]),
    "checkpoint truncated": (_eval_ckpt(_truncated), ["t.safetensors: not a readable .safetensors checkpoint"]),
    "checkpoint not safetensors": (_eval_ckpt(_pickle_as_safetensors), ["not a readable .safetensors"]),
    "checkpoint of no centerpoint run": (_eval_ckpt(_foreign), ["not a centerpoint checkpoint"]),
    "checkpoint of another architecture": (
        _eval_ckpt(lambda d, s: s.ckpt, "--set", f"model.head_channels={2 * HEAD}"),
        ["does not fit this model", f"params.bbox_head.heatmap_head.0.bias is ({HEAD},), expected ({2 * HEAD},)"]),
    "pth that needs code to unpickle": (_evil_pth, ["evil.pth: "]),  # refused by torch.load(weights_only)
    # outputs
    "workdir under a file": (lambda d, s: ["train", *SETS, "--workdir", str(_a_file(d) / "run")],
                             ["afile/run", "not writable"]),
    "eval --out under a file": (
        lambda d, s: ["eval", "--checkpoint", str(s.ckpt), "--set", "eval.max_images=1", "--out",
                      str(_a_file(d) / "m.json")], ["afile/m.json", "cannot write"]),
    "predict --out under a file": (
        lambda d, s: ["predict", "--checkpoint", str(s.ckpt), str(_first_train_image(s.data)), "--out",
                      str(_a_file(d) / "pred")], ["afile/pred", "cannot write"]),
    "predict an undecodable image": (
        lambda d, s: ["predict", "--checkpoint", str(s.ckpt), str(_write_file(d / "x.jpg", b"nope")),
                      "--out", str(d / "pred")], ["cannot decode image", "x.jpg"]),
    # contradictions
    "epochs and max-steps": (lambda d, s: ["train", *SETS, "--epochs", "2", "--max-steps", "5", "--workdir",
                                           str(d / "run")], ["--epochs", "--max-steps"]),
    "resume beyond max-steps": (_resume("--max-steps", "2"), ["already trained 3 steps", "more than the 2"]),
    "resume with another batch size": (_resume("--batch-size", "4"), ["train.batch_size 8 -> 4"]),
}


def _write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# Cases that reach the data pipeline run as users run them, in a subprocess (an `e2e` test); the others fail
# before any data is read and run in this process, through the same entry point (no Python start-up each).
SUBPROCESS = {"annotations not json", "annotations missing key", "annotation lacks bbox", "bbox not numbers",
              "unknown category id", "image missing", "image not decodable", "image not decodable in a worker",
              "classes do not match the model"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.e2e) if name in SUBPROCESS else name
                                  for name in CASES])
def test_bad_input_is_one_line_exit_2_nothing_changed(name: str, shared: Shared, tmp_path: Path) -> None:
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
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, changed
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.e2e
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = run_cli("--debug", "spec", "show", "--set", "train.epochz=3")
    assert res.returncode != 0 and "Traceback" in res.stderr and "CenterpointError" in res.stderr


# --- inputs that are not errors by design ---------------------------------------------------------------

def _last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.e2e
def test_unreadable_images_are_skipped_and_counted(shared: Shared, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shared.data, data)
    train_images = sorted((data / "train").iterdir())
    train_images[0].unlink()
    train_images[1].write_bytes(b"\xff\xd8 not a jpeg")
    sorted((data / "val").iterdir())[0].write_bytes(b"")
    run = tmp_path / "run"
    res = run_cli("train", *SETS, *COCO, "--data-dir", str(data), "--workdir", str(run), "--max-steps", "3",
                  "--set", "data.on_bad_image=skip")
    assert res.returncode == 0, res.stderr[-3000:]
    record = _last_metrics(run)
    # 24 images / batch 8: every train image is used once in the 3 steps, every val image evaluated once.
    assert record["bad_train_images"] == 2 and record["bad_images"] == 1


@pytest.mark.e2e
def test_degenerate_boxes_are_dropped_and_counted(shared: Shared, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shared.data, data)
    path = data / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["bbox"][2] = 0.0  # zero width
    coco["annotations"][1]["bbox"][3] = -5.0  # negative height
    coco["annotations"][2]["bbox"] = [1e6, 1e6, 10.0, 10.0]  # entirely outside the image
    path.write_text(json.dumps(coco))
    res = run_cli("train", *SETS, *COCO, "--data-dir", str(data), "--workdir", str(tmp_path / "run"),
                  "--max-steps", "1", "--set", "eval.max_images=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dropped 3 boxes of zero, negative or non-finite size or below data.min_box_size" in " ".join(
        res.stdout.split())


# --- a full disk ----------------------------------------------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path: Path, shared: Shared):  # noqa: ANN201
    """A tmpfs with room for one checkpoint but not two (needs root and CAP_SYS_ADMIN, else skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = shared.ckpt.stat().st_size * 3 // 2
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)  # lazy: a lingering reader must not fail teardown


@pytest.mark.e2e
def test_disk_full_while_training_keeps_the_last_checkpoint(small_disk: Path) -> None:
    from centerpoint.checkpoint import load_checkpoint

    run = small_disk / "run"
    res = run_cli("train", *SETS, "--workdir", str(run), "--max-steps", "3", "--set",
                  "train.checkpoint_every_steps=1", "--set", "logging.tensorboard=false")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0] and "No space left on device" in lines[0]
    assert load_checkpoint(run / "checkpoints" / "latest.safetensors").step == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.safetensors"]  # no temp file


def test_disk_full_in_process_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same without a mount: the write raises ENOSPC; the previous file stays, no temp file is left."""
    import errno

    import torch

    import centerpoint.checkpoint as checkpoint
    from centerpoint.errors import CenterpointError
    from centerpoint.state import TrainState

    def state(step: int) -> TrainState:
        return TrainState({"w": torch.full((10,), float(step))}, {}, {}, torch.tensor(step))

    spec = load_spec(None)
    path = checkpoint.save_checkpoint(tmp_path / "latest.safetensors", state(1), spec, 0, 1)
    before = path.read_bytes()
    real = checkpoint._serialize

    def half_then_full(tensors: dict, metadata: dict) -> bytes:
        data = real(tensors, metadata)
        temp = next(tmp_path.glob(".latest.safetensors.*.tmp"))
        temp.write_bytes(data[: len(data) // 2])  # what a write cut short leaves behind
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_serialize", half_then_full)
    with pytest.raises(CenterpointError, match=r"cannot write checkpoint .*latest.safetensors: No space left"):
        checkpoint.save_checkpoint(path, state(2), spec, 0, 2)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["latest.safetensors"]
    assert checkpoint.load_checkpoint(path).step == 1


# --- centerpoint data check -----------------------------------------------------------------------------

def _broken_dataset(shared: Shared, root: Path) -> Path:
    """The dataset with known faults: 1 missing and 1 truncated train image, 1 garbage val image, a train
    image whose json size is wrong, 2 degenerate boxes, 1 box sticking out, 1 tiny box."""
    data = root / "data"
    shutil.copytree(shared.data, data)
    train = sorted((data / "train").iterdir())
    train[0].unlink()
    train[1].write_bytes(train[1].read_bytes()[: train[1].stat().st_size * 2 // 3])  # header intact, pixels cut
    sorted((data / "val").iterdir())[0].write_bytes(b"GIF89a garbage")
    path = data / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["images"][2]["width"] += 1
    anns = coco["annotations"]
    anns[0]["bbox"][2] = 0.0
    anns[1]["bbox"][3] = -3.0
    anns[2]["bbox"][0] = -5.0
    anns[3]["bbox"][2:] = [0.5, 0.5]
    path.write_text(json.dumps(coco))
    return data


def test_check_finds_every_planted_fault(shared: Shared, tmp_path: Path) -> None:
    from centerpoint.data.check import blocking_problems, check_split

    data = _broken_dataset(shared, tmp_path)
    spec = load_spec(None, ["data.dataset=coco", f"data.root={data}"])
    train = check_split(spec, data, "train", decode=False)
    coco = json.loads((data / "annotations" / "instances_train.json").read_text())
    assert (train.images, train.boxes, train.crowd) == (len(coco["images"]), len(coco["annotations"]), 0)
    assert train.missing == ["000000.jpg"] and train.undecodable == []  # the header check passes a cut file
    assert [s.split()[0] for s in train.size_mismatch] == [coco["images"][2]["file_name"]]
    assert (train.degenerate_boxes, train.clipped_boxes, train.small_boxes) == (2, 1, 1)
    assert sum(train.class_boxes.values()) == len(coco["annotations"]) - 3
    decoded = check_split(spec, data, "train", decode=True)
    assert [s.split()[0] for s in decoded.undecodable] == ["000001.jpg"]  # full decoding finds it
    val = check_split(spec, data, "val")
    assert val.undecodable and val.undecodable[0].startswith("000000.jpg (cannot identify image file")
    problems = blocking_problems([train, val])
    assert len(problems) == 2 and "1 missing image(s): 000000.jpg" in problems[0]
    skip = load_spec(None, ["data.dataset=coco", f"data.root={data}", "data.on_bad_image=skip"])
    assert blocking_problems([check_split(skip, data, "train"), check_split(skip, data, "val")]) == []
    wrong = load_spec(None, ["data.dataset=coco", "model.num_classes=3"])
    assert "5 categories in instances_val.json but model.num_classes=3" in blocking_problems(
        [check_split(wrong, data, "val")])[0]


def test_check_cli_exit_codes_and_read_only(shared: Shared, tmp_path: Path) -> None:
    res = call_cli("data", "check", "--data-dir", str(shared.data))
    assert res.returncode == 0, res.stderr
    assert "no blocking problems" in res.stdout and "circle" in res.stdout and res.stderr == ""
    data = _broken_dataset(shared, tmp_path)
    before = snapshot(tmp_path)
    res = call_cli("data", "check", "--data-dir", str(data))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "train: 1 missing image(s): 000000.jpg" in lines[0] and "(+1 more above)" in lines[0]
    assert "blocking: val: 1 undecodable image(s): 000000.jpg" in res.stdout
    assert "warning: train: 2 box(es) of zero, negative" in res.stdout
    assert snapshot(tmp_path) == before
    res = call_cli("data", "check", "--data-dir", str(data), "--split", "val", "--set", "data.on_bad_image=skip")
    assert res.returncode == 0 and "warning: val: 1 undecodable" in res.stdout and "train" not in res.stdout
    res = call_cli("data", "check", "--data-dir", str(data), "--split", "test")
    assert res.returncode == 2 and res.stderr.strip() == "error: --split test: choose from train, val, both"
