"""Nothing lost: a training run SIGKILLed at a random moment, or stopped by SIGINT / SIGTERM, and resumed
ends bit-identical to an uninterrupted one; a checkpoint writer killed mid-write never leaves a corrupt
`latest`; `--resume FILE` continues from a chosen checkpoint."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from centerpoint.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from centerpoint.io.run_dir import remove_partial_writes
from centerpoint.spec_io import load_spec
from centerpoint.state import TrainState
from tests.conftest import TINY
from tests.helpers import ROOT, cli_env

TOTAL_STEPS = 6  # 24 images / batch 8 = 3 steps per epoch: the run crosses an epoch boundary
DETERMINISTIC = ["runtime.threads=1", "train.checkpoint_every_steps=1", "logging.tensorboard=false"]


def _train_args(work: Path, *extra: str) -> list[str]:
    sets = [x for o in [*TINY, *DETERMINISTIC] for x in ("--set", o)]
    return [sys.executable, "-m", "centerpoint", "train", *sets, "--max-steps", str(TOTAL_STEPS),
            "--workdir", str(work), "--device", "cpu", *extra]


def _run(work: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_train_args(work, *extra), capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=600)


def _saved_step(path: Path) -> int:
    """The step recorded in a checkpoint's metadata (-1 when there is none yet)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("step", -1))
    except Exception:  # not written yet
        return -1


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """An uninterrupted run (also generates the tiny dataset once for the runs below)."""
    work = tmp_path_factory.mktemp("reference")
    res = _run(work)
    assert res.returncode == 0, res.stderr
    return work


