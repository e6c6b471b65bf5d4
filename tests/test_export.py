"""`centerpoint export`: ONNX in onnxruntime, torch.export and TorchScript give the PyTorch predict step's
detections; bad input is one line, exit 2, nothing written; only an export's own file is ever replaced."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from centerpoint.checkpoint import load_checkpoint
from centerpoint.errors import CenterpointError
from centerpoint.export.files import mark_path
from centerpoint.export.formats import ExportOptions
from centerpoint.export.main import export_checkpoint
from centerpoint.model import build_network, make_apply
from centerpoint.step import make_heads_step, make_predict_step
from tests.detector_checkpoint import write_checkpoint
from tests.helpers import call_cli

ROOT = Path(__file__).resolve().parents[1]


def torch_predict(ckpt_path: Path):  # noqa: ANN201
    """The PyTorch predict step (fp32, eager) of a checkpoint, and its (params, buffers)."""
    ckpt = load_checkpoint(ckpt_path)
    apply = make_apply(build_network(ckpt.spec.model), traced=False)
    params, buffers = ckpt.group("params"), ckpt.group("buffers")
    return make_predict_step(apply, ckpt.spec), make_heads_step(apply, ckpt.spec), params, buffers


def assert_same_detections(got: tuple, want: tuple, box_tol: float = 1e-3, score_tol: float = 1e-4) -> None:
    """Per image: scores (sorted) within score_tol, and every detection of `want` matched one to one by a
    detection of `got` with the same label, box within box_tol px and score within score_tol (order may
    differ only among scores closer than score_tol). Cells the peak test suppressed score exactly 0 and
    may fill the last places in any order: they match by count."""
    for b in range(len(want[1])):
        gb, gs, gl = (np.asarray(t[b]) for t in got)
        wb, ws, wl = (np.asarray(t[b]) for t in want)
        np.testing.assert_allclose(gs, ws, atol=score_tol, rtol=0)
        free = np.ones(len(gs), dtype=bool)
        assert (gs == 0).sum() == (ws == 0).sum()
        for i in np.flatnonzero(ws > 0):
            ok = free & (gl == wl[i]) & (np.abs(gs - ws[i]) <= score_tol) & (np.abs(gb - wb[i]).max(1) <= box_tol)
            assert ok.any(), f"image {b}: detection {i} ({wl[i]}, {ws[i]:.5f}, {wb[i]}) has no match"
            free[np.flatnonzero(ok)[0]] = False


def noise_images(batch: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (batch, 3, size, size) inputs with no padding (no cells with identical surroundings, which
    would tie exactly)."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (batch, 3, size, size), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("export")
    return {"builtin": write_checkpoint(d / "builtin.safetensors"),
            "dcn": write_checkpoint(d / "dcn.safetensors", "model.dcn=true", "eval.flip_test=false")}


@pytest.fixture(scope="module")
def onnx_files(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Each model exported to ONNX at 64 px (the spec's test size) with a dynamic batch, and its description."""
    pytest.importorskip("onnxscript")  # the export extra (`.ci/run` installs it with dev)
    d = tmp_path_factory.mktemp("onnx")
    return {m: (d / f"{m}.onnx", export_checkpoint(ckpt, d / f"{m}.onnx", ExportOptions("onnx", None, None, True)))
            for m, ckpt in models.items()}


