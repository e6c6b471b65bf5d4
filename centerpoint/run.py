"""A run, built from its spec in a few named steps before the first train step:

    runtime   the device backend, resolved settings, process group
    data      the dataset located (or generated) and indexed; steps per epoch
    state     the network, a fresh train state on the device, the optimizer and its schedule
    steps     the train and predict steps, compiled where the backend says so
    resume    the run directory locked (rank 0; last, so that nothing after it can fail) and the
              checkpoint to continue from, if any

`build_run` wires them into a `Run`, the value the training loop (`train.train`) takes. Tests replace
parts of a `Run` (`dataclasses.replace(run, step_fn=...)`) rather than patching this module.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import TaskID

from centerpoint.checkpoint import Checkpointer, restore_state
from centerpoint.classes import Classes, align, of_index, with_num_classes
from centerpoint.data.coco import CocoIndex, data_identity
from centerpoint.data.loader import steps_per_epoch
from centerpoint.data.paths import data_root, load_split
from centerpoint.errors import CenterpointError
from centerpoint.io import run_dir as rundir
from centerpoint.io.monitor import make_progress
from centerpoint.io.run_dir import remove_partial_writes
from centerpoint.model import Model, build_model, init
from centerpoint.optim.ema import init_ema
from centerpoint.optim.loss_scale import init_loss_scale
from centerpoint.optim.plan import OptimizerPlan, build_optimizer
from centerpoint.optim.schedules import Schedule
from centerpoint.replicas.fold import fold_network, make_folded_apply
from centerpoint.replicas.settings import Replica, init_seed, peak_lrs, replicas_of, replicated_state
from centerpoint.replicas.step import make_replicated_step
from centerpoint.resume import check_same_data, resume_checkpoint, resume_step
from centerpoint.runtime import distributed
from centerpoint.runtime.devices import Backend, compile_step, resolve_compile_backend, resolve_settings, step_mode
from centerpoint.spec import ExperimentSpec
from centerpoint.state import TrainState, Tree, flatten_state, init_state, to_device
from centerpoint.step import make_predict_step, make_train_step


@dataclass(frozen=True)
class Run:
    """What the loop needs, built once from the spec."""

    spec: ExperimentSpec  # resolved (`spec.resolved`): recorded in spec.yaml, checkpoints and TensorBoard
    backend: Backend
    dist: distributed.Context
    workdir: Path
    train_index: CocoIndex
    val_index: CocoIndex
    state: TrainState
    step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]]
    schedule: Schedule  # the optimizer's lr over updates applied (logged as the lr of each step)
    predict_fn: Any
    steps_per_epoch: int
    total_steps: int
    start_step: int  # global steps already taken (skipped non-finite ones included): the loop continues after it
    checkpointer: Checkpointer
    started: float  # time.perf_counter() when building began
    finished: dict | None = None  # resumed from the end of a completed run: its last evaluation
    compiled: bool = False
    lock: rundir.RunLock | None = None  # rank 0's lock on the run directory, held until the run ends
    replicas: tuple[Replica, ...] = ()  # train.replicas > 1: the models the stacked state holds; () for one


@dataclass(frozen=True)
class Data:
    """The data step's result: both splits, their identity (stored in every checkpoint) and the epoch."""

    train_index: CocoIndex
    val_index: CocoIndex
    identity: dict
    steps_per_epoch: int
    classes: Classes  # the train split's class names and category ids, in label order


@dataclass(frozen=True)
class Resumed:
    """Where the run starts: its state, the steps already taken, its id; `finished`: the last evaluation
    when the checkpoint is the end of a completed run."""

    state: TrainState
    start_step: int
    run_id: str
    finished: dict | None
    lock: rundir.RunLock | None


