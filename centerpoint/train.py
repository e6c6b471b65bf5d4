"""The training loop: `train(run)` steps a built `Run` (`centerpoint.run.build_run`) from its start step to
its last, one global step at a time. After each step one cadence rule (`cadence.itstime`) says whether
to log, to evaluate and (the run's `Checkpointer` decides) to save; then SIGINT/SIGTERM are honoured.

Step s trains batch (s - 1) % steps_per_epoch of epoch (s - 1) // steps_per_epoch; evaluations and the
periodic checkpoints fall on epoch ends (every `train.eval_every` / `train.checkpoint_every` epochs) and on
the last step. A resumed run continues after the step its checkpoint recorded.
"""

from __future__ import annotations

import os
import time
from contextlib import closing

import torch
from rich.console import Console
from rich.progress import Progress, TaskID

from centerpoint.cadence import epoch_of, itstime
from centerpoint.data.train_batches import train_batches
from centerpoint.errors import CenterpointError
from centerpoint.evaluation.coco_metrics import format_metrics_table
from centerpoint.evaluation.evaluate import evaluate, evaluated_image_ids
from centerpoint.io.atomic import atomic_write_text
from centerpoint.io.monitor import ImageCounter, TensorBoard, Throughput, append_metrics, make_progress
from centerpoint.optim.ema import with_ema
from centerpoint.replicas.report import ReplicaBoards, evaluate_replicas, mean_row, per_replica, summary_table
from centerpoint.run import Run
from centerpoint.runtime import distributed
from centerpoint.runtime.interrupt import Interrupted, StopRequest, stop_requests
from centerpoint.spec_io import spec_to_yaml
from centerpoint.state import TrainState
from centerpoint.step import Divergence


def train(run: Run, console: Console) -> dict:
    """Train `run` to its last step; returns the last evaluation's metrics (rank 0; {} elsewhere).

    SIGINT/SIGTERM stop the run at the next step boundary: `latest` is saved there and `Interrupted`
    raised (see `centerpoint.runtime.interrupt`). Rank 0's lock on the run directory is released when this ends."""
    try:
        return _train(run, console)
    finally:
        if run.lock is not None:
            run.lock.release(remove_created=True)  # removes the run directory only if it is still empty


def _train(run: Run, console: Console) -> dict:
    """The loop of `train`: steps start_step + 1 .. total_steps, each followed by what is due after it."""
    spec, t, is_main, total, spe = run.spec, run.spec.train, run.dist.rank == 0, run.total_steps, run.steps_per_epoch
    if run.finished is not None:
        if is_main:
            console.print(f"{run.workdir} already trained all {total} steps; nothing to do (raise "
                          "train.max_steps or train.epochs to continue)")
        distributed.destroy(run.dist)
        return run.finished
    if is_main:
        atomic_write_text(run.workdir / "spec.yaml", spec_to_yaml(spec))
    tb = TensorBoard(run.workdir / "tensorboard" if is_main and spec.logging.tensorboard else None)
    tb.text("spec", "```\n" + spec_to_yaml(spec) + "\n```")
    state, last_metrics, step = run.state, {}, run.start_step
    # Skipped steps so far: steps taken minus updates applied; with fp16 loss scaling that difference also
    # holds the scaler's overflow steps, which are not failures, so the count restarts at resume there.
    # One count per replica in a replicated run (its state.step is (K,)).
    skipped = torch.zeros_like(state.step, dtype=torch.float32) if state.scaler else (step - state.step).float()
    skipped_before, bad_images, first_step_s = skipped.clone(), 0, None
    boards = ReplicaBoards(run.workdir, run.replicas, is_main and spec.logging.tensorboard)
    diverged = Divergence(t.nonfinite == "stop", run.backend.free_sync, run.backend.device)
    meter, progress = Throughput(), make_progress(console, spec.logging.progress and is_main)
    batches = train_batches(run.train_index, spec, run.backend, rank=run.dist.rank, world_size=run.dist.world_size,
                            steps_per_epoch=spe, start_step=run.start_step, total_steps=total)
    with progress, stop_requests(announce=is_main) as stop, closing(tb), closing(batches), closing(boards):
        task = progress.add_task("train", total=total, completed=step, info="")
        t_wait = time.perf_counter()
        for item in batches:
            wait = time.perf_counter() - t_wait
            applied = state.step  # updates applied before this step: its lr is the schedule's there
            state, metrics = run.step_fn(state, item.batch)
            step, bad_images = item.step, bad_images + item.bad_images
            skipped += 1 - metrics["finite"]
            diverged.record(metrics["finite"].min(), step)  # any replica's
            meter.add(t.batch_size * run.dist.world_size, wait)
            if first_step_s is None:
                first_step_s = time.perf_counter() - run.started
                if run.compiled and is_main:
                    console.print(f"first step after {first_step_s:.1f} s (compiling the step included; the "
                                  f"compiled graphs are cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']})")
            if itstime(step, t.log_every, total):
                diverged.check()
                rows = per_replica({**metrics, "lr": run.schedule(applied), "skipped_steps": skipped})
                boards.scalars(rows, step, "train")
                values = {**mean_row(rows), **meter.read(), "bad_images": float(bad_images)}
                _log(run, console, tb, progress, task, step, values)
            progress.update(task, completed=step)
            evaluating, saving = itstime(step, t.eval_every * spe, total), run.checkpointer.latest_due(step)
            if evaluating or saving:
                diverged.check()  # on every rank, so that all stop together
            record = {}
            if evaluating:
                record = _evaluate(run, state, step, console, tb, boards, progress, bad_images=bad_images,
                                   first_step_s=first_step_s)
                last_metrics = record or last_metrics
            if is_main:
                run.checkpointer.save(state, step, record)
            _stop_if_asked(stop, run, state, step, diverged, saved=saving)
            t_wait = time.perf_counter()
    distributed.destroy(run.dist)
    _check_trained(step - run.start_step, round(float((skipped - skipped_before).min())))  # every replica's
    if is_main and last_metrics:
        table = summary_table(last_metrics) if run.replicas else format_metrics_table(last_metrics)
        console.print(table, markup=False, highlight=False)
    return last_metrics


