"""`centerpoint predict` (the real CLI, in this process) never writes over the user's images or files:
an output folder among the inputs is refused, names are unique and stable, and only files it wrote
itself (its manifest says so, with their hashes) are ever replaced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from centerpoint.checkpoint import save_checkpoint
from centerpoint.evaluation.predict_out import LISTS, MANIFEST, drawing_names
from centerpoint.model import init
from centerpoint.optim.plan import build_optimizer
from centerpoint.spec_io import load_spec
from centerpoint.state import init_state
from tests.conftest import TINY
from tests.helpers import call_cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained model's checkpoint: predict runs the same code on it."""
    spec = load_spec(None, [*TINY, "runtime.device=cpu"])
    params, buffers = init(spec.model, 0)
    state = init_state(params, buffers, build_optimizer(spec, 3, 8).transform)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "c.safetensors", state, spec, 0)


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = np.random.default_rng(seed).integers(0, 255, 3)
    Image.fromarray(np.broadcast_to(colour, (40, 56, 3)).astype(np.uint8)).save(path)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_folder_among_the_inputs_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for i in range(2):
        _photo(photos / f"p{i}.jpg", i)
    before = _files(tmp_path)
    for out, inputs, folder in ((photos, [photos], photos.resolve()), (photos / "pred", [photos], photos.resolve()),
                                (photos, [photos / "p0.jpg"], photos)):
        code, _, err = call_cli("predict", "--checkpoint", str(checkpoint), *map(str, inputs),
                                "--out", str(out))
        assert code == 2, err
        assert err.strip() == (f"error: --out {out} is (inside) {folder}, a folder of input images: the drawings "
                               "could replace them; choose another --out")
    assert _files(tmp_path) == before and not (photos / "pred").exists()


def test_same_file_names_in_two_folders_get_unique_stable_drawings(checkpoint: Path, tmp_path: Path) -> None:
    a, b = _photo(tmp_path / "a" / "x.jpg", 1), _photo(tmp_path / "b" / "x.jpg", 2)
    c = _photo(tmp_path / "a" / "y.png", 3)
    out = tmp_path / "out"
    code, _, err = call_cli("predict", "--checkpoint", str(checkpoint), str(tmp_path / "a"), str(b),
                            "--out", str(out), "--score-thr", "0")
    assert code == 0, err
    names = drawing_names([a, b, c])
    assert names[c] == "y.jpg" and len({names[a], names[b]}) == 2 and names[a].startswith("x-")
    assert sorted(p.name for p in out.iterdir()) == sorted([*names.values(), *LISTS, MANIFEST])
    dets = json.loads((out / "detections.json").read_text())
    assert {d["file"]: d["drawing"] for d in dets} == {str(p): names[p] for p in (a, b, c)}
    # Stable: the same inputs in another order give the same names; predict replaces its own files.
    code, _, err = call_cli("predict", "--checkpoint", str(checkpoint), str(b), str(a), "--out", str(out),
                            "--score-thr", "1")  # no boxes drawn: each drawing is its input
    assert code == 0, err
    assert drawing_names([b, a]) == {a: names[a], b: names[b]}
    assert sorted(p.name for p in out.iterdir()) == sorted([*names.values(), *LISTS, MANIFEST])
    for photo in (a, b):
        drawn = np.asarray(Image.open(out / names[photo]), dtype=float)
        assert np.abs(drawn - np.asarray(Image.open(photo), dtype=float)).max() <= 3, photo


def test_files_predict_did_not_write_are_never_replaced(checkpoint: Path, tmp_path: Path) -> None:
    photo = _photo(tmp_path / "in" / "x.jpg", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text("the user's own")
    args = ("predict", "--checkpoint", str(checkpoint), str(photo), "--out", str(out))
    code, _, err = call_cli(*args)
    assert code == 2 and "already holds detections.json, not written by centerpoint predict" in err, err
    assert _files(out) == {"detections.json": b"the user's own"}
    (out / "detections.json").unlink()
    assert call_cli(*args)[0] == 0
    (out / "x.jpg").write_bytes(b"edited by the user since")  # no longer what predict wrote
    code, _, err = call_cli(*args)
    assert code == 2 and f"--out {out} already holds x.jpg" in err, err
    assert (out / "x.jpg").read_bytes() == b"edited by the user since"