def build_run(spec: ExperimentSpec, resume: bool, console: Console, resume_from: Path | None = None) -> Run:
    """Everything up to the first step. `resume`: continue from the run directory's newest usable
    checkpoint; `resume_from`: from that file. The run directory is created (and locked, on rank 0) only
    once the data and the model are ready, so bad input leaves nothing behind."""
    started = time.perf_counter()
    dist = distributed.context()
    if dist.restart_count > 0:  # a restarted worker continues from the run's latest checkpoint
        resume, resume_from = True, None
    resume = resume or resume_from is not None
    workdir = Path(spec.logging.workdir)
    if dist.rank == 0:
        rundir.check_start(workdir, resume)
    spec, backend, notes = build_runtime(spec, dist)
    spec, data = build_data(spec, dist, console)
    plan = build_optimizer(spec, data.steps_per_epoch, spec.train.batch_size * dist.world_size)
    model, state = build_state(spec, backend, dist, plan, console)
    step_fn, predict_fn, compile_with = build_steps(spec, backend, dist, model, plan)
    replicas, schedule = (), plan.schedule
    if spec.train.replicas > 1:  # the lr each replica's schedule gives, (K,), for the logs
        replicas = tuple(replicas_of(spec))
        schedule = plan.make_schedule(peak_lrs(spec, spec.train.batch_size * dist.world_size, backend.device))
    start = resume_run(spec, dist, workdir, state, data, plan.total_steps, resume, resume_from, console)
    if dist.rank == 0:
        _print_banner(console, spec, backend, dist, data, plan, notes, compile_with)
    checkpointer = Checkpointer(workdir / "checkpoints", spec, start.run_id, data.identity, data.steps_per_epoch,
                                plan.total_steps, data.classes)
    return Run(spec, backend, dist, workdir, data.train_index, data.val_index, start.state, step_fn, schedule,
               predict_fn, data.steps_per_epoch, plan.total_steps, start.start_step, checkpointer, started,
               start.finished, compile_with is not None, start.lock, replicas)


def build_runtime(spec: ExperimentSpec, dist: distributed.Context) -> tuple[ExperimentSpec, Backend, list[str]]:
    """Resolve the device backend and the `auto` settings (recorded as `spec.resolved`), seed the device,
    join the process group. Returns (resolved spec, backend, notes to print)."""
    backend, resolved, notes = resolve_settings(spec, dist.local_rank)
    if spec.train.replicas > 1 and spec.runtime.sync_bn and dist.distributed:
        raise CenterpointError(f"train.replicas={spec.train.replicas} with runtime.sync_bn: synchronised BatchNorm "
                               "is not supported under vmap; set runtime.sync_bn=false")
    if spec.train.replicas > 1 and resolved.precision != "fp32":
        # Under vmap, BatchNorm's batching rule rejects autocast's bf16/fp16 activations with fp32 weights
        # (torch 2.13): replicated runs compute in fp32.
        if spec.runtime.precision != "auto":
            raise CenterpointError(f"train.replicas={spec.train.replicas} needs runtime.precision fp32 (or auto): "
                                   "vmapped BatchNorm does not take autocast's mixed precision")
        resolved = resolved.model_copy(update={"precision": "fp32"})
        notes = [*notes, "replicated run: precision fp32 (autocast's mixed precision does not run under vmap)"]
    spec = spec.model_copy(update={"resolved": resolved})
    backend.manual_seed(spec.train.seed + dist.rank)  # device-side draws differ per rank, reproducibly
    if spec.runtime.threads:
        torch.set_num_threads(spec.runtime.threads)
    distributed.init_process_group(dist, backend)
    return spec, backend, notes


def build_data(spec: ExperimentSpec, dist: distributed.Context, console: Console) -> tuple[ExperimentSpec, Data]:
    """Locate (or generate, rank 0 first) the dataset and index both splits. Returns the spec with
    model.num_classes set from the train split when it is null, and the data."""
    root = _prepare_data(spec, console, dist)
    train_index = load_split(spec, root, True)
    spec, classes = with_num_classes(spec, train_index), of_index(train_index)
    val_index, _ = align(load_split(spec, root, False), classes, f"the train split ({train_index.ann_file})")
    world = dist.world_size
    spe = steps_per_epoch(len(train_index), spec.train.batch_size, world)
    if spe == 0:
        raise CenterpointError(f"train.batch_size={spec.train.batch_size} x {world} is larger than the train set "
                               f"({len(train_index)} images)")
    return spec, Data(train_index, val_index, data_identity(train_index, val_index), spe, classes)


