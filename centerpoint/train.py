"""The training loop: build the run from its spec, step, log, evaluate, checkpoint, resume."""

from __future__ import annotations

import os
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from centerpoint import distributed, rundir
from centerpoint.build import build_optimizer, data_root, load_split
from centerpoint.checkpoint import Checkpoint, check_same_data, remove_partial_writes, restore_state, resume_position
from centerpoint.classes import Classes, align, of_index, with_num_classes
from centerpoint.coco_metrics import format_metrics_table
from centerpoint.data.coco import CocoIndex, data_identity
from centerpoint.data.device_augment import augment_batch
from centerpoint.data.loader import DetectionDataset, epoch_batches, make_loader, steps_per_epoch
from centerpoint.devices import Backend, compile_step, resolve_compile_backend, resolve_settings
from centerpoint.errors import CenterpointError
from centerpoint.evaluate import compute_metrics, predict_split
from centerpoint.interrupt import Interrupted, StopRequest, stop_requests
from centerpoint.layout import channels_last as to_channels_last
from centerpoint.model import build_network, init, make_apply
from centerpoint.monitor import TensorBoard, Throughput, append_metrics, make_progress
from centerpoint.retention import resume_checkpoint, save_epoch, save_own
from centerpoint.spec import ExperimentSpec, spec_to_yaml
from centerpoint.step import Divergence, TrainState, init_state, make_predict_step, make_train_step


@dataclass
class Run:
    """What the loop needs, built once from the spec."""

    spec: ExperimentSpec
    backend: Backend
    workdir: Path
    train_index: CocoIndex
    val_index: CocoIndex
    state: TrainState
    step_fn: Any
    predict_fn: Any
    steps_per_epoch: int
    total_steps: int
    start_epoch: int
    start_batch: int
    dist: distributed.Context
    finished: dict | None = None  # resumed from the end of a completed run: its last evaluation
    compiled: bool = False
    augment_on_device: bool = False  # data.augment_on resolved
    lock: rundir.RunLock | None = None  # rank 0's lock on the run directory, held until the run ends
    run_id: str = ""  # written into every checkpoint: the run replaces and deletes only its own files
    data: dict | None = None  # the data's identity, stored in every checkpoint (`data_identity`)
    classes: Classes | None = None  # the model's class names and category ids, stored in every checkpoint


