"""Run directories through the real CLI (in this process): a fresh run refuses a non-empty directory, a
run holds a lock on its own, bad input leaves nothing behind, `--resume` refuses what it cannot use, and
retention, `best` and start-up clean-up touch only the run's own files."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from centerpoint.checkpoint import Checkpointer, load_checkpoint, read_header, save_checkpoint
from centerpoint.errors import CenterpointError
from centerpoint.io import run_dir as rundir
from centerpoint.io.run_dir import remove_partial_writes
from centerpoint.model import init
from centerpoint.optim.plan import build_optimizer
from centerpoint.spec_io import load_spec
from centerpoint.state import TrainState, init_state
from tests.conftest import TINY
from tests.helpers import call_cli
from tests.test_checkpoint import as_newer_version

ROOT = Path(__file__).resolve().parents[1]
SETS = [x for o in [*TINY, "logging.tensorboard=false", "runtime.device=cpu"] for x in ("--set", o)]


def _listing(path: Path) -> dict[str, int]:
    """Every file under `path` with its size (to compare before and after a command)."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def _finished_checkpoint(work: Path, steps: int = 3) -> Path:
    """A checkpoint of the TINY run that has trained all `steps` (one epoch) and evaluated: resuming it does
    nothing, so a command that gets this far succeeds at once."""
    spec = load_spec(None, [*TINY, "logging.tensorboard=false", "runtime.device=cpu", f"train.max_steps={steps}",
                            f"logging.workdir={work}"])
    params, buffers = init(spec.model, 0)
    state = init_state(params, buffers, build_optimizer(spec, 3, 8).transform)
    return save_checkpoint(work / "checkpoints" / "latest.safetensors", state._replace(step=torch.tensor(steps)),
                           spec, 1, 0, {"step": steps, "bbox_mAP": 0.0}, run_id="r1")


def test_a_fresh_run_refuses_a_non_empty_directory(tmp_path: Path,
                                                   cache_dir: Path) -> None:
    work = tmp_path / "run"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    code, _, err = call_cli("train", *SETS, "--max-steps", "3", "--workdir", str(work))
    assert code == 2
    assert err.strip() == (f"error: run directory {work} is not empty (notes.txt): pass --resume to continue the "
                           "run in it, or choose another --workdir")
    assert _listing(work) == {"notes.txt": 4}


def test_bad_data_leaves_no_run_directory(tmp_path: Path) -> None:
    (tmp_path / "coco").mkdir()  # no annotations in it
    work = tmp_path / "runs" / "x"
    code, _, err = call_cli("train", *SETS, "--set", "data.dataset=coco", "--set",
                            f"data.root={tmp_path / 'coco'}", "--max-steps", "3", "--workdir", str(work))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


@pytest.mark.e2e
def test_the_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(
        tmp_path: Path, cache_dir: Path) -> None:
    work = tmp_path / "run"
    _finished_checkpoint(work)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from centerpoint.io.run_dir import lock; "
                               "lock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()", str(work)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        args = ("train", *SETS, "--max-steps", "3", "--workdir", str(work), "--resume")
        code, _, err = call_cli(*args)
        assert code == 2, err
        assert err.strip() == (f"error: run directory {work} is in use by another centerpoint process (pid "
                               f"{holder.pid}); wait for it to end or choose another --workdir")
    finally:
        holder.kill()
        holder.wait()
    assert (work / ".lock").read_text().split()[0] == str(holder.pid)  # left behind by the killed holder
    code, out, err = call_cli(*args)
    assert code == 0, err
    assert "already trained all 3 steps; nothing to do" in " ".join(out.split())
    assert not (work / ".lock").exists()  # released when the run ended