def build_state(spec: ExperimentSpec, backend: Backend, dist: distributed.Context, plan: OptimizerPlan,
                console: Console) -> tuple[Model, TrainState]:
    """The model (traced apply when the step will be compiled) and a fresh train state on the device:
    initialised, pretrained or fine-tuned (`model.init_from`) weights, the optimizer's state, the fp16 loss
    scaler, the EMA of the weights (train.ema_decay; it starts as a copy of them). With train.replicas > 1 one
    such state per replica (its own init seed), stacked."""
    replicated = spec.train.replicas > 1  # vmapped: the functional apply
    model = build_model(spec.model, backend.device, seed=init_seed(spec),
                        traced=spec.resolved.compile == "on" or replicated, channels_last=spec.runtime.channels_last,
                        convert=(lambda net: distributed.sync_batchnorm(net, dist)) if spec.runtime.sync_bn else None)

    def fresh(seed: int) -> TrainState:
        params, buffers = (model.params, model.buffers) if seed == init_seed(spec) else init(spec.model, seed)
        return _initial_state(spec, params, buffers, plan, console if seed == init_seed(spec) else None, dist)

    if replicated:
        state = replicated_state(spec, spec.train.batch_size * dist.world_size, fresh)
    else:
        state = fresh(init_seed(spec))
    return model, to_device(state, backend.device, spec.runtime.channels_last)


def _initial_state(spec: ExperimentSpec, params: Tree, buffers: Tree, plan: OptimizerPlan, console: Console | None,
                   dist: distributed.Context) -> TrainState:
    """One model's state at step 0 from its fresh weights: the pretrained backbone and `model.init_from`
    loaded over them (reported on `console`), the optimizer's state, the fp16 loss scaler, the EMA."""
    if spec.model.pretrained is not None:
        from centerpoint.weights.foreign import load_torchvision_backbone

        params, buffers = load_torchvision_backbone(spec.model.pretrained, params, buffers)
    if spec.model.init_from is not None:  # after `pretrained`: its tensors win where both give one
        from centerpoint.weights.finetune import init_from

        say = (lambda text: console.print(text, markup=False, soft_wrap=True)) \
            if dist.rank == 0 and console is not None else None
        params, buffers = init_from(spec.model.init_from, params, buffers, say)
    scaler = init_loss_scale(spec.runtime.loss_scale) if spec.resolved.precision == "fp16" else None
    state = init_state(params, buffers, plan.transform, scaler)
    if spec.train.ema_decay is not None:
        state = state._replace(ema=init_ema(params, buffers))
    return state


def resume_run(spec: ExperimentSpec, dist: distributed.Context, workdir: Path, state: TrainState, data: Data,
               total_steps: int, resume: bool, resume_from: Path | None, console: Console) -> Resumed:
    """Rank 0 locks the run directory and picks the checkpoint to continue from (checked against the
    spec and the data); every rank then starts from rank 0's state and step."""
    start_step, finished, lock, run_id = 0, None, None, uuid.uuid4().hex
    if dist.rank == 0:
        lock = rundir.lock(workdir)
        try:
            rundir.check_start(workdir, resume)  # again, now under the lock: another run may have just started
            remove_partial_writes(workdir)
            ckpt = resume_checkpoint(workdir, resume_from, console.print) if resume else None
            if ckpt is not None:
                start_step = resume_step(ckpt, spec, data.steps_per_epoch, total_steps)
                check_same_data(ckpt, data.identity)
                if start_step == total_steps and ckpt.metrics.get("step") == start_step:
                    finished = ckpt.metrics
                state, run_id = restore_state(ckpt, state), ckpt.run_id
                console.print(f"resuming from {ckpt.path} (step {ckpt.step}, epoch {ckpt.epoch})")
        except BaseException:
            lock.release(remove_created=True)
            raise
    start_step, finished = distributed.broadcast_object((start_step, finished), dist)
    state = distributed.broadcast_state(state, dist)
    distributed.check_identical(flatten_state(state), dist)
    return Resumed(state, start_step, run_id, finished, lock)


