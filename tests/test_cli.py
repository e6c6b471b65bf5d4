"""The real CLI in subprocesses: train a few steps, evaluate, predict, inspect; in this process: spec output and
errors as one line."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, call_cli, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides, cache_dir):
    work = tmp_path_factory.mktemp("run")
    sets = [x for o in tiny_overrides for x in ("--set", o)]
    res = run_cli("train", *sets, "--max-steps", "3", "--workdir", str(work), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    return work, res


@pytest.mark.e2e
def test_help_does_not_import_torch():
    code = ("import sys; from cli.main import app\n"
            "try:\n    app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert "train" in out and out.strip().endswith("NO-TORCH")


def test_spec_show_and_schema():
    res = call_cli("spec", "show", "--set", "optim.lr=0.005")
    assert res.returncode == 0 and "lr: 0.005" in res.stdout
    res = call_cli("spec", "schema")
    assert res.returncode == 0 and "OptimSpec" in json.loads(res.stdout)["$defs"]


@pytest.mark.e2e
def test_train_writes_run_directory(trained):
    work, res = trained
    assert "bbox_mAP" in res.stdout
    assert (work / "spec.yaml").is_file()
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and records[-1]["epoch"] == 1
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"):
        assert 0.0 <= records[-1][key] <= 1.0 or records[-1][key] == -1.0
    assert (work / "checkpoints" / "latest.safetensors").is_file()
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.e2e
def test_inspect_eval_and_predict(trained, tmp_path, cache_dir):
    work, _ = trained
    ckpt = work / "checkpoints" / "latest.safetensors"
    res = run_cli("checkpoint", "inspect", str(ckpt))
    assert res.returncode == 0 and "step 3" in res.stdout and "parameters 3,5" in res.stdout
    out = tmp_path / "metrics.json"
    res = run_cli("eval", "--checkpoint", str(ckpt), "--out", str(out))
    assert res.returncode == 0, res.stderr
    metrics = json.loads(out.read_text())
    assert set(metrics["per_class_AP"]) == {"circle", "square", "triangle", "star", "cross"}
    assert (tmp_path / "metrics.detections.json").is_file()
    images = sorted(cache_dir.glob("shapes-*/val/*.jpg"))[:2]
    pred_dir = tmp_path / "pred"
    res = run_cli("predict", "--checkpoint", str(ckpt), *map(str, images), "--out", str(pred_dir),
                  "--score-thr", "0.0")
    assert res.returncode == 0, res.stderr
    dets = json.loads((pred_dir / "detections.json").read_text())
    per_file = {str(p): sum(d["file"] == str(p) for d in dets) for p in images}
    assert all(1 <= n <= 100 for n in per_file.values()), per_file  # top-k 100, empty boxes dropped
    assert {p.name for p in pred_dir.glob("*.jpg")} == {p.name for p in images}


@pytest.mark.parametrize("args, fragment", [
    (["train", "--set", "optim.lrr=1"], "did you mean 'optim.lr'"),
    (["train", "--set", "train.batch_size=0"], "train.batch_size"),
    (["train", "missing.yaml"], "missing.yaml: spec file not found"),
    (["eval", "--checkpoint", "nope.safetensors"], "checkpoint not found"),
    (["train", "--device", "sdaa"], "--device sdaa"),
])
def test_bad_input_is_one_line_exit_2(args, fragment):
    res = call_cli(*args)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in res.stderr