def _log(run: Run, console: Console, tb: TensorBoard, progress: Progress, task: TaskID, step: int,
         values: dict[str, float]) -> None:
    """Training scalars to TensorBoard and the progress bar; a plain line every 5 logs without a terminal."""
    tb.scalars(values, step, "train")
    epochs = -(-run.total_steps // run.steps_per_epoch)
    epoch = epoch_of(step, run.steps_per_epoch)
    info = f"ep {epoch}/{epochs} loss {values['loss']:.3f} {values['img_per_s']:.0f} img/s"
    progress.update(task, info=info)
    if run.dist.rank == 0 and not console.is_terminal and step % (run.spec.train.log_every * 5) == 0:
        console.print(f"step {step}/{run.total_steps} {info}")  # logs without a live bar
        console.file.flush()


def _evaluate(run: Run, state: TrainState, step: int, console: Console, tb: TensorBoard, boards: ReplicaBoards,
              progress: Progress, *, bad_images: int, first_step_s: float | None) -> dict:
    """Evaluate after `step` (an `eval` bar with images/s on `progress` while it runs); rank 0
    appends the record to metrics.jsonl, TensorBoard and the console and returns it ({} on other ranks). A
    replicated run evaluates each replica (`replicas.report`).

    With train.ema_decay the record's metrics (`bbox_*`, the ones `best` ranks by) are the EMA weights', the
    model eval and predict use; the trained weights' follow as `raw_bbox_*` (not in a replicated run)."""
    t_eval = time.perf_counter()
    workers = run.spec.resolved.workers if run.spec.resolved else None  # the run's loader decision
    if run.replicas:
        record = evaluate_replicas(run, state, step, epoch_of(step, run.steps_per_epoch), boards, console.print,
                                   {"bad_train_images": bad_images, "elapsed_s": time.perf_counter() - run.started,
                                    "first_step_s": first_step_s}, progress, workers)
        tb.scalars({k: v for k, v in record.items() if k.startswith("bbox_")}, step, "val")
        return record
    with ImageCounter(progress, "eval") as counter:
        record, rows = evaluate(run.predict_fn, *with_ema(state.params, state.buffers, state.ema), run.val_index,
                                run.spec, run.backend, run.dist, counter, pr_curves=True, workers=workers)
    raw = {}
    if state.ema:
        with ImageCounter(progress, "eval (trained weights)") as counter:
            raw = evaluate(run.predict_fn, state.params, state.buffers, run.val_index, run.spec, run.backend,
                           run.dist, counter, workers=workers)[0]
    if run.dist.rank != 0:
        return {}
    curves = record.pop("pr_curves")
    epoch = epoch_of(step, run.steps_per_epoch)
    record.update({"weights": "ema" if state.ema else "raw",
                   **{"raw_" + k: v for k, v in raw.items() if k.startswith("bbox_")}})
    record.update(step=step, epoch=epoch, bad_train_images=bad_images, eval_s=time.perf_counter() - t_eval,
                  elapsed_s=time.perf_counter() - run.started, first_step_s=first_step_s)
    append_metrics(run.workdir / "metrics.jsonl", _jsonable(record))
    tb.scalars({k: v for k, v in record.items() if k.startswith("bbox_")}, step, "val")
    tb.scalars({k[len("raw_"):]: v for k, v in record.items() if k.startswith("raw_bbox_")}, step, "val_raw")
    tb.evaluation(run.val_index, rows, record, curves, step, run.spec)  # pictures, per-class AP, PR curves
    also = f" (EMA; trained weights: mAP {raw['bbox_mAP']:.3f})" if raw else ""
    console.print(f"epoch {epoch}: bbox_mAP {record['bbox_mAP']:.3f} mAP_50 {record['bbox_mAP_50']:.3f}{also} "
                  f"({len(evaluated_image_ids(run.val_index, run.spec))} images in {record['eval_s']:.1f} s)")
    return record


def _check_trained(steps: int, skipped: int) -> None:
    """A run whose every step was skipped as non-finite (train.nonfinite=skip) trained nothing: an error
    (exit 2, as for other inputs that cannot train: the spec or the data has to change), not a success."""
    if steps > 0 and skipped >= steps:
        raise CenterpointError(f"all {steps} steps of this run had a non-finite loss or gradient and were skipped "
                               "(train.nonfinite=skip): nothing was trained; lower optim.lr, set optim.grad_clip, "
                               "check the loss weights, or check the data with `centerpoint data check`")


def _stop_if_asked(stop: StopRequest, run: Run, state: TrainState, step: int, diverged: Divergence,
                   saved: bool) -> None:
    """At a step boundary: if any rank got SIGINT/SIGTERM, save `latest` here (rank 0, unless `saved` just
    did) and raise `Interrupted` on every rank. The ranks agree first, so all stop at the same step."""
    signum = distributed.max_over_ranks(stop.signum, run.dist)
    if not signum:
        return
    diverged.check()
    if run.dist.rank == 0 and not saved:
        run.checkpointer.save_latest(state, step)
    distributed.destroy(run.dist)
    raise Interrupted(signum, step, run.workdir, quiet=run.dist.rank != 0)


def _jsonable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, dict, type(None)))}