def to_device(state: TrainState, backend: Backend, channels_last: bool) -> TrainState:
    """Move a train state to the backend's device (conv weights channels-last if asked)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(backend.device)
        return to_channels_last(t) if channels_last else t

    return TrainState({k: move(v) for k, v in state.params.items()},
                      {k: move(v) for k, v in state.buffers.items()},
                      {k: move(v) for k, v in state.opt_state.items()}, state.step.to(backend.device),
                      {k: move(v) for k, v in state.scaler.items()})


def build_run(spec: ExperimentSpec, resume: bool, console: Console, resume_from: Path | None = None) -> Run:
    """Everything up to the first step: device, data, model, optimizer, (resumed) state, compiled step.

    `resume`: continue from the run directory's newest usable checkpoint; `resume_from`: from that file.
    The run directory is created (and locked, on rank 0) only once the data and the model are ready, so
    bad input leaves nothing behind."""
    dist = distributed.context()
    if dist.restart_count > 0:  # a restarted worker continues from the run's latest checkpoint
        resume, resume_from = True, None
    resume = resume or resume_from is not None
    workdir = Path(spec.logging.workdir)
    if dist.rank == 0:
        rundir.check_start(workdir, resume)
    backend, resolved, notes = resolve_settings(spec, dist.local_rank)
    spec = spec.model_copy(update={"resolved": resolved})  # recorded with the run: spec.yaml, checkpoints, TB
    backend.manual_seed(spec.train.seed + dist.rank)  # device-side draws differ per rank, reproducibly
    precision = resolved.precision
    if spec.runtime.threads:
        torch.set_num_threads(spec.runtime.threads)
    distributed.init_process_group(dist, backend)
    root = _prepare_data(spec, console, dist)
    train_index = load_split(spec, root, True)
    spec, classes = with_num_classes(spec, train_index), of_index(train_index)  # model.num_classes null: the data's
    val_index, _ = align(load_split(spec, root, False), classes, f"the train split ({train_index.ann_file})")
    data = data_identity(train_index, val_index)
    world = dist.world_size
    spe = steps_per_epoch(len(train_index), spec.train.batch_size, world)
    if spe == 0:
        raise CenterpointError(f"train.batch_size={spec.train.batch_size} x {world} is larger than the train set "
                               f"({len(train_index)} images)")
    plan = build_optimizer(spec, spe, spec.train.batch_size * world)
    net = build_network(spec.model).to(backend.device)
    if spec.runtime.sync_bn:
        net = distributed.sync_batchnorm(net, dist)
    if spec.runtime.channels_last:
        net = net.to(memory_format=torch.channels_last)
    params, buffers = init(spec.model, spec.train.seed)
    if spec.model.pretrained is not None:
        from centerpoint.imports import load_torchvision_backbone

        params, buffers = load_torchvision_backbone(spec.model.pretrained, params, buffers)
    if spec.model.init_from is not None:  # after `pretrained`: its tensors win where both give one
        from centerpoint.finetune import init_from

        say = (lambda text: console.print(text, markup=False, soft_wrap=True)) if dist.rank == 0 else None
        params, buffers = init_from(spec.model.init_from, params, buffers, say)
    loss_scale = spec.runtime.loss_scale if precision == "fp16" else None
    state = to_device(init_state(params, buffers, plan.transform, loss_scale), backend, spec.runtime.channels_last)
    start_epoch = start_batch = 0
    finished, lock, run_id = None, None, uuid.uuid4().hex
    if dist.rank == 0:
        lock = rundir.lock(workdir)
        try:
            ckpt = _claim(workdir, resume, resume_from, console)
            if ckpt is not None:
                done = resume_position(ckpt, spec, spe, plan.total_steps)
                check_same_data(ckpt, data)
                if done == plan.total_steps and ckpt.metrics.get("step") == done:
                    finished = ckpt.metrics
                state = restore_state(ckpt, state)
                start_epoch, start_batch, run_id = ckpt.epoch, ckpt.batch_in_epoch, ckpt.run_id
                console.print(f"resuming from {ckpt.path} (step {ckpt.step}, epoch {ckpt.epoch})")
        except BaseException:
            lock.release(remove_created=True)
            raise
    start_epoch, start_batch, finished = distributed.broadcast_object((start_epoch, start_batch, finished), dist)
    state = distributed.broadcast_state(state, dist)
    distributed.check_identical({"params": state.params, "buffers": state.buffers, "opt": state.opt_state,
                                 "step": {"step": state.step}, "scaler": state.scaler}, dist)
    compiled, on_device = resolved.compile == "on", resolved.augment_on == "device"
    if compiled:
        # Inductor's compiled-graph caches (on by default) live under /tmp unless told otherwise: keep
        # them beside the datasets so a later run of the same shapes skips most of the compile. Set before
        # torch._dynamo is asked for its backends, which settles the directory.
        from centerpoint.data.synthetic import default_cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))
    compile_with = resolve_compile_backend(backend, spec.runtime.compile_backend) if compiled else None
    apply = make_apply(net, traced=compiled)
    step_fn = make_train_step(apply, spec, plan.transform, plan.schedule,
                              autocast=lambda: backend.autocast(precision),
                              reduce=distributed.make_reduce(dist), max_grad_norm=plan.max_grad_norm,
                              guard_by_sync=backend.free_sync and not compiled, compiled=compiled,
                              donate=backend.free_sync and not compiled,
                              growth_interval=spec.runtime.loss_scale_growth_interval)
    predict_fn = make_predict_step(apply, spec, autocast=lambda: backend.autocast(precision))
    if compiled:
        step_fn = compile_step(step_fn, compile_with)
        predict_fn = compile_step(predict_fn, compile_with, dynamic=spec.data.test_mode == "pad")
    if dist.rank == 0:
        for note in notes:
            console.print(f"note: {note}")
        gb = spec.train.batch_size * world
        scaled = f" (scaled from {spec.optim.lr:g} for base batch {spec.optim.base_batch})" \
            if spec.optim.base_batch and plan.lr != spec.optim.lr else ""
        group = f" ({backend.dist_backend} process group)" if dist.distributed else ""
        console.print(f"device {backend.device} x {world}{group} | global batch {gb} | lr {plan.lr:g}{scaled} | "
                      f"{len(train_index)} train / {len(val_index)} val images | {spe} steps/epoch | "
                      f"compile {compile_with or 'off'} | {precision} | "
                      f"{resolved.workers} loader workers | augment on "
                      f"{'device' if on_device else 'workers'}")
        dropped = train_index.dropped_boxes + val_index.dropped_boxes
        if dropped or train_index.dropped_images:
            console.print(f"dropped {dropped} boxes of zero, negative or non-finite size or below "
                          f"data.min_box_size and {train_index.dropped_images} train images left without boxes "
                          "(`centerpoint data check` lists them)")
    return Run(spec, backend, workdir, train_index, val_index, state, step_fn, predict_fn, spe, plan.total_steps,
               start_epoch, start_batch, dist, finished, compiled, on_device, lock, run_id, data, classes)


def _claim(workdir: Path, resume: bool, resume_from: Path | None, console: Console) -> Checkpoint | None:
    """Rank 0, holding the run directory's lock: check it again, clean up killed writes, and pick the
    checkpoint to resume from (None: start fresh)."""
    rundir.check_start(workdir, resume)  # again, now under the lock: another run may have just started here
    remove_partial_writes(workdir)
    return resume_checkpoint(workdir, resume_from, console.print) if resume else None


def _prepare_data(spec: ExperimentSpec, console: Console, dist: distributed.Context) -> Path:
    """Generate/locate the dataset; with several processes rank 0 goes first, the others wait."""
    if dist.rank != 0:
        distributed.barrier(dist)
        return data_root(spec)
    progress = make_progress(console, spec.logging.progress)
    with progress:
        task = progress.add_task("dataset", total=None, info="")

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, info="writing synthetic images")

        root = data_root(spec, report)
    distributed.barrier(dist)
    return root


def to_step_batch(batch: dict[str, torch.Tensor], run: Run) -> dict[str, torch.Tensor]:
    """A loader batch -> the train step's batch on the device (augmented there with data.augment_on=device)."""
    radius = batch.pop("max_radius", None)  # host-side entry of a batch to augment on the device
    batch = {k: v.to(run.backend.device, non_blocking=True) for k, v in batch.items()}
    if radius is None:
        return batch
    spec = run.spec
    return augment_batch(batch, int(radius), spec.data.input_size, spec.model.num_classes, spec.model.stride,
                         spec.loss.min_overlap)


