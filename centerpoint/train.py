"""The training loop: build the run from its spec, step, log, evaluate, checkpoint, resume."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from centerpoint import distributed
from centerpoint.build import build_optimizer, data_root, load_split
from centerpoint.checkpoint import (
    latest_checkpoint,
    remove_partial_writes,
    restore_state,
    resume_position,
    save_checkpoint,
)
from centerpoint.coco_metrics import format_metrics_table
from centerpoint.data.coco import CocoIndex
from centerpoint.data.device_augment import augment_batch
from centerpoint.data.loader import DetectionDataset, epoch_batches, make_loader, steps_per_epoch
from centerpoint.devices import Backend, resolve_settings
from centerpoint.errors import CenterpointError
from centerpoint.evaluate import compute_metrics, predict_split
from centerpoint.layout import channels_last as to_channels_last
from centerpoint.model import build_network, init, make_apply
from centerpoint.monitor import TensorBoard, Throughput, append_metrics, make_progress
from centerpoint.spec import ExperimentSpec, spec_to_yaml
from centerpoint.step import TrainState, init_state, make_predict_step, make_train_step


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


def check_workdir(path: Path) -> Path:
    """Create the run directory and make sure it is writable (before any long work starts)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CenterpointError(f"run directory {path} is not writable: {err.strerror or err}") from None
    return path