@pytest.mark.e2e
def test_without_flock_the_lock_file_itself_is_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    held = rundir.lock(tmp_path / "run")
    with pytest.raises(CenterpointError, match=f"in use by another centerpoint process \\(pid {os.getpid()}\\)"):
        rundir.lock(tmp_path / "run")
    held.release(remove_created=True)
    assert not (tmp_path / "run").exists()  # the lock created it; empty again, it goes with the lock
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(f"{gone.pid} {os.uname().nodename}\n")  # a process that is gone
    taken = rundir.lock(tmp_path / "run")
    assert (tmp_path / "run" / ".lock").read_text().split()[0] == str(os.getpid())
    taken.release(remove_created=True)
    assert sorted((tmp_path / "run").iterdir()) == []  # not created by this lock: kept


def test_resume_with_no_usable_checkpoint_is_an_error(tmp_path: Path,
                                                      cache_dir: Path) -> None:
    work = tmp_path / "run"
    latest = _finished_checkpoint(work)
    as_newer_version(latest)
    before = _listing(work)
    code, _, err = call_cli("train", *SETS, "--max-steps", "6", "--workdir", str(work), "--resume")
    assert code == 2
    assert err.startswith(f"error: --resume: no usable checkpoint in {work / 'checkpoints'}: {latest}: unknown "
                          "key 'train.a_later_field'") and len(err.strip().splitlines()) == 1, err
    assert _listing(work) == before  # no spec.yaml, metrics or checkpoint written over the run


def test_default_run_directory_is_named_after_the_spec_file(tmp_path: Path) -> None:
    spec = tmp_path / "my_experiment.yaml"
    spec.write_text("train:\n  epochs: 2\n")
    code, out, _ = call_cli("spec", "show", str(spec))
    assert code == 0 and "workdir: runs/my_experiment\n" in out
    code, out, _ = call_cli("spec", "show")
    assert code == 0 and "workdir: runs/shapes\n" in out
    spec.write_text("logging:\n  workdir: elsewhere\n")
    assert "workdir: elsewhere\n" in call_cli("spec", "show", str(spec))[1]


def _state(step: int) -> TrainState:
    return TrainState({"w": torch.full((10,), float(step))}, {}, {"m": torch.zeros(10)}, torch.tensor(step))


def test_retention_and_best_read_the_metadata_and_keep_other_files(tmp_path: Path) -> None:
    spec = load_spec(None, ["train.keep_last=2", "train.checkpoint_every=1"])
    ckpt_dir = tmp_path / "checkpoints"
    # Another run's periodic file, later by name and by step, and a file that is not a checkpoint.
    save_checkpoint(ckpt_dir / "epoch_0009.safetensors", _state(90), spec, 9, 0, {"bbox_mAP": 0.9}, run_id="other")
    (ckpt_dir / "epoch_0010.safetensors").write_text("not a checkpoint")
    maps = [0.1, 0.5, 0.3, 0.2]  # the best is epoch 2, which falls out of the last two
    checkpointer = Checkpointer(ckpt_dir, spec, "mine", {}, steps_per_epoch=1, total_steps=5)
    for epoch, m in enumerate(maps, start=1):
        assert checkpointer.save(_state(epoch), epoch, {"bbox_mAP": m})
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["best.safetensors", "epoch_0003.safetensors", "epoch_0004.safetensors",
                     "epoch_0009.safetensors", "epoch_0010.safetensors", "latest.safetensors"]
    best = load_checkpoint(ckpt_dir / "best.safetensors")
    assert (best.step, best.metrics["bbox_mAP"], best.run_id) == (2, 0.5, "mine")
    assert load_checkpoint(ckpt_dir / "epoch_0009.safetensors").run_id == "other"
    # A run never replaces another run's file, even under a name it writes.
    save_checkpoint(ckpt_dir / "latest.safetensors", _state(5), spec, 5, 0, run_id="other")
    with pytest.raises(CenterpointError, match="refusing to replace .*latest.safetensors: another run wrote it"):
        checkpointer.save(_state(5), 5, {})
    assert read_header(ckpt_dir / "latest.safetensors")["run_id"] == "other"