def evaluate_run(run: Run, state: TrainState) -> dict:
    """Distributed evaluation: each rank predicts its shard, rank 0 computes COCO metrics."""
    return evaluate_run_detail(run, state)[0]


def evaluate_run_detail(run: Run, state: TrainState) -> tuple[dict, np.ndarray, dict]:
    """`evaluate_run`, plus (rank 0) the detection rows and COCOeval's precision-recall curve per class."""
    rows, bad = predict_split(run.predict_fn, state.params, state.buffers, run.val_index, run.spec, run.backend,
                              run.dist.rank, run.dist.world_size)
    parts = distributed.gather_objects((rows, bad), run.dist)
    if run.dist.rank != 0:
        return {}, np.zeros((0, 7)), {}
    rows = np.concatenate([r for r, _ in parts])
    metrics = compute_metrics(run.val_index, rows, run.spec, pr_curves=True)
    curves = metrics.pop("pr_curves")
    metrics["bad_images"] = sum(b for _, b in parts)
    return metrics, rows, curves


def train(spec: ExperimentSpec, resume: bool = False, console: Console | None = None,
          resume_from: Path | None = None) -> dict:
    """Train `spec` to the end; returns the last evaluation's metrics (rank 0; {} elsewhere).

    SIGINT/SIGTERM stop the run at the next step boundary: `latest` is saved there and `Interrupted`
    raised (see `centerpoint.interrupt`). The run directory stays locked (rank 0) while this runs."""
    console = console or Console()
    t_start = time.perf_counter()
    run = build_run(spec, resume, console, resume_from)
    try:
        return _train(run, console, t_start)
    finally:
        if run.lock is not None:
            run.lock.release(remove_created=True)  # removes the run directory only if it is still empty


