"""Data parallelism on cpu + gloo with 2 processes on 127.0.0.1: equivalence with one process, sharded
evaluation, the elastic launcher through the real CLI (a killed worker, a restart), and the device
selection logic of cuda/sdaa without the hardware."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from centerpoint.errors import CenterpointError
from centerpoint.runtime import devices, distributed, launch
from tests.helpers import write_coco

ROOT = Path(__file__).resolve().parents[1]
B = 4  # images per process per step in the 2-process runs
STEPS = 3  # one epoch of 24 images at a global batch of 8


# ---------------------------------------------------------------- 2 processes vs 1 process (spawned)


def _one_box_dataset(root: Path) -> Path:
    """A COCO-format set with exactly one object per image (24 train, 8 val): every image then has one
    heatmap peak, so each rank's loss normaliser (its count of peaks) is B and the 2-process gradient
    average equals the 1-process gradient of the concatenated batch."""
    from PIL import Image

    rng = np.random.default_rng(7)
    (root / "annotations").mkdir(parents=True)
    for split, n in (("train", 24), ("val", 8)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            w, h = int(rng.integers(48, 96)), int(rng.integers(48, 96))
            bw, bh = int(rng.integers(14, w // 2)), int(rng.integers(14, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            pixels[y : y + bh, x : x + bw] = rng.integers(140, 256, 3, dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        write_coco(root / "annotations" / f"instances_{split}.json", images, anns, [{"id": 1, "name": "box"}])
    return root


def _spec(root: Path, workdir: Path, batch: int):  # noqa: ANN202
    from centerpoint.spec_io import load_spec

    sets = ["data.dataset=coco", f"data.root={root}", "model.num_classes=1", "data.input_size=64", "data.test_size=64",
            "data.scale_range=[1.0,1.0]", "data.workers=0", f"train.batch_size={batch}", "eval.batch_size=8",
            "optim.name=sgd", "optim.lr=0.02", "schedule.kind=constant", "schedule.warmup_steps=0",
            "runtime.device=cpu", "runtime.precision=fp32", "runtime.sync_bn=true", "runtime.channels_last=false",
            "logging.progress=false", "logging.tensorboard=false", f"logging.workdir={workdir}"]
    return load_spec(None, sets)


def _train_float64(spec, ctx: distributed.Context, batches: list, spe: int) -> dict:  # noqa: ANN001
    """The same data-parallel step in float64 (the network's rounding noise, which a few fp32 steps
    amplify to ~1e-3 even between two batch orders of one process, then stays far below the tolerance).
    Built from the pieces `run.build_run` wires: sync BN, broadcast, identity check, gradient mean."""
    from centerpoint.checkpoint import state_tensors
    from centerpoint.model import build_network, init, make_apply
    from centerpoint.optim.plan import build_optimizer
    from centerpoint.runtime.devices import StepMode
    from centerpoint.state import flatten_state, init_state
    from centerpoint.step import make_train_step

    plan = build_optimizer(spec, spe, spec.train.batch_size * ctx.world_size)
    net = distributed.sync_batchnorm(build_network(spec.model), ctx).double()
    params, buffers = init(spec.model, spec.train.seed)

    def wide(tree: dict) -> dict:
        return {k: v.double() if v.is_floating_point() else v for k, v in tree.items()}

    state = distributed.broadcast_state(init_state(wide(params), wide(buffers), plan.transform), ctx)
    distributed.check_identical(flatten_state(state), ctx)
    apply = make_apply(net)
    step = make_train_step(lambda p, b, x, train: apply(p, b, x.double(), train), spec, plan.transform,
                           StepMode.EAGER, reduce=distributed.make_reduce(ctx))
    for batch in batches:
        state, _ = step(state, batch)
    return state_tensors(state)


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    """Rank `rank` of `world` (global batch 2B): one fp32 step through `run.build_run`, STEPS float64
    steps, then the sharded evaluation of the 1-process fp32 state."""
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rich.console import Console

    from centerpoint.checkpoint import load_checkpoint, restore_state, save_checkpoint, state_tensors
    from centerpoint.data.loader import DetectionDataset, epoch_batches, make_loader
    from centerpoint.data.train_batches import train_collate
    from centerpoint.evaluation.evaluate import evaluate, predict_split
    from centerpoint.run import build_run

    out_dir = Path(out)
    spec = _spec(Path(root), out_dir / f"work{world}", 2 * B // world)
    run = build_run(spec, False, Console(quiet=True))
    shard = epoch_batches(len(run.train_index), spec.train.batch_size, spec.train.seed, 0, rank, world)[:STEPS]
    dataset = DetectionDataset(run.train_index, spec.data, spec.train.seed, train=True)
    batches = list(make_loader(dataset, shard, collate=train_collate(spec, on_device=False), workers=0,
                               pin_memory=False, pin_device=""))
    state, metrics = run.step_fn(run.state, batches[0])
    report = {"peaks": [int((b["heatmap"] == 1).sum()) for b in batches],
              "step1": {k: float(v) for k, v in metrics.items()}}
    torch.save(state_tensors(state), out_dir / f"fp32_{world}_{rank}.pt")
    torch.save(_train_float64(spec, run.dist, batches, run.steps_per_epoch), out_dir / f"fp64_{world}_{rank}.pt")
    try:  # a tensor that differs between ranks is named
        distributed.check_identical({"probe.rank": torch.tensor([float(rank)])}, run.dist)
        report["differ"] = ""
    except CenterpointError as err:
        report["differ"] = str(err)
    one = out_dir / "fp32_1.safetensors"
    if world == 1:
        save_checkpoint(one, state, spec, 0, 1)
    state = restore_state(load_checkpoint(one), state)
    report["metrics"], _ = evaluate(run.predict_fn, state.params, state.buffers, run.val_index, spec, run.backend,
                                    run.dist)
    rows, _ = predict_split(run.predict_fn, state.params, state.buffers, run.val_index, spec, run.backend, rank,
                            world)
    report["rows"] = np.concatenate(distributed.gather_objects(rows, run.dist)).tolist()
    (out_dir / f"report_{world}_{rank}.json").write_text(json.dumps(report, sort_keys=True))
    distributed.destroy(run.dist)


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch.multiprocessing as mp

    base = tmp_path_factory.mktemp("dp")
    root = _one_box_dataset(base / "data")
    mp.spawn(_worker, args=(1, 0, str(root), str(base)), nprocs=1)
    mp.spawn(_worker, args=(2, launch.free_port(), str(root), str(base)), nprocs=2)
    return base


def _relative(a: dict, b: dict, prefix: str) -> float:
    """||a - b|| / ||b|| over all tensors whose name starts with `prefix`."""
    keys = [k for k in b if k.startswith(prefix) and b[k].is_floating_point()]
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in keys])
    return float(diff.norm() / torch.cat([b[k].double().flatten() for k in keys]).norm())


def test_two_processes_train_like_one_with_the_concatenated_batch(equivalence_runs: Path) -> None:
    base = equivalence_runs
    reports = [json.loads((base / f"report_{w}_{r}.json").read_text()) for w, r in ((1, 0), (2, 0), (2, 1))]
    assert reports[0]["peaks"] == [2 * B] * STEPS and reports[1]["peaks"] == reports[2]["peaks"] == [B] * STEPS
    assert reports[0]["differ"] == "" and all("(probe.rank)" in r["differ"] for r in reports[1:])
    for key in ("loss", "loss_heatmap", "loss_wh", "loss_offset"):  # the global batch's losses
        for two in reports[1:]:
            assert two["step1"][key] == pytest.approx(reports[0]["step1"][key], rel=1e-5), key
    for kind in ("fp32", "fp64"):
        one = torch.load(base / f"{kind}_1_0.pt")
        r0, r1 = (torch.load(base / f"{kind}_2_{r}.pt") for r in (0, 1))
        assert int(one["step"]) == int(r0["step"]) == (1 if kind == "fp32" else STEPS)
        for k in one:
            assert torch.equal(r0[k], r1[k]), k  # every rank holds exactly the same state
            if not one[k].is_floating_point():
                assert torch.equal(r0[k], one[k]), k
        # fp32 gradients (the momentum in opt.*) carry the network's rounding noise (in one process, two
        # orders of the same batch give gradients 6e-6 apart, 1.4e-2 with channels-last cpu kernels), so
        # they are compared in float64 only.
        assert _relative(r0, one, "params.") < 1e-5 and _relative(r0, one, "buffers.") < 1e-5
    one, r0 = torch.load(base / "fp64_1_0.pt"), torch.load(base / "fp64_2_0.pt")
    for k, v in one.items():  # in float64 every single tensor agrees
        if v.is_floating_point():
            torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-5 * float(v.abs().max()), msg=k)
    from centerpoint.model import init

    params, _ = init(_spec(base, base, B).model, 0)
    assert max(float((one["params." + k] - v.double()).abs().max()) for k, v in params.items()) > 1e-2


def test_two_process_evaluation_gives_the_same_metrics(equivalence_runs: Path) -> None:
    one, two = (json.loads((equivalence_runs / f"report_{w}_0.json").read_text()) for w in (1, 2))
    assert json.dumps(one["metrics"], sort_keys=True) == json.dumps(two["metrics"], sort_keys=True)
    rows1, rows2 = (np.array(sorted(map(tuple, r["rows"]))) for r in (one, two))
    # The same detections, to the last bits of batch-size dependent conv kernels: scores within 1e-6,
    # box coordinates (pixels, up to a few hundred) within 1e-6 relative.
    assert rows1.shape == rows2.shape and len(rows1) > 0
    np.testing.assert_allclose(rows2, rows1, rtol=1e-6, atol=1e-6)


@pytest.mark.e2e
def test_eval_command_on_two_processes_writes_the_same_metrics(equivalence_runs: Path) -> None:
    """`centerpoint eval --nproc-per-node 2`: two launched workers, each predicting its shard; rank 0
    writes metrics and detections identical to those of a one-process `centerpoint eval`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outs, dets = {}, {}
    for n in (1, 2):
        out = equivalence_runs / f"eval_cli_{n}.json"
        ckpt = str(equivalence_runs / "fp32_1.safetensors")
        cmd = [sys.executable, "-m", "centerpoint", "eval", "--checkpoint", ckpt,
               "--out", str(out), "--nproc-per-node", str(n)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("bbox_mAP_50") == 1 and res.stdout.count(f"wrote {out}") == 1  # rank 0 only
        outs[n] = json.loads(out.read_text())
        dets[n] = sorted(json.loads(out.with_name(out.stem + ".detections.json").read_text()),
                         key=lambda d: (d["image_id"], d["category_id"], -d["score"]))
    one, two = outs[1], outs[2]
    assert one["images"] == 8 and one["bad_images"] == 0
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
    assert len(dets[1]) == len(dets[2]) > 0  # the same detections (rounded in the file: 2 decimals, 5 for scores)
    for a, b in zip(dets[1], dets[2], strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=2e-5) and a["bbox"] == pytest.approx(b["bbox"], abs=0.02)


# ---------------------------------------------------------------- the launcher through the real CLI


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the launcher's child processes (read from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry)
    return found


def _start_cli(work: Path, cache: Path, steps: int, restarts: int, overrides: list[str]) -> subprocess.Popen:
    sets = [x for o in [*overrides, "train.batch_size=4", "runtime.precision=fp32", "runtime.sync_bn=true",
                        "train.checkpoint_every_steps=2", "logging.tensorboard=false"] for x in ("--set", o)]
    args = [sys.executable, "-m", "centerpoint", "train", *sets, "--max-steps", str(steps), "--workdir", str(work),
            "--device", "cpu", "--nproc_per_node", "2", "--nnode", "1", "--node_rank", "0",
            "--master_addr", "127.0.0.1", "--master_port", str(launch.free_port()),
            "--max-restarts", str(restarts)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CENTERPOINT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(work.with_suffix(".out"), "w"),
                            stderr=open(work.with_suffix(".err"), "w"))


def _kill_rank1_after_first_checkpoint(proc: subprocess.Popen, work: Path) -> float:
    """Wait for the run's first checkpoint, SIGKILL the rank-1 worker; returns the time of the kill."""
    latest = work / "checkpoints" / "latest.safetensors"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert proc.poll() is None, work.with_suffix(".err").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    workers = _worker_pids(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGKILL)
    return time.monotonic()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        for pid in _worker_pids(proc.pid).values():
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds worker processes through /proc")
def test_killed_worker_ends_the_job_with_an_error_naming_it(tmp_path, tiny_overrides, cache_dir) -> None:
    proc = _start_cli(tmp_path / "run", cache_dir, 300, 0, tiny_overrides)
    try:
        killed_at = _kill_rank1_after_first_checkpoint(proc, tmp_path / "run")
        rc = proc.wait(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        _stop(proc)
    err = (tmp_path / "run.err").read_text()
    assert rc == 2, err[-3000:]
    assert "error: worker rank 1 (pid" in err and "killed by SIGKILL" in err


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds worker processes through /proc")
def test_restarted_workers_resume_and_finish(tmp_path, tiny_overrides, cache_dir) -> None:
    from centerpoint.checkpoint import load_checkpoint

    steps = 9
    proc = _start_cli(tmp_path / "run", cache_dir, steps, 1, tiny_overrides)
    try:
        _kill_rank1_after_first_checkpoint(proc, tmp_path / "run")
        rc = proc.wait(timeout=300)
    finally:
        _stop(proc)
    out, err = (tmp_path / "run.out").read_text(), (tmp_path / "run.err").read_text()
    assert rc == 0, err[-3000:]
    assert "resuming from" in out
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.safetensors").step == steps
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds worker processes through /proc")
def test_ctrl_c_to_the_launcher_stops_every_worker_at_one_step(tmp_path, tiny_overrides, cache_dir) -> None:
    """Ctrl-C reaches the launcher (the workers run in sessions of their own); it forwards the signal, the
    ranks agree on a step, rank 0 saves `latest` there, and the launcher exits 130."""
    from centerpoint.checkpoint import load_checkpoint

    work = tmp_path / "run"
    proc = _start_cli(work, cache_dir, 300, 0, tiny_overrides)
    try:
        latest = work / "checkpoints" / "latest.safetensors"
        deadline = time.monotonic() + 240
        while not latest.exists():
            assert proc.poll() is None and time.monotonic() < deadline, work.with_suffix(".err").read_text()[-3000:]
            time.sleep(0.05)
        workers = _worker_pids(proc.pid)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        _stop(proc)
    err = work.with_suffix(".err").read_text()
    assert rc == 130, err[-3000:]
    found = re.search(r"^interrupted at step (\d+); resume with: .* --resume$", err, re.MULTILINE)
    assert found, err[-3000:]
    assert err.count("interrupted at step") == 1  # rank 0 speaks for the job
    ckpt = load_checkpoint(latest)
    per_epoch = 24 // (4 * 2)
    assert ckpt.step == int(found[1]) == ckpt.epoch * per_epoch + ckpt.batch_in_epoch
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers.values())


# ---------------------------------------------------------------- pieces, without processes


def test_context_from_launcher_and_slurm_environments() -> None:
    ctx = distributed.context({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.restart_count, ctx.distributed) == (3, 1, 4, 2, True)
    one = distributed.context({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})  # torchrun --nproc-per-node 1
    assert one.world_size == 1 and one.joined and one.distributed and not distributed.Context().distributed
    ctx = distributed.context({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"})
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.restart_count) == (5, 1, 8, 0)
    assert distributed.context({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == distributed.Context()
    assert distributed.launched({"WORLD_SIZE": "1"}) and distributed.launched({"SLURM_PROCID": "1",
                                                                                "SLURM_NTASKS": "2"})
    assert not distributed.launched({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})


def test_launch_plan_decides_and_configures_the_elastic_agent() -> None:
    assert launch.needs_launch(launch.LaunchPlan(2), {})
    assert not launch.needs_launch(launch.LaunchPlan(1), {})
    assert launch.needs_launch(launch.LaunchPlan(1, requested=True), {})  # --nproc-per-node 1: one launched worker
    assert not launch.needs_launch(launch.LaunchPlan(1, requested=True), {"WORLD_SIZE": "1", "RANK": "0"})
    assert not launch.needs_launch(launch.LaunchPlan(3), {"WORLD_SIZE": "3", "RANK": "0"})  # under torchrun
    assert launch.needs_launch(launch.LaunchPlan(1, nnodes=2, master_addr="h"), {})
    cfg = launch.launch_config(launch.LaunchPlan(3, 2, 1, "node0", 1234, 2))
    assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc_per_node, cfg.max_restarts) == (2, 2, 3, 2)
    assert (cfg.rdzv_backend, cfg.rdzv_endpoint, cfg.rdzv_configs["rank"]) == ("static", "node0:1234", 1)
    single = launch.launch_config(launch.LaunchPlan(2))
    assert single.rdzv_endpoint.startswith("127.0.0.1:") and int(single.rdzv_endpoint.split(":")[1]) > 0
    for bad, flag in ((launch.LaunchPlan(0), "--nproc-per-node"), (launch.LaunchPlan(2, 2), "--master-addr"),
                      (launch.LaunchPlan(2, 2, 2, "h"), "--node-rank"),
                      (launch.LaunchPlan(2, max_restarts=-1), "--max-restarts")):
        with pytest.raises(CenterpointError, match=flag):
            launch.check_plan(bad)
    assert launch.describe_failure(1, -9, 42) == "worker rank 1 (pid 42) was killed by SIGKILL"
    assert launch.describe_failure(0, 2, 7) == "worker rank 0 (pid 7) exited with code 2"


def test_bit_checksum_sees_one_ulp_and_reads_integer_buffers() -> None:
    x = torch.randn(1000)
    y = x.clone()
    y[500] = torch.nextafter(y[500], torch.tensor(float("inf")))
    assert int(distributed.bit_checksum(x)) == int(distributed.bit_checksum(x.clone()))
    assert int(distributed.bit_checksum(x)) != int(distributed.bit_checksum(y))
    assert int(distributed.bit_checksum(torch.tensor(7, dtype=torch.int64))) == 7
    assert int(distributed.bit_checksum(torch.ones(3, dtype=torch.bfloat16))) == 3 * 0x3F80


def test_sync_batchnorm_keeps_names_and_is_native_outside_a_group() -> None:
    from centerpoint.model import build_network
    from centerpoint.spec import ModelSpec

    net = build_network(ModelSpec())
    before = {k: v.shape for k, v in net.state_dict().items()}
    assert distributed.sync_batchnorm(net, distributed.Context()) is net  # one process: untouched
    assert not any(isinstance(m, distributed.SyncBatchNorm2d) for m in net.modules())
    distributed.sync_batchnorm(net, distributed.Context(0, 0, 2))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(type(m) is distributed.SyncBatchNorm2d for m in bns)
    assert {k: v.shape for k, v in net.state_dict().items()} == before
    bn, native = bns[0], torch.nn.BatchNorm2d(bns[0].num_features)
    native.load_state_dict(bn.state_dict())
    x = torch.randn(2, bn.num_features, 5, 5)
    torch.testing.assert_close(bn.train()(x), native.train()(x))  # no process group: the native path


def test_cuda_and_sdaa_selection_without_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    have = {"cuda": False, "sdaa": True}
    assert devices.resolve_name("auto", lambda n: have[n]) == "sdaa"
    have["cuda"] = True
    assert devices.resolve_name("auto", lambda n: have[n]) == "cuda"
    assert devices.resolve_name("auto", lambda n: False) == "cpu"
    with pytest.raises(CenterpointError, match="--device sdaa"):
        devices.resolve_name("sdaa", lambda n: False)
    cuda, sdaa, cpu = devices.make_backend("cuda", 2), devices.make_backend("sdaa", 1), devices.make_backend("cpu", 3)
    assert (cuda.device, cuda.dist_backend, cuda.compile_by_default) == (torch.device("cuda", 2), "nccl", True)
    assert (sdaa.device_string, sdaa.dist_backend, sdaa.compile_by_default) == ("sdaa:1", "tccl", False)
    assert (cpu.device, cpu.dist_backend) == (torch.device("cpu"), "gloo")
    assert devices.should_compile(sdaa, "on") and not devices.should_compile(sdaa, "auto")
    with warnings.catch_warnings():  # without a GPU torch warns that it disables this context
        warnings.simplefilter("ignore")
        amp = cuda.autocast("bf16")
    assert isinstance(amp, torch.autocast) and (amp.device, amp.fast_dtype) == ("cuda", torch.bfloat16)
    assert cuda.autocast("fp32").__class__ is not torch.autocast
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.select_backend("cuda", 1).device == torch.device("cuda", 1) and set_to == [1]
    joined = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    monkeypatch.setitem(sys.modules, "torch_sdaa", type(sys)("torch_sdaa"))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    for backend in (cuda, sdaa, cpu):
        distributed.init_process_group(distributed.Context(0, 0, 2), backend)
    assert joined == ["nccl", "tccl", "gloo"]


@pytest.mark.e2e
@pytest.mark.parametrize(("vendor_amp", "bf16"), [(False, True), (True, False)])
def test_sdaa_backend_registered_like_torch_sdaa_does(tmp_path: Path, vendor_amp: bool, bf16: bool) -> None:
    """In a fresh process: a stand-in `torch_sdaa` registers the 'sdaa' device name the way the real one
    does and gives `torch.sdaa` the surface Tecorigin's own DeepSpeed accelerator uses (is_available,
    device_count, set_device, synchronize, max_memory_allocated, reset_max_memory_allocated, manual_seed,
    is_bf16_supported, each taking a device index) and nothing more, besides what torch.autocast requires
    of any such device (get_amp_supported_dtype) and `torch.sdaa.amp.autocast` when `vendor_amp` (the real
    one has it).
    Selection sets the card of the local rank; synchronisation, memory and seeding go to that card;
    precision auto is bf16 where the card has it, else fp16; mixed precision autocasts on 'sdaa' (through
    the vendor's amp when present). Selecting cpu never imports torch_sdaa."""
    (tmp_path / "torch_sdaa.py").write_text(textwrap.dedent(f"""
        import types
        import torch
        torch.utils.rename_privateuse1_backend("sdaa")
        calls = []

        def record(name, result=None):
            return lambda *args: (calls.append((name, *args)), result)[1]

        torch.sdaa = types.SimpleNamespace(
            is_available=lambda: True, device_count=lambda: 3, set_device=record("set_device"),
            synchronize=record("synchronize"), max_memory_allocated=record("max_memory_allocated", 3 * 2**20),
            reset_max_memory_allocated=record("reset_max_memory_allocated"),
            manual_seed=record("manual_seed"), is_bf16_supported=lambda: {bf16},
            get_amp_supported_dtype=lambda: [torch.float16, torch.bfloat16])  # torch.autocast asks any such device
        amp_calls = []

        def vendor_autocast(dtype=None):  # the vendor's amp records the dtype it was asked for
            amp_calls.append(dtype)
            return torch.autocast(device_type="sdaa", dtype=dtype)

        if {vendor_amp}:
            torch.sdaa.amp = types.SimpleNamespace(autocast=vendor_autocast)
    """))
    code = textwrap.dedent("""
        import sys
        from centerpoint.runtime import devices
        devices.select_backend("cpu")
        assert "torch_sdaa" not in sys.modules
        backend = devices.select_backend("sdaa", 1)
        import torch, torch_sdaa
        backend.synchronize()
        backend.manual_seed(7)
        backend.reset_peak_memory()
        mb = backend.max_memory_mb()
        amp = backend.autocast(devices.resolve_precision(backend, "fp16"))
        auto = devices.resolve_precision(backend, "auto")
        print(backend.device, torch_sdaa.calls, mb, amp.device, amp.fast_dtype, auto, torch_sdaa.amp_calls)
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    amp_calls = ["[torch.float16]"] if vendor_amp else ["[]"]
    calls = ("[('set_device', 1), ('synchronize', 1), ('manual_seed', 7), ('reset_max_memory_allocated', 1), "
             "('max_memory_allocated', 1)]")
    assert res.stdout.split() == ["sdaa:1", *calls.split(), "3.0", "sdaa", "torch.float16", "bf16" if bf16 else "fp16",
                                  *amp_calls]