@pytest.mark.e2e
def test_start_up_clean_up_spares_a_live_writers_temp_file(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        writing = ckpt_dir / f".latest.safetensors.{live.pid}-0a1b2c3d.tmp"
        leftovers = [ckpt_dir / f".latest.safetensors.{gone.pid}-4e5f6a7b.tmp", ckpt_dir / ".best.safetensors.1a2b.tmp"]
        for path in [writing, *leftovers]:
            path.write_bytes(b"partial")
        assert remove_partial_writes(tmp_path) == 2
        assert sorted(ckpt_dir.iterdir()) == [writing]
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()


def test_epochs_flag_replaces_max_steps_of_the_spec_file(tmp_path: Path,
                                                          cache_dir: Path) -> None:
    """The README's rerun of a run's spec.yaml: `--epochs` is what trains, not the file's train.max_steps."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(load_spec(None, [*TINY, "train.max_steps=2"]).model_dump_json())  # JSON is YAML
    work = tmp_path / "run"
    code, _, err = call_cli("train", str(spec_file), "--epochs", "1", "--workdir", str(work),
                            "--set", "logging.tensorboard=false", "--device", "cpu")
    assert code == 0, err
    assert f"warning: --epochs 1 replaces train.max_steps=2 of {spec_file} (it would stop the run first)" in err
    record = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    assert (record["step"], record["epoch"]) == (3, 1)  # 24 images / batch 8: one epoch is 3 steps
    assert "max_steps: null" in (work / "spec.yaml").read_text()
    # Both on the command line: they contradict each other.
    code, _, err = call_cli("train", str(spec_file), "--epochs", "1", "--set", "train.max_steps=4")
    assert code == 2 and "--epochs 1 and --set train.max_steps contradict each other" in err


def test_nonfinite_stop_ends_at_the_first_bad_step_before_any_later_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    from dataclasses import replace

    from rich.console import Console

    from centerpoint.run import build_run
    from centerpoint.train import train

    work = tmp_path / "run"
    spec = load_spec(None, [*TINY, "logging.tensorboard=false", "runtime.device=cpu", "train.nonfinite=stop",
                            "train.log_every=5", "train.checkpoint_every_steps=1", "train.max_steps=6",
                            f"logging.workdir={work}"])
    console = Console(quiet=True)
    run = build_run(spec, False, console)
    step, calls = run.step_fn, [0]

    def poisoned(state, batch):  # noqa: ANN001, ANN202 - the second step gets NaN images
        calls[0] += 1
        if calls[0] == 2:
            batch = {**batch, "images": batch["images"].float() * float("nan")}
        return step(state, batch)

    stopped = r"^non-finite loss or gradient at step 2; stopped \(train.nonfinite=stop\)"
    with pytest.raises(CenterpointError, match=stopped):
        train(replace(run, step_fn=poisoned), console)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["latest.safetensors"]
    assert load_checkpoint(work / "checkpoints" / "latest.safetensors").step == 1
    assert not (work / "metrics.jsonl").exists()
    assert not (work / ".lock").exists()


def test_divergence_on_an_accelerator_is_read_where_the_loop_syncs() -> None:
    from centerpoint.step import Divergence

    watch = Divergence(enabled=True, free_sync=False, device="cpu")
    for step, finite in ((1, 1.0), (2, 1.0), (3, 0.0), (4, 0.0)):
        watch.record(torch.tensor(finite), step)  # no host read here
    with pytest.raises(CenterpointError, match="at step 3;"):
        watch.check()
    off = Divergence(enabled=False, free_sync=True, device="cpu")
    off.record(torch.tensor(0.0), 1)
    off.check()


@pytest.mark.e2e
def test_default_experiment_benchmark_keeps_others_files_and_removes_its_own(tmp_path: Path) -> None:
    bench = [sys.executable, str(ROOT / "benchmarks" / "default_experiment.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "old.txt").write_text("an earlier run")
    res = subprocess.run([*bench, "--workdir", str(kept)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 2 and "is not empty" in res.stderr
    assert _listing(kept) == {"old.txt": 14}
    res = subprocess.run([*bench, "--fresh-data", "--", *SETS, "--max-steps", "3"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["returncode"] == 0 and report["steps"] == 3
    assert list((tmp_path / "tmp").iterdir()) == []  # its fresh dataset cache and run directory are gone