def _train(run: Run, console: Console, t_start: float) -> dict:
    """The loop of `train`, from the built run to the final metrics."""
    spec, is_main, workdir = run.spec, run.dist.rank == 0, run.workdir
    if run.finished is not None:
        if is_main:
            console.print(f"{workdir} already trained all {run.total_steps} steps; nothing to do (raise "
                          "train.max_steps or train.epochs to continue)")
        distributed.destroy(run.dist)
        return run.finished
    if is_main:
        from centerpoint.atomic import atomic_write_text

        atomic_write_text(workdir / "spec.yaml", spec_to_yaml(spec))
    tb = TensorBoard(workdir / "tensorboard" if is_main and spec.logging.tensorboard else None)
    tb.text("spec", "```\n" + spec_to_yaml(spec) + "\n```")
    state, last_metrics = run.state, {}
    epochs = spec.train.epochs if spec.train.max_steps is None else -(-run.total_steps // run.steps_per_epoch)
    # Steps taken so far, skipped ones included (state.step counts applied updates only).
    step = run.start_epoch * run.steps_per_epoch + run.start_batch
    progress = make_progress(console, spec.logging.progress and is_main)
    meter = Throughput()
    # Skipped steps so far: steps taken minus updates applied; with fp16 loss scaling that difference also
    # holds the scaler's overflow steps, which are not failures, so the count restarts at resume there.
    skipped = torch.full((), 0.0 if state.scaler else float(step - int(state.step)), device=run.backend.device)
    first_step, skipped_before = step, float(skipped)
    diverged = Divergence(spec.train.nonfinite == "stop", run.backend.free_sync, run.backend.device)
    bad_images = 0
    first_step_s = None
    with progress, stop_requests(announce=is_main) as stop, closing(tb):
        task = progress.add_task("train", total=run.total_steps, completed=step, info="")
        for epoch in range(run.start_epoch, epochs):
            batches = epoch_batches(len(run.train_index), spec.train.batch_size, spec.train.seed, epoch,
                                    run.dist.rank, run.dist.world_size)
            start = run.start_batch if epoch == run.start_epoch else 0
            dataset = DetectionDataset(run.train_index, spec.data, spec.train.seed, train=True,
                                       on_device=run.augment_on_device)
            loader = make_loader(dataset, batches[start:], spec.resolved.workers,
                                 run.backend.pin_memory,
                                 spec.model.num_classes, spec.model.stride, spec.loss.min_overlap,
                                 pin_device=run.backend.pin_memory_device)
            t_wait = time.perf_counter()
            position = (epoch, start)  # (epoch, batches of it done) for the checkpoint
            for i, batch in enumerate(loader, start=start):
                if step >= run.total_steps:
                    break
                bad_images += int(batch.pop("bad_images"))  # unreadable images, data.on_bad_image=skip
                batch = to_step_batch(batch, run)
                wait = time.perf_counter() - t_wait
                state, metrics = run.step_fn(state, batch)
                step += 1
                skipped += 1 - metrics["finite"]
                diverged.record(metrics["finite"], step)
                meter.add(spec.train.batch_size * run.dist.world_size, wait)
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t_start
                    if run.compiled and is_main:
                        console.print(f"first step after {first_step_s:.1f} s (compiling the step included; the "
                                      f"compiled graphs are cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']})")
                if step % spec.train.log_every == 0 or step == run.total_steps:
                    diverged.check()
                    values = {k: float(v) for k, v in metrics.items()}
                    values.update(meter.read())
                    values["skipped_steps"] = float(skipped)
                    values["bad_images"] = float(bad_images)
                    tb.scalars(values, step, "train")
                    info = f"ep {epoch + 1}/{epochs} loss {values['loss']:.3f} {values['img_per_s']:.0f} img/s"
                    progress.update(task, info=info)
                    if is_main and not console.is_terminal and step % (spec.train.log_every * 5) == 0:
                        console.print(f"step {step}/{run.total_steps} {info}")  # logs without a live bar
                        console.file.flush()
                progress.update(task, completed=step)
                position = (epoch, i + 1)
                every = spec.train.checkpoint_every_steps
                saving = bool(every and step % every == 0)
                if saving:
                    diverged.check()  # on every rank, so that all stop together
                if saving and is_main:
                    save_own(workdir / "checkpoints" / "latest.safetensors", state, spec, *position, None, run.run_id,
                             run.data, run.classes)
                _stop_if_asked(stop, run, state, position, step, diverged, saved=saving)
                t_wait = time.perf_counter()
            if position[1] == len(batches):
                position = (epoch + 1, 0)
            finished = epoch + 1
            last = finished == epochs or step >= run.total_steps
            every_eval = spec.train.eval_every
            metrics_out: dict = {}
            diverged.check()
            if last or (every_eval and finished % every_eval == 0):
                t_eval = time.perf_counter()
                metrics_out, rows, curves = evaluate_run_detail(run, state)
                if is_main:
                    metrics_out.update(step=step, epoch=finished, bad_train_images=bad_images,
                                       eval_s=time.perf_counter() - t_eval,
                                       elapsed_s=time.perf_counter() - t_start,
                                       first_step_s=first_step_s)
                    last_metrics = metrics_out
                    append_metrics(workdir / "metrics.jsonl", _jsonable(metrics_out))
                    tb.scalars({k: v for k, v in metrics_out.items() if k.startswith("bbox_")}, step, "val")
                    tb.evaluation(run.val_index, rows, metrics_out, curves, step, spec)  # pictures, per-class AP
                    console.print(f"epoch {finished}: bbox_mAP {metrics_out['bbox_mAP']:.3f} "
                                  f"mAP_50 {metrics_out['bbox_mAP_50']:.3f}")
            if is_main:
                save_epoch(workdir, state, spec, finished, metrics_out, last, position, run.run_id, run.data,
                           run.classes)
            if last:
                break
            _stop_if_asked(stop, run, state, position, step, diverged, saved=True)
    distributed.destroy(run.dist)
    _check_trained(step - first_step, round(float(skipped) - skipped_before))
    if is_main and last_metrics:
        console.print(format_metrics_table(last_metrics), markup=False, highlight=False)
    return last_metrics


def _check_trained(steps: int, skipped: int) -> None:
    """A run whose every step was skipped as non-finite (train.nonfinite=skip) trained nothing: an error
    (exit 2, as for other inputs that cannot train: the spec or the data has to change), not a success."""
    if steps > 0 and skipped >= steps:
        raise CenterpointError(f"all {steps} steps of this run had a non-finite loss or gradient and were skipped "
                               "(train.nonfinite=skip): nothing was trained; lower optim.lr, set optim.grad_clip, "
                               "check the loss weights, or check the data with `centerpoint data check`")


def _stop_if_asked(stop: StopRequest, run: Run, state: TrainState, position: tuple[int, int], step: int,
                   diverged: Divergence, saved: bool) -> None:
    """At a step boundary: if any rank got SIGINT/SIGTERM, save `latest` here (rank 0, unless `saved` just
    did) and raise `Interrupted` on every rank. The ranks agree first, so all stop at the same step."""
    signum = distributed.max_over_ranks(stop.signum, run.dist)
    if not signum:
        return
    main = run.dist.rank == 0
    diverged.check()
    if main and not saved:
        save_own(run.workdir / "checkpoints" / "latest.safetensors", state, run.spec, *position, None, run.run_id,
                 run.data, run.classes)
    distributed.destroy(run.dist)
    raise Interrupted(signum, step, run.workdir, quiet=not main)


def _jsonable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, dict, type(None)))}