def to_device(state: TrainState, backend: Backend, channels_last: bool) -> TrainState:
    """Move a train state to the backend's device (conv weights channels-last if asked)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(backend.device)
        return to_channels_last(t) if channels_last else t

    return TrainState({k: move(v) for k, v in state.params.items()},
                      {k: move(v) for k, v in state.buffers.items()},
                      {k: move(v) for k, v in state.opt_state.items()}, state.step.to(backend.device),
                      {k: move(v) for k, v in state.scaler.items()})


def build_run(spec: ExperimentSpec, resume: bool, console: Console) -> Run:
    """Everything up to the first step: device, data, model, optimizer, (resumed) state, compiled step."""
    dist = distributed.context()
    resume = resume or dist.restart_count > 0  # a restarted worker continues from the latest checkpoint
    backend, resolved, notes = resolve_settings(spec, dist.local_rank)
    spec = spec.model_copy(update={"resolved": resolved})  # recorded with the run: spec.yaml, checkpoints, TB
    precision = resolved.precision
    if spec.runtime.threads:
        torch.set_num_threads(spec.runtime.threads)
    workdir = check_workdir(Path(spec.logging.workdir)) if dist.rank == 0 else Path(spec.logging.workdir)
    distributed.init_process_group(dist, backend)
    root = _prepare_data(spec, console, dist)
    train_index, val_index = load_split(spec, root, True), load_split(spec, root, False)
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
    loss_scale = spec.runtime.loss_scale if precision == "fp16" else None
    state = to_device(init_state(params, buffers, plan.transform, loss_scale), backend, spec.runtime.channels_last)
    if dist.rank == 0:
        remove_partial_writes(workdir)
    start_epoch = start_batch = 0
    finished = None
    if resume:
        ckpt = latest_checkpoint(workdir)
        if ckpt is not None:
            done = resume_position(ckpt, spec, spe, plan.total_steps)
            if done == plan.total_steps and ckpt.metrics.get("step") == done:
                finished = ckpt.metrics
            state = restore_state(ckpt, state)
            start_epoch, start_batch = ckpt.epoch, ckpt.batch_in_epoch
            if dist.rank == 0:
                console.print(f"resuming from {ckpt.path} (step {ckpt.step}, epoch {ckpt.epoch})")
        elif dist.rank == 0:
            console.print(f"--resume: no checkpoint in {workdir / 'checkpoints'}; starting fresh")
    start_epoch, start_batch, finished = distributed.broadcast_object((start_epoch, start_batch, finished), dist)
    state = distributed.broadcast_state(state, dist)
    distributed.check_identical({"params": state.params, "buffers": state.buffers, "opt": state.opt_state,
                                 "step": {"step": state.step}, "scaler": state.scaler}, dist)
    compiled, on_device = resolved.compile == "on", resolved.augment_on == "device"
    apply = make_apply(net, traced=compiled)
    step_fn = make_train_step(apply, spec, plan.transform, plan.schedule,
                              autocast=lambda: backend.autocast(precision),
                              reduce=distributed.make_reduce(dist), max_grad_norm=plan.max_grad_norm,
                              guard_by_sync=backend.free_sync and not compiled, compiled=compiled,
                              donate=backend.free_sync and not compiled,
                              growth_interval=spec.runtime.loss_scale_growth_interval)
    predict_fn = make_predict_step(apply, spec, autocast=lambda: backend.autocast(precision))
    if compiled:
        # Inductor's compiled-graph caches (on by default) live under /tmp unless told otherwise: keep
        # them beside the datasets so a later run of the same shapes skips most of the compile.
        from centerpoint.data.synthetic import default_cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))
        step_fn = torch.compile(step_fn)
        predict_fn = torch.compile(predict_fn, dynamic=spec.data.test_mode == "pad")
    if dist.rank == 0:
        for note in notes:
            console.print(f"note: {note}")
        gb = spec.train.batch_size * world
        scaled = f" (scaled from {spec.optim.lr:g} for base batch {spec.optim.base_batch})" \
            if spec.optim.base_batch and plan.lr != spec.optim.lr else ""
        console.print(f"device {backend.device} x {world} | global batch {gb} | lr {plan.lr:g}{scaled} | "
                      f"{len(train_index)} train / {len(val_index)} val images | {spe} steps/epoch | "
                      f"compile {'on' if compiled else 'off'} | {precision} | "
                      f"{resolved.workers} loader workers | augment on "
                      f"{'device' if on_device else 'workers'}")
        dropped = train_index.dropped_boxes + val_index.dropped_boxes
        if dropped or train_index.dropped_images:
            console.print(f"dropped {dropped} boxes of zero, negative or below data.min_box_size size and "
                          f"{train_index.dropped_images} train images left without boxes "
                          "(`centerpoint data check` lists them)")
    return Run(spec, backend, workdir, train_index, val_index, state, step_fn, predict_fn, spe, plan.total_steps,
               start_epoch, start_batch, dist, finished, compiled, on_device)


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
    rows, bad = predict_split(run.predict_fn, state.params, state.buffers, run.val_index, run.spec, run.backend,
                              run.dist.rank, run.dist.world_size)
    parts = distributed.gather_objects((rows, bad), run.dist)
    if run.dist.rank != 0:
        return {}
    metrics = compute_metrics(run.val_index, np.concatenate([r for r, _ in parts]), run.spec)
    metrics["bad_images"] = sum(b for _, b in parts)
    return metrics


def train(spec: ExperimentSpec, resume: bool = False, console: Console | None = None) -> dict:
    """Train `spec` to the end; returns the last evaluation's metrics (rank 0; {} elsewhere)."""
    console = console or Console()
    t_start = time.perf_counter()
    run = build_run(spec, resume, console)
    spec = run.spec  # with the resolved auto settings
    is_main = run.dist.rank == 0
    workdir = run.workdir
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
    bad_images = 0
    first_step_s = None
    with progress:
        task = progress.add_task("train", total=run.total_steps, completed=step, info="")
        for epoch in range(run.start_epoch, epochs):
            batches = epoch_batches(len(run.train_index), spec.train.batch_size, spec.train.seed, epoch,
                                    run.dist.rank, run.dist.world_size)
            start = run.start_batch if epoch == run.start_epoch else 0
            dataset = DetectionDataset(run.train_index, spec.data, spec.train.seed, train=True,
                                       on_device=run.augment_on_device)
            loader = make_loader(dataset, batches[start:], spec.resolved.workers,
                                 run.backend.pin_memory,
                                 spec.model.num_classes, spec.model.stride, spec.loss.min_overlap)
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
                meter.add(spec.train.batch_size * run.dist.world_size, wait)
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t_start
                    if run.compiled and is_main:
                        console.print(f"first step after {first_step_s:.1f} s (compiling the step included; the "
                                      f"compiled graphs are cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']})")
                if step % spec.train.log_every == 0 or step == run.total_steps:
                    values = {k: float(v) for k, v in metrics.items()}
                    values.update(meter.read())
                    values["skipped_steps"] = float(skipped)
                    values["bad_images"] = float(bad_images)
                    if spec.train.nonfinite == "stop" and values["skipped_steps"] > 0:
                        raise CenterpointError(f"non-finite loss or gradient before step {step}; stopped "
                                               "(train.nonfinite=stop). Lower optim.lr or enable grad_clip.")
                    tb.scalars(values, step, "train")
                    info = f"ep {epoch + 1}/{epochs} loss {values['loss']:.3f} {values['img_per_s']:.0f} img/s"
                    progress.update(task, info=info)
                    if is_main and not console.is_terminal and step % (spec.train.log_every * 5) == 0:
                        console.print(f"step {step}/{run.total_steps} {info}")  # logs without a live bar
                        console.file.flush()
                progress.update(task, completed=step)
                every = spec.train.checkpoint_every_steps
                if is_main and every and step % every == 0:
                    save_checkpoint(workdir / "checkpoints" / "latest.safetensors", state, spec, epoch, i + 1)
                position = (epoch, i + 1)
                t_wait = time.perf_counter()
            if position[1] == len(batches):
                position = (epoch + 1, 0)
            finished = epoch + 1
            last = finished == epochs or step >= run.total_steps
            every_eval = spec.train.eval_every
            metrics_out: dict = {}
            if last or (every_eval and finished % every_eval == 0):
                t_eval = time.perf_counter()
                metrics_out = evaluate_run(run, state)
                if is_main:
                    metrics_out.update(step=step, epoch=finished, bad_train_images=bad_images,
                                       eval_s=time.perf_counter() - t_eval,
                                       elapsed_s=time.perf_counter() - t_start,
                                       first_step_s=first_step_s)
                    last_metrics = metrics_out
                    append_metrics(workdir / "metrics.jsonl", _jsonable(metrics_out))
                    tb.scalars({k: v for k, v in metrics_out.items() if k.startswith("bbox_")}, step, "val")
                    console.print(f"epoch {finished}: bbox_mAP {metrics_out['bbox_mAP']:.3f} "
                                  f"mAP_50 {metrics_out['bbox_mAP_50']:.3f}")
            if is_main:
                _save_epoch(workdir, state, spec, finished, metrics_out, last, position)
            if last:
                break
    tb.close()
    if is_main and last_metrics:
        console.print(format_metrics_table(last_metrics), markup=False, highlight=False)
    distributed.destroy(run.dist)
    return last_metrics