@pytest.mark.parametrize("model", ["builtin", "dcn"])
def test_onnx_in_onnxruntime_matches_the_predict_step(models: dict[str, Path], onnx_files: dict, model: str) -> None:
    import onnx
    import onnxruntime

    out, info = onnx_files[model]
    assert info["size"] == 64 and info["batch"] == "batch"
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert ("GridSample" in ops) == (model == "dcn")  # the deformable conv's bilinear sampling: standard op
    assert {"TopK", "Sigmoid", "Conv"} <= ops
    described = json.loads({p.key: p.value for p in proto.metadata_props}["centerpoint"])
    assert described == info and described["class_names"] == ["circle", "square", "triangle", "star", "cross"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    predict, _, params, buffers = torch_predict(models[model])
    images = noise_images(3, 64, seed=1)  # traced with 2: the batch dimension is dynamic
    got = session.run(["boxes", "scores", "labels"], {"images": images.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in predict(params, buffers, images)]
    assert got[0].shape == (3, 100, 4) and got[1].shape == (3, 100) and got[2].dtype == np.int64
    assert (want[0][..., 2] - want[0][..., 0]).mean() > 5 and want[1].max() - want[1][:, -1].min() > 0.3
    assert_same_detections(got, want)


def test_torch_export_program_matches_the_predict_step(models: dict[str, Path], tmp_path: Path) -> None:
    """(The DCN model's program is the one the ONNX test translates.)"""
    out = tmp_path / "model.pt2"
    export_checkpoint(models["builtin"], out, ExportOptions("torch-export", 64, 2, True))
    program = torch.export.load(str(out))
    predict, _, params, buffers = torch_predict(models["builtin"])
    images = noise_images(2, 64, seed=2)
    with torch.no_grad():
        got = [t.numpy() for t in program.module()(images)]
        want = [t.numpy() for t in predict(params, buffers, images)]
    assert_same_detections(got, want)


def test_torchscript_without_decode_gives_the_head_maps(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "heads.ts"
    export_checkpoint(models["builtin"], out, ExportOptions("torchscript", 64, None, False))
    extra = {"centerpoint.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["centerpoint.json"])["outputs"]["heatmap"] == ["batch", 5, 16, 16]
    _, heads, params, buffers = torch_predict(models["builtin"])
    images = noise_images(3, 64, seed=3)
    with torch.no_grad():
        for got, want in zip(module(images), heads(params, buffers, images), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cli_export_replaces_only_its_own_file(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.ts"
    args = ["export", str(models["builtin"]), str(out), "--format", "torchscript", "--size", "64", "--batch", "1"]
    code, stdout, err = call_cli(*args)
    assert code == 0, err
    assert "images (1, 3, 64, 64) uint8 RGB -> boxes (1, 100, 4), scores (1, 100), labels (1, 100)" in stdout
    with zipfile.ZipFile(out) as z:  # the archive carries the description
        name = next(n for n in z.namelist() if n.endswith("centerpoint.json"))
        assert json.loads(z.read(name))["batch"] == 1
    assert json.loads(mark_path(out).read_text())["written_by"] == "centerpoint export"
    assert call_cli(*args)[0] == 0  # its own earlier export: replaced
    out.write_bytes(out.read_bytes() + b"edited")  # changed since: no longer replaced
    code, _, err = call_cli(*args)
    assert code == 2 and "not written by centerpoint export" in err and out.read_bytes().endswith(b"edited")


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case, message", [
    ("not_a_checkpoint", "not a readable .safetensors checkpoint"),
    ("unknown_format", "unknown export format 'tflite'"),
    ("under_a_file", "a parent of it, is a file"),
    ("users_file", "already exists and was not written by centerpoint export"),
    ("a_directory", "it is a directory"),
    ("missing_package", "needs the package(s) onnxscript, which are not installed: pip install"),
    ("bad_size", "--size 100: must be a multiple of 32"),
    ("bad_batch", "--batch many: give a number of images or 'dynamic'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(models: dict[str, Path], tmp_path: Path, case: str,
                                                         message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, out, extra = str(models["builtin"]), tmp_path / "out" / "m.onnx", []
    (tmp_path / "out").mkdir()
    if case == "not_a_checkpoint":
        ckpt = str(tmp_path / "photo.safetensors")
        Path(ckpt).write_bytes(b"\xff\xd8 not a checkpoint")
        out = tmp_path / "out" / "new" / "folder" / "m.onnx"  # not created either
    elif case == "unknown_format":
        extra = ["--format", "tflite"]
    elif case == "under_a_file":
        (tmp_path / "out" / "file").write_text("mine")
        out = tmp_path / "out" / "file" / "m.onnx"
    elif case == "users_file":
        out.write_text("the user's")
    elif case == "a_directory":
        out.mkdir()
    elif case == "missing_package":
        monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    elif case == "bad_size":
        extra = ["--size", "100"]
    elif case == "bad_batch":
        extra = ["--batch", "many"]
    before = {p: p.read_bytes() if p.is_file() else None for p in (tmp_path / "out").rglob("*")}
    code, stdout, err = call_cli("export", ckpt, str(out), *extra)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() if p.is_file() else None for p in (tmp_path / "out").rglob("*")} == before


def test_prepost_imports_no_torch() -> None:
    code = "import sys, centerpoint.export.prepost; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "False", res.stderr


def test_a_write_that_fails_halfway_leaves_nothing(models: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes

    def disk_full(self: Path, data: bytes) -> int:
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(CenterpointError, match="cannot write .*m.ts: No space left on device"):
        export_checkpoint(models["builtin"], tmp_path / "m.ts", ExportOptions("torchscript", 64, 1, True))
    assert not list(tmp_path.iterdir())


def test_onnx_between_preprocess_and_postprocess_gives_the_detectors_detections(
        models: dict[str, Path], onnx_files: dict, tmp_path: Path) -> None:
    """The program a user writes around an exported graph (README): the Python API's detections."""
    import onnxruntime
    from PIL import Image

    import centerpoint
    from centerpoint.export.prepost import postprocess, preprocess
    from tests.detector_checkpoint import photos

    files = photos(tmp_path)
    session = onnxruntime.InferenceSession(str(onnx_files["builtin"][0]), providers=["CPUExecutionProvider"])
    expected = centerpoint.Detector.from_checkpoint(models["builtin"], device="cpu", score_thr=0.1)(files)
    for file, want in zip(files, expected, strict=True):
        image = Image.open(file).convert("RGB")
        pixels, to_image = preprocess(image, 64)
        boxes, scores, labels = session.run(None, {"images": pixels[None]})
        got = postprocess(boxes[0], scores[0], labels[0], to_image, *image.size, score_thr=0.1)
        assert len(want) > 10 and len(got[0]) == len(want)
        assert_same_detections([[t] for t in got], [[want.boxes], [want.scores], [want.labels]])


def test_readme_onnx_example_runs_as_written(onnx_files: dict, tmp_path: Path) -> None:
    import os
    import re

    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import json, onnxruntime.*?)```", text, re.S).group(1)
    os.link(onnx_files["builtin"][0], tmp_path / "model.onnx")
    from tests.detector_checkpoint import photos

    photos(tmp_path / "made", ((70, 50),))[0].rename(tmp_path / "photo.jpg")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("['"), res.stdout  # class names of the detections over 0.3
