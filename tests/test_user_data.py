"""A user's own dataset through the real CLI: `--data-dir` reads it as COCO and never writes into it; the
synthetic dataset is only generated where nothing else lives; `data check` only reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.helpers import call_cli, run_cli, write_user_coco

# The tiny settings (the synthetic set's counts among them: they must not matter for a COCO dataset).
SMALL = [x for o in TINY for x in ("--set", o)]


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, and the set of directories (an added or removed one shows too)."""
    out = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
    out.update({str(p.relative_to(root)) + "/": "dir" for p in root.rglob("*") if p.is_dir()})
    return out


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A checkpoint of the built-in (shapes, 5 classes) experiment, as `centerpoint train` writes it."""
    from centerpoint.checkpoint import save_checkpoint
    from centerpoint.model import init
    from centerpoint.optim.plan import build_optimizer
    from centerpoint.spec_io import load_spec
    from centerpoint.state import init_state

    spec = load_spec(None, TINY)
    params, buffers = init(spec.model, 0)
    state = init_state(params, buffers, build_optimizer(spec, 3, 8).transform)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "shapes.safetensors", state, spec, epoch=1)


@pytest.mark.e2e
def test_train_data_dir_reads_the_users_coco_data_and_never_writes_it(tmp_path: Path, cache_dir: Path) -> None:
    data = write_user_coco(tmp_path / "mydata")
    before = hashes(data)
    res = run_cli("train", "--data-dir", str(data), "--set", "model.num_classes=3", *SMALL, "--max-steps", "2",
                  "--workdir", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "16 train / 8 val images" in " ".join(res.stdout.split())  # trained on mydata, not synthetic shapes
    assert hashes(data) == before


def test_eval_of_a_shapes_checkpoint_with_data_dir_never_writes_it(tmp_path: Path, shapes_ckpt: Path) -> None:
    data = write_user_coco(tmp_path / "mydata")
    before = hashes(data)
    res = call_cli("eval", "--checkpoint", str(shapes_ckpt), "--data-dir", str(data))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    # --data-dir means COCO data: the stored spec's dataset=shapes does not make it generate there.
    assert "instances_val.json: 3 categories but model.num_classes=5" in lines[0]
    assert hashes(data) == before


@pytest.mark.e2e
def test_eval_data_dir_with_matching_classes(tmp_path: Path, shapes_ckpt: Path) -> None:
    data = write_user_coco(tmp_path / "mydata", classes=5)
    before = hashes(data)
    res = run_cli("eval", "--checkpoint", str(shapes_ckpt), "--data-dir", str(data))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "thing4" in res.stdout and hashes(data) == before  # the per-class table names mydata's classes


@pytest.mark.parametrize("how", [["--set", "data.root={data}"],
                                 ["--data-dir", "{data}", "--set", "data.dataset=shapes"]])
def test_synthetic_data_is_never_generated_over_other_files(tmp_path: Path, how: list[str]) -> None:
    data = write_user_coco(tmp_path / "mydata")
    before = hashes(data)
    res = call_cli("train", *[a.format(data=data) for a in how], *SMALL, "--workdir", str(tmp_path / "run"))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert f"{data} is not empty and is not a synthetic dataset written by centerpoint" in lines[0]
    assert hashes(data) == before and not list(tmp_path.glob(".mydata*"))  # no temp dir beside it either


@pytest.mark.e2e
def test_data_check_of_the_synthetic_spec_writes_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    res = run_cli("data", "check", *SMALL, env_extra={"CENTERPOINT_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    assert "is not generated yet" in res.stdout and not cache.exists()


def test_data_check_reads_a_generated_synthetic_set_without_writing(cache_dir: Path) -> None:
    from centerpoint.data.paths import data_root
    from centerpoint.spec_io import load_spec

    root = data_root(load_spec(None, TINY))  # generated (or reused) in the session's cache
    before = hashes(root)
    res = call_cli("data", "check", *SMALL)
    assert res.returncode == 0, res.stderr
    assert f"dataset {root}" in res.stdout and "no blocking problems" in res.stdout and hashes(root) == before


@pytest.mark.e2e
def test_resume_refuses_other_data_and_accepts_the_same_data_moved(tmp_path: Path) -> None:
    import shutil

    data = write_user_coco(tmp_path / "mydata")
    run = tmp_path / "run"
    common = ["--set", "model.num_classes=3", *SMALL, "--workdir", str(run), "--set", "eval.max_images=2"]
    res = run_cli("train", "--data-dir", str(data), *common, "--max-steps", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    other = tmp_path / "other"
    shutil.copytree(data, other)
    path = other / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["bbox"][0] += 1  # another dataset: the same layout and counts, other boxes
    path.write_text(json.dumps(coco))
    res = run_cli("train", "--data-dir", str(other), *common, "--max-steps", "2", "--resume")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert ".safetensors was trained on other data (train sha256" in lines[0]
    moved = tmp_path / "moved"
    shutil.move(data, moved)  # the same data under another path resumes
    res = run_cli("train", "--data-dir", str(moved), *common, "--max-steps", "2", "--resume")
    assert res.returncode == 0 and "resuming from" in res.stdout, res.stderr[-3000:]