def _jsonable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, dict, type(None)))}


def _save_epoch(workdir: Path, state: TrainState, spec: ExperimentSpec, epoch: int, metrics: dict,
                last: bool, position: tuple[int, int] | None = None) -> None:
    """latest (always), epoch_N every checkpoint_every epochs (keeping keep_last), best by bbox_mAP.

    `position`: (epochs completed, batches of the next one done) stored for resuming; (epoch, 0) unless
    the run stopped inside an epoch (train.max_steps)."""
    ckpt_dir = workdir / "checkpoints"
    at_epoch, at_batch = position or (epoch, 0)
    save_checkpoint(ckpt_dir / "latest.safetensors", state, spec, at_epoch, at_batch, metrics)
    every = spec.train.checkpoint_every
    if (every and epoch % every == 0) or last:
        save_checkpoint(ckpt_dir / f"epoch_{epoch:04d}.safetensors", state, spec, at_epoch, at_batch, metrics)
        periodic = sorted(ckpt_dir.glob("epoch_*.safetensors"))
        for old in periodic[: -spec.train.keep_last]:
            old.unlink(missing_ok=True)
    if "bbox_mAP" in metrics:
        best_file = ckpt_dir / "best.json"
        import json

        best = json.loads(best_file.read_text()).get("bbox_mAP", -1.0) if best_file.exists() else -1.0
        if metrics["bbox_mAP"] > best:
            save_checkpoint(ckpt_dir / "best.safetensors", state, spec, at_epoch, at_batch, metrics)
            from centerpoint.atomic import atomic_write_text

            atomic_write_text(best_file, json.dumps({"bbox_mAP": metrics["bbox_mAP"], "epoch": epoch}))