def _assert_same_final_state(got: Path, want: Path) -> None:
    a = load_file(str(got / "checkpoints" / "latest.safetensors"))
    b = load_file(str(want / "checkpoints" / "latest.safetensors"))
    assert set(a) == set(b)
    assert any(k.startswith("opt.") for k in a) and any(k.startswith("buffers.") for k in a)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert int(a["step"]) == TOTAL_STEPS


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_run_resumes_bit_identical(seed: int, reference: Path, tmp_path: Path) -> None:
    rng = random.Random(seed)
    kill_after = rng.randint(1, TOTAL_STEPS - 2)  # kill once `latest` holds at least this step...
    delay = rng.uniform(0.0, 0.3)  # ...plus a random delay, to land in a step, a write or the loader
    latest = tmp_path / "checkpoints" / "latest.safetensors"
    proc = subprocess.Popen(_train_args(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=cli_env(), cwd=ROOT)
    deadline = time.monotonic() + 300
    while _saved_step(latest) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr.close()
    killed_at = _saved_step(latest)
    assert 1 <= killed_at < TOTAL_STEPS, killed_at  # it really was interrupted mid-run

    res = _run(tmp_path, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resuming from {latest} (step {killed_at}," in " ".join(res.stdout.split())
    _assert_same_final_state(tmp_path, reference)
    # The same parameters give the same evaluation.
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    want = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: v for k, v in last.items() if k.startswith("bbox_")} == \
        {k: v for k, v in want.items() if k.startswith("bbox_")}
    assert last["step"] == TOTAL_STEPS


@pytest.mark.e2e
def test_resume_of_a_finished_run_does_nothing(reference: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    (work / "checkpoints").mkdir(parents=True)
    src = reference / "checkpoints" / "latest.safetensors"
    (work / "checkpoints" / "latest.safetensors").write_bytes(src.read_bytes())
    res = _run(work, "--resume")
    assert res.returncode == 0, res.stderr
    assert "already" in res.stdout and not (work / "metrics.jsonl").exists()
    _assert_same_final_state(work, reference)


def _start(work: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A training subprocess in a session of its own, returned once its `latest` holds at least one step
    (it is in the loop)."""
    latest = work / "checkpoints" / "latest.safetensors"
    proc = subprocess.Popen(_train_args(work, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=cli_env(), cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 300
    while _saved_step(latest) < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    return proc, latest


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_at_a_step_boundary_and_the_printed_resume_is_exact(sig: signal.Signals, reference: Path,
                                                                         tmp_path: Path) -> None:
    # SIGTERM goes to the whole process group, data-loader worker included, as a launcher sends it.
    extra = ("--workers", "1") if sig == signal.SIGTERM else ()
    proc, latest = _start(tmp_path, *extra)
    if sig == signal.SIGTERM:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # 130 / 143
    lines = [line for line in err.splitlines() if line.strip()]
    assert "stopping at the next step boundary" in lines[0], err
    found = re.fullmatch(r"interrupted at step (\d+); resume with: (.*)", lines[-1])
    assert found and len(lines) == 2, err
    stopped = int(found[1])
    assert 1 <= stopped < TOTAL_STEPS
    ckpt = load_checkpoint(latest)  # saved at that very step boundary
    assert ckpt.step == stopped and ckpt.epoch * 3 + ckpt.batch_in_epoch == stopped
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.safetensors"]  # no temp files either
    assert not (tmp_path / ".lock").exists()
    command = shlex.split(found[2])
    assert command[:3] == ["python", "-m", "centerpoint"]
    assert command[3:] == [*_train_args(tmp_path, *extra)[3:], "--resume"]

    res = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"resuming from {latest} (step {stopped}," in " ".join(res.stdout.split())
    _assert_same_final_state(tmp_path, reference)


def _wait_stopped(pid: int) -> None:
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.005)


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process state from /proc")
def test_a_second_signal_stops_at_once_without_writing(tmp_path: Path) -> None:
    proc, latest = _start(tmp_path)
    # Frozen, the run gets both signals before it can reach a step boundary: the second one counts.
    proc.send_signal(signal.SIGSTOP)
    _wait_stopped(proc.pid)
    before = latest.stat()
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "stopping at the next step boundary" in lines[0] and lines[-1] == "interrupted (SIGTERM)", err
    after = latest.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # nothing written since
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.safetensors"]


@pytest.mark.e2e
def test_resume_from_a_checkpoint_file(reference: Path, tmp_path: Path) -> None:
    """`--resume FILE`: that checkpoint, in its own run directory unless --workdir says otherwise; never by
    replacing newer checkpoints of that run."""
    from tests.helpers import call_cli

    first = reference / "checkpoints" / "epoch_0001.safetensors"  # step 3 of 6
    before = {p.name: p.stat().st_mtime_ns for p in (reference / "checkpoints").iterdir()}
    args = _train_args(reference, "--resume", str(first))[3:]
    args[args.index("--workdir"): args.index("--workdir") + 2] = []  # the file's own run directory
    code, _, err = call_cli(*args)
    assert code == 2
    assert err.startswith(f"error: --resume: {reference / 'checkpoints'}/") and f"than {first}; resuming from the " \
        "older file would replace it: pass another --workdir" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in (reference / "checkpoints").iterdir()} == before

    branch = tmp_path / "branch"
    res = subprocess.run(_train_args(branch, "--resume", str(first)), capture_output=True, text=True, env=cli_env(),
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"resuming from {first} (step 3," in " ".join(res.stdout.split())
    _assert_same_final_state(branch, reference)


class _Crash(Exception):
    """Stands in for a kill between two steps of an in-process run."""


def _poisoned_train(spec, resume: bool, poison: set[int], crash_at: int | None) -> list[int]:  # noqa: ANN001
    """Train in-process; batches whose image sum is in `poison` get NaN images (a non-finite step that
    the run skips); with `crash_at` the run dies before its crash_at-th step. Returns the batch keys seen."""
    from dataclasses import replace

    from rich.console import Console

    from centerpoint.run import build_run
    from centerpoint.train import train

    seen: list[int] = []
    console = Console(quiet=True)
    run = build_run(spec, resume, console)
    step = run.step_fn

    def poisoned(state, batch):  # noqa: ANN001, ANN202
        key = int(batch["images"].sum())
        seen.append(key)
        if crash_at is not None and len(seen) == crash_at:
            raise _Crash
        if key in poison:
            batch = {**batch, "images": batch["images"].float() * float("nan")}
        return step(state, batch)

    try:
        train(replace(run, step_fn=poisoned), console)
    except _Crash:
        pass
    return seen


def _batch_keys(spec) -> list[int]:  # noqa: ANN001
    """The image sums of the run's batches, in training order, straight from the data pipeline."""
    from centerpoint.data.loader import DetectionDataset, epoch_batches
    from centerpoint.data.paths import data_root, load_split

    index = load_split(spec, data_root(spec), True)
    data = DetectionDataset(index, spec.data, spec.train.seed, train=True)
    t = spec.train
    batches = [b for e in range(2) for b in epoch_batches(len(index), t.batch_size, t.seed, e)]
    return [sum(int(data[k].image.sum()) for k in b) for b in batches][: t.max_steps]


def test_resume_after_skipped_non_finite_step_is_exact(tmp_path: Path, cache_dir: Path) -> None:
    def spec_for(work: Path):  # noqa: ANN202
        # 5 steps: the run ends inside its second epoch, so the step count (not the epochs) stops it.
        return load_spec(None, [*TINY, *DETERMINISTIC, "train.max_steps=5", "runtime.device=cpu",
                                f"logging.workdir={work}", "train.nonfinite=skip"])

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    keys = _batch_keys(spec_for(ref))
    assert len(keys) == 5 and len(set(keys)) == 5
    poison = {keys[1]}  # the second step goes non-finite and is skipped
    assert _poisoned_train(spec_for(ref), False, poison, None) == keys
    assert int(load_file(str(ref / "checkpoints" / "latest.safetensors"))["step"]) == 4  # 5 taken, 1 skipped
    # Die before step 4: `latest` holds 3 steps taken, 2 updates applied.
    _poisoned_train(spec_for(cut), False, poison, crash_at=4)
    assert load_checkpoint(cut / "checkpoints" / "latest.safetensors").step == 2
    resumed = _poisoned_train(spec_for(cut), True, poison, None)
    assert resumed == keys[3:]  # exactly the remaining batches, no extra step for the skipped one
    end = load_checkpoint(cut / "checkpoints" / "latest.safetensors")
    assert (end.epoch, end.batch_in_epoch) == (1, 2)  # stopped inside epoch 2, after 2 of its 3 batches
    a = load_file(str(cut / "checkpoints" / "latest.safetensors"))
    b = load_file(str(ref / "checkpoints" / "latest.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_with_ema_resumed_mid_way_is_exact(tmp_path: Path, cache_dir: Path) -> None:
    """train.ema_decay: the EMA is part of the checkpointed state; a run that dies after a skipped step and
    resumes ends bit-identical (EMA included) to an uninterrupted one."""
    def spec_for(work: Path):  # noqa: ANN202
        return load_spec(None, [*TINY, *DETERMINISTIC, "train.max_steps=5", "runtime.device=cpu", "eval.max_images=2",
                                "train.ema_decay=0.9", "train.ema_warmup=2", f"logging.workdir={work}"])

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    keys = _batch_keys(spec_for(ref))
    poison = {keys[1]}  # skipped: the EMA's update count is the updates applied, not the steps taken
    _poisoned_train(spec_for(ref), False, poison, None)
    _poisoned_train(spec_for(cut), False, poison, crash_at=4)
    assert load_checkpoint(cut / "checkpoints" / "latest.safetensors").step == 2
    assert _poisoned_train(spec_for(cut), True, poison, None) == keys[3:]
    a = load_file(str(cut / "checkpoints" / "latest.safetensors"))
    b = load_file(str(ref / "checkpoints" / "latest.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ema = [k for k in a if k.startswith("ema.")]
    assert ema and any(not torch.equal(a[k], a["params." + k[4:]]) for k in ema if "params." + k[4:] in a)


def test_a_crash_mid_epoch_resumes_at_the_next_batch_bit_exactly(tmp_path: Path, cache_dir: Path) -> None:
    """A run that dies inside an epoch (at a chosen step, not a moment chosen by a timer) resumes with exactly
    the batches it had not trained on and ends bit-identical to an uninterrupted run."""
    def spec_for(work: Path):  # noqa: ANN202
        return load_spec(None, [*TINY, *DETERMINISTIC, f"train.max_steps={TOTAL_STEPS}", "runtime.device=cpu",
                                "eval.max_images=2", f"logging.workdir={work}"])

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    keys = _batch_keys(spec_for(ref))
    assert len(keys) == TOTAL_STEPS and len(set(keys)) == TOTAL_STEPS
    assert _poisoned_train(spec_for(ref), False, set(), None) == keys
    # Die before step 5: `latest` holds 4 steps, one batch into the second epoch.
    assert _poisoned_train(spec_for(cut), False, set(), crash_at=5) == keys[:5]
    died = load_checkpoint(cut / "checkpoints" / "latest.safetensors")
    assert (died.step, died.epoch, died.batch_in_epoch) == (4, 1, 1)
    assert _poisoned_train(spec_for(cut), True, set(), None) == keys[4:]
    _assert_same_final_state(cut, ref)


# --- killing the writer ---------------------------------------------------------------------------------

# Imports torch once, then per round forks a child that saves checkpoints in a loop, SIGKILLs it after a
# random delay and reports; the test checks the run directory between rounds.
_HARNESS = """
import os, random, signal, sys, time, torch
from pathlib import Path
from centerpoint.checkpoint import save_checkpoint
from centerpoint.spec_io import load_spec
from centerpoint.state import TrainState
spec, path = load_spec(None), Path(sys.argv[1]) / "checkpoints" / "latest.safetensors"
rng = random.Random(int(sys.argv[2]))
for line in sys.stdin:
    start = int(line)  # the step of the newest complete checkpoint, as the test read it
    pid = os.fork()
    if pid == 0:
        step = start
        while True:
            step += 1
            full = lambda n: torch.full((n,), float(step))
            state = TrainState({"w": full(2_000_000)}, {"b": full(1000)}, {"m": full(2_000_000)}, torch.tensor(step))
            save_checkpoint(path, state, spec, epoch=step // 10, batch_in_epoch=step % 10)
    time.sleep(rng.uniform(0.02, 0.5))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    print("killed", flush=True)
"""


def _check_consistent(ckpt_step: int, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of the harness's checkpoint for step s is filled with s: a mix means corruption."""
    for name, t in tensors.items():
        assert torch.all(t == ckpt_step), name


@pytest.mark.e2e
def test_kill_during_checkpoint_writes_never_corrupts(tmp_path: Path) -> None:
    rounds = 30
    harness = subprocess.Popen([sys.executable, "-c", _HARNESS, str(tmp_path), "1234"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT, text=True)
    assert harness.stdin is not None and harness.stdout is not None
    last_step = 0
    try:
        for _ in range(rounds):
            harness.stdin.write(f"{last_step}\n")
            harness.stdin.flush()
            assert harness.stdout.readline() == "killed\n", harness.stderr.read() if harness.stderr else ""
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a skipped (unreadable) checkpoint would fail here
                ckpt = latest_checkpoint(tmp_path)
            if ckpt is None:  # killed before its first complete write
                assert last_step == 0
                continue
            assert ckpt.step >= last_step  # never goes back
            _check_consistent(ckpt.step, ckpt.tensors)
            assert ckpt.epoch == ckpt.step // 10 and ckpt.batch_in_epoch == ckpt.step % 10
            last_step = ckpt.step
    finally:
        harness.stdin.close()
        harness.wait(timeout=60)
        harness.stdout.close()
        if harness.stderr:
            harness.stderr.close()
    assert harness.returncode == 0
    assert last_step >= 2  # writes did complete between kills
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    partial = [f for f in files if f.endswith(".tmp")]
    assert partial, "no kill landed inside a write; the test proved nothing"
    assert [f for f in files if not f.endswith(".tmp")] == ["latest.safetensors"]
    # The temp files of interrupted writes are what the next run cleans up, and only those.
    assert remove_partial_writes(tmp_path) == len(partial)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.safetensors"]


def _small_state(step: int) -> TrainState:
    return TrainState({"w": torch.full((10,), float(step))}, {}, {"m": torch.zeros(10)}, torch.tensor(step))


def test_checkpoint_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.safetensors", _small_state(1), load_spec(None), 0)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_restore_keeps_the_template_memory_format(tmp_path: Path) -> None:
    """A channels-last run resumes with channels-last weights (the loaded file is plain contiguous)."""
    from centerpoint.checkpoint import restore_state
    from centerpoint.model import init
    from centerpoint.optim.plan import build_optimizer
    from centerpoint.state import init_state

    spec = load_spec(None)
    params, buffers = init(spec.model, 0)
    tx = build_optimizer(spec, 10, 8).transform
    path = save_checkpoint(tmp_path / "c.safetensors", init_state(params, buffers, tx), spec, 0)
    last = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in params.items()}
    restored = restore_state(load_checkpoint(path), init_state(last, buffers, tx))
    convs = [k for k, v in params.items() if v.dim() == 4]
    assert convs and all(restored.params[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert all(torch.equal(restored.params[k], v) for k, v in params.items())
