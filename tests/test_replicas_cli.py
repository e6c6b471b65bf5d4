"""`centerpoint train` with replicas through the real CLI: a 3-value lr sweep (with the EMA of the weights)
trains, logs a metrics row per replica and evaluation, prints the summary, resumes exactly from a checkpoint
holding all replicas, and `checkpoint extract` gives replica i as an ordinary checkpoint that `centerpoint
eval` scores as the run did; bad input is one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import call_cli

# A tiny network: the R18 structure at width 8, 64 px, 24 images in 3 steps an epoch.
SMALL = ["--set", "model.width=8", "--set", "model.neck_channels=[16,8,8]", "--set", "model.head_channels=8",
         "--set", "eval.flip_test=false", "--set", "train.eval_every=0", "--set", "runtime.precision=auto",
         "--set", "train.ema_decay=0.9", "--set", "train.ema_warmup=2"]


def _train(tiny: list[str], workdir: Path, *extra: str):  # noqa: ANN202
    sets = [a for item in tiny for a in ("--set", item)]
    return call_cli("train", "--workdir", str(workdir), *sets, *SMALL, "--sweep", "optim.lr=0.001,0.003,0.01",
                    *extra)


def test_lr_sweep_trains_resumes_and_extracts(tiny_overrides: list[str], tmp_path: Path) -> None:
    full = tmp_path / "full"
    res = _train(tiny_overrides, full, "--max-steps", "4")
    assert res.returncode == 0, (res.stdout + res.stderr)
    assert "bbox_mAP" in (res.stdout + res.stderr) and "over 3 replicas" in (res.stdout + res.stderr)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [(r["replica"], r["lr"], r["step"]) for r in rows] == [(0, 0.001, 4), (1, 0.003, 4), (2, 0.01, 4)]
    assert [r["init_seed"] for r in rows] == [0, 1, 2] and {r["weights"] for r in rows} == {"ema"}
    assert all((full / "tensorboard" / f"replica_{i}").is_dir() for i in range(3))

    # Exact resume: from the end of epoch 1 (step 3, all three replicas) to step 4 equals the straight run.
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "epoch_0001.safetensors", again / "checkpoints" / "latest.safetensors")
    res = _train(tiny_overrides, again, "--max-steps", "4", "--resume")
    assert res.returncode == 0, (res.stdout + res.stderr)
    from safetensors.torch import load_file

    a = load_file(full / "checkpoints" / "latest.safetensors")
    b = load_file(again / "checkpoints" / "latest.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["step"].tolist() == [4, 4, 4] and a["opt.lr.peak"].tolist() == [0.001, 0.003, 0.01]

    # Replica 2 as an ordinary checkpoint: its slice of every tensor, a single-model spec, evaluable.
    one = tmp_path / "one.safetensors"
    res = call_cli("checkpoint", "extract", str(full / "checkpoints" / "latest.safetensors"), str(one),
                   "--replica", "2")
    assert res.returncode == 0, (res.stdout + res.stderr)
    before = one.read_bytes()  # an existing file is never replaced: one line, exit 2, the file as it was
    res = call_cli("checkpoint", "extract", str(full / "checkpoints" / "latest.safetensors"), str(one),
                   "--replica", "1")
    assert res.returncode == 2 and "already exists" in res.stderr + res.stdout and one.read_bytes() == before
    from centerpoint.checkpoint import load_checkpoint

    ckpt = load_checkpoint(one)
    assert ckpt.spec.train.replicas == 1 and ckpt.spec.optim.lr == 0.01 and ckpt.spec.train.init_seed == 2
    assert "opt.lr.peak" not in ckpt.tensors and ckpt.tensors.keys() == {k for k in a if k not in (
        "opt.lr.peak", "opt.decay.weight_decay")}
    assert all(torch.equal(ckpt.tensors[k], a[k][2]) for k in ckpt.tensors)
    assert ckpt.metrics["bbox_mAP"] == rows[2]["bbox_mAP"]
    assert ckpt.group("ema") and not torch.equal(ckpt.tensors["ema.bbox_head.heatmap_head.2.bias"],
                                                 ckpt.tensors["params.bbox_head.heatmap_head.2.bias"])
    # eval scores the extracted replica's EMA weights exactly as the replicated run's evaluation did.
    out = tmp_path / "eval.json"
    res = call_cli("eval", "--checkpoint", str(one), "--out", str(out), *[a for x in tiny_overrides
                                                                           for a in ("--set", x)])
    assert res.returncode == 0, (res.stdout + res.stderr)
    assert json.loads(out.read_text())["bbox_mAP"] == rows[2]["bbox_mAP"]


@pytest.mark.parametrize(("args", "message"), [
    (["--sweep", "optim.eps=1,2"], "--sweep 'optim.eps=1,2': expected KEY=V1,V2"),
    (["--sweep", "optim.lr=0.1,0.2", "--set", "train.replicas=3"], "sweep optim.lr has 2 values"),
    (["--set", "train.replicas=0"], "train.replicas"),
    (["--sweep", "optim.lr=0.1,-1"], "sweep optim.lr value -1.0"),
])
def test_bad_replica_input_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    res = call_cli("train", "--workdir", str(tmp_path / "run"), *args)
    assert res.returncode == 2 and message in (res.stdout + res.stderr) and "Traceback" not in (res.stdout + res.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_data_parallel_replica_equals_the_data_parallel_single_run(tiny_overrides: list[str], tmp_path: Path) -> None:
    """`--nproc-per-node 2` with 2 replicas: every rank holds both, the stacked gradients are averaged in
    one all-reduce; replica 1 ends as the two-process single-model run with its init seed and lr does
    (fp32: within the replicated step's documented 1e-3)."""
    from safetensors.torch import load_file

    from centerpoint.runtime import launch
    from tests.helpers import run_cli

    common = [a for item in [*tiny_overrides, "train.batch_size=4", "runtime.precision=fp32", "train.eval_every=0",
                             "logging.tensorboard=false", "model.width=8", "model.neck_channels=[16,8,8]",
                             "model.head_channels=8"] for a in ("--set", item)]

    def train(work: Path, *extra: str) -> dict:
        res = run_cli("train", *common, *extra, "--max-steps", "3", "--workdir", str(work), "--device", "cpu",
                      "--nproc-per-node", "2", "--master-port", str(launch.free_port()),
                      env_extra={"OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        return load_file(work / "checkpoints" / "latest.safetensors")

    both = train(tmp_path / "both", "--sweep", "optim.lr=0.001,0.01")
    one = train(tmp_path / "one", "--set", "optim.lr=0.01", "--set", "train.init_seed=1")
    assert both["step"].tolist() == [3, 3]
    params = [k for k in one if k.startswith("params.")]
    assert params and max(float((both[k][1] - one[k]).abs().max()) for k in params) < 1e-3
    assert max(float((both[k][0] - one[k]).abs().max()) for k in params) > 1e-3  # replica 0 is another model
