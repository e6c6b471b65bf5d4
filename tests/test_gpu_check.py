"""`benchmarks/gpu_check.sh --device cpu --quick`: the prepared GPU check's dry run, end to end, so the
script and everything it drives (the cuda tests on the cpu, alignment, the launcher with a one-rank
process group, the experiment, train_step, data_pipeline) cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["setup", "tests", "alignment", "nccl", "experiment", "train_step", "data_pipeline"]


pytestmark = pytest.mark.e2e  # the script in a subprocess, as the GPU machine runs it


def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--device",
                          "cpu", "--quick"], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary_line = res.stdout.strip().splitlines()[-1]
    assert summary_line.startswith("GPU_CHECK_SUMMARY ")
    summary = json.loads(summary_line.removeprefix("GPU_CHECK_SUMMARY "))
    assert summary["ok"] and summary["stages"] == dict.fromkeys(STAGES, "ok")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted([f"{s}.json" for s in STAGES] + ["summary.json"])  # 8 files: what a device returns
    stage = {s: json.loads((tmp_path / "out" / f"{s}.json").read_text()) for s in STAGES}
    assert stage["tests"]["result"]["passed"] >= 5  # the cuda-marked tests ran on the cpu
    assert stage["alignment"]["result"]["fp32_one_step"]["loss_terms_rel"]["loss"] == 0.0  # cpu against cpu
    assert stage["nccl"]["checks"]["gloo_group_formed"]  # the launcher's one-rank group (nccl on cuda)
    assert stage["train_step"]["result"][0]["bench"] == "train_step"
    assert stage["data_pipeline"]["result"]["project_img_s"] > 0
    assert summary["figures"]["tests"]["passed"] == stage["tests"]["result"]["passed"]


def test_gpu_check_refuses_unknown_stages_and_a_missing_output_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 2 and "error: set OUT" in res.stderr
    res = subprocess.run(["python", str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                          "--stages", "setup,warp_speed"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "unknown warp_speed" in res.stderr
