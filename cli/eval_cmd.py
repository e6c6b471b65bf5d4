"""`centerpoint eval`: a checkpoint's COCO metrics on the validation split (one process or launched workers)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.options import (
    CheckpointOpt,
    DataDirOpt,
    DeviceOpt,
    MasterAddrOpt,
    MasterPortOpt,
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    RawWeightsOpt,
    SetOpt,
    check_output_dir,
    launched_workers,
    resolve_spec,
)


def evaluate(
    spec_file: Path | None = typer.Argument(None, help="Spec YAML (default: the spec stored in the checkpoint)."),
    checkpoint: Path = CheckpointOpt,
    sets: list[str] = SetOpt,
    data_dir: Path | None = DataDirOpt,
    device: str | None = DeviceOpt,
    out: Path | None = typer.Option(None, "--out", help="Write metrics JSON here (and detections beside it)."),
    raw_weights: bool = RawWeightsOpt,
    nproc_per_node: int | None = NprocOpt,
    nnodes: int = NnodesOpt,
    node_rank: int = NodeRankOpt,
    master_addr: str | None = MasterAddrOpt,
    master_port: int | None = MasterPortOpt,
) -> None:
    """Evaluate a checkpoint on the validation split with COCOeval (bbox).

    --nproc-per-node N: N workers (one per device) each predict a shard; rank 0 computes the metrics. A
    checkpoint of a run with train.ema_decay is evaluated with its EMA weights unless --raw-weights."""
    import json

    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.evaluation.coco_metrics import format_metrics_table
    from centerpoint.evaluation.evaluate import write_results
    from centerpoint.evaluation.predict import evaluate_checkpoint
    from centerpoint.io.atomic import atomic_write_text
    from centerpoint.io.monitor import ImageCounter, make_progress
    from centerpoint.runtime.distributed import context

    ckpt = load_checkpoint(checkpoint)
    spec = resolve_spec(spec_file, sets, base=ckpt.spec, device=device, data_dir=data_dir)
    if out is not None:
        check_output_dir(out.parent, out)
    if launched_workers(nproc_per_node, nnodes, node_rank, master_addr, master_port):
        return
    main_rank = context().rank == 0
    with make_progress(enabled=main_rank, transient=True) as progress:
        metrics, rows = evaluate_checkpoint(spec, ckpt, ImageCounter(progress, "evaluating"), raw_weights)
    if not main_rank:
        return
    print(format_metrics_table(metrics))
    if out is not None:
        atomic_write_text(out, json.dumps(metrics, indent=1))
        write_results(out.with_name(out.stem + ".detections.json"), rows)
        print(f"wrote {out}")