def build_steps(spec: ExperimentSpec, backend: Backend, dist: distributed.Context, model: Model,
                plan: OptimizerPlan) -> tuple[Callable, Callable, str | None]:
    """The train and predict steps; with `runtime.compile` resolved on, compiled with the backend's
    torch.compile backend. Returns (train step, predict step, compile backend or None)."""
    compiled, precision = spec.resolved.compile == "on", spec.resolved.precision
    if compiled:
        # Inductor's compiled-graph caches (on by default) live under /tmp unless told otherwise: keep
        # them beside the datasets so a later run of the same shapes skips most of the compile. Set before
        # torch._dynamo is asked for its backends, which settles the directory.
        from centerpoint.io.cache import default_cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))
    compile_with = resolve_compile_backend(backend, spec.runtime.compile_backend) if compiled else None
    autocast, reduce = (lambda: backend.autocast(precision)), distributed.make_reduce(dist)
    apply, k = model.apply, spec.train.replicas
    if k > 1:
        net = fold_network(model.net, k)  # None: the network has other layers; the step vmaps instead
        folded = make_folded_apply(net, k, spec.runtime.channels_last) if net is not None else None
        step_fn = make_replicated_step(apply, spec, plan.transform, step_mode(backend, compiled), folded=folded,
                                       reduce=reduce, autocast=autocast)
    else:
        step_fn = make_train_step(apply, spec, plan.transform, step_mode(backend, compiled), reduce=reduce,
                                  autocast=autocast)
    predict_fn = make_predict_step(apply, spec, autocast=lambda: backend.autocast(precision))
    if compiled:
        step_fn = compile_step(step_fn, compile_with)
        predict_fn = compile_step(predict_fn, compile_with, dynamic=spec.data.test_mode == "pad")
    return step_fn, predict_fn, compile_with


def _prepare_data(spec: ExperimentSpec, console: Console, dist: distributed.Context) -> Path:
    """Generate/locate the dataset; with several processes rank 0 goes first, the others wait. A `dataset`
    bar appears only while synthetic images are being written (not for a COCO root, nor a cached set)."""
    if dist.rank != 0:
        distributed.barrier(dist)
        return data_root(spec)
    progress = make_progress(console, spec.logging.progress)
    task: list[TaskID] = []

    def report(done: int, total: int) -> None:
        if not task:
            progress.start()
            task.append(progress.add_task("dataset", total=total, info="writing synthetic images"))
        progress.update(task[0], completed=done, total=total)

    try:
        root = data_root(spec, report)
    finally:
        progress.stop()
    distributed.barrier(dist)
    return root


def _print_banner(console: Console, spec: ExperimentSpec, backend: Backend, dist: distributed.Context, data: Data,
                  plan: OptimizerPlan, notes: list[str], compile_with: str | None) -> None:
    """Rank 0's summary of the run before its first step."""
    for note in notes:
        console.print(f"note: {note}")
    world, resolved = dist.world_size, spec.resolved
    gb = spec.train.batch_size * world
    scaled = f" (scaled from {spec.optim.lr:g} for base batch {spec.optim.base_batch})" \
        if spec.optim.base_batch and plan.lr != spec.optim.lr else ""
    group = f" ({backend.dist_backend} process group)" if dist.distributed else ""
    train_index, val_index = data.train_index, data.val_index
    console.print(f"device {backend.device} x {world}{group} | global batch {gb} | lr {plan.lr:g}{scaled} | "
                  f"{len(train_index)} train / {len(val_index)} val images | {data.steps_per_epoch} steps/epoch | "
                  f"compile {compile_with or 'off'} | {resolved.precision} | "
                  f"{resolved.workers} loader workers | augment on "
                  f"{'device' if resolved.augment_on == 'device' else 'workers'}"
                  + (f" | EMA of weights, decay {spec.train.ema_decay:g}" if spec.train.ema_decay is not None else ""))
    if spec.train.replicas > 1:
        rs = replicas_of(spec)
        console.print(f"{len(rs)} replicas in one step: init seeds {rs[0].init_seed}..{rs[-1].init_seed}, "
                      f"lr {', '.join(f'{r.lr:g}' for r in rs)}, weight decay "
                      f"{', '.join(f'{r.weight_decay:g}' for r in rs)}")
    dropped = train_index.dropped_boxes + val_index.dropped_boxes
    if dropped or train_index.dropped_images:
        console.print(f"dropped {dropped} boxes of zero, negative or non-finite size or below "
                      f"data.min_box_size and {train_index.dropped_images} train images left without boxes "
                      "(`centerpoint data check` lists them)")
