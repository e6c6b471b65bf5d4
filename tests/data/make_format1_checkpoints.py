"""Writes the format-1 checkpoints in this folder with the code of tag `before-refactor` (optimizer state
keyed by chain position: `opt.1.adam.mu.<name>`, `opt.2.trace.<name>`, `opt.3.count`, ...).

    git archive before-refactor | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before CENTERPOINT_CACHE=/tmp/cache python tests/data/make_format1_checkpoints.py

`format1_sgd_tiny.safetensors`: `centerpoint train` of the tiny network below for 3 steps (one epoch of the
24-image synthetic set), SGD with momentum. `format1_<optimizer>_tree.safetensors`: a two-tensor state after
two updates of each optimizer, small enough to read by eye.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from centerpoint.build import build_optimizer

from centerpoint.checkpoint import FORMAT_VERSION, save_checkpoint
from centerpoint.optim import apply_updates
from centerpoint.spec import load_spec
from centerpoint.step import TrainState, init_state

HERE = Path(__file__).resolve().parent
TINY_NET = ["model.width=8", "model.neck_channels=[8,8,8]", "model.head_channels=8"]
TINY_DATA = ["data.shapes_train=24", "data.shapes_val=8", "data.input_size=64", "data.test_size=64",
             "data.workers=0", "train.batch_size=8", "eval.batch_size=8", "train.log_every=1",
             "logging.progress=false", "runtime.threads=1", "logging.tensorboard=false"]


def trained_checkpoint() -> None:
    work = Path(tempfile.mkdtemp()) / "run"
    sets = [x for s in [*TINY_DATA, *TINY_NET, "optim.name=sgd"] for x in ("--set", s)]
    subprocess.run([sys.executable, "-m", "centerpoint", "train", *sets, "--max-steps", "3", "--workdir", str(work),
                    "--device", "cpu"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    shutil.copy(work / "checkpoints" / "latest.safetensors", HERE / "format1_sgd_tiny.safetensors")


def tree_checkpoint(optimizer: str) -> None:
    spec = load_spec(None, [f"optim.name={optimizer}", "optim.nesterov=" + str(optimizer == "sgd").lower()])
    plan = build_optimizer(spec, 10, 8)
    g = torch.Generator().manual_seed(0)
    params = {"head.weight": torch.randn(2, 3, generator=g), "head.bias": torch.randn(2, generator=g)}
    state = init_state(params, {"bn.running_mean": torch.zeros(2)}, plan.transform)
    for _ in range(2):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in state.params.items()}
        updates, opt = plan.transform.update(grads, state.opt_state, state.params)
        state = TrainState(apply_updates(state.params, updates), state.buffers, opt, state.step + 1)
    save_checkpoint(HERE / f"format1_{optimizer}_tree.safetensors", state, spec, epoch=0, batch_in_epoch=2)


if __name__ == "__main__":
    assert FORMAT_VERSION == "1", "run with the code of tag before-refactor on PYTHONPATH"
    trained_checkpoint()
    for name in ("sgd", "adam", "adamw"):
        tree_checkpoint(name)
