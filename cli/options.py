"""What the commands share: common options, spec resolution from a file or a checkpoint plus flags, the
launch of worker processes, output directory checks. Imports no command module.

Nothing here imports torch at module level, so `centerpoint --help` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from centerpoint.errors import CenterpointError

if TYPE_CHECKING:
    from centerpoint.spec import ExperimentSpec

SpecArg = typer.Argument(None, help="Spec YAML file (default: the built-in shapes experiment).")
SetOpt = typer.Option([], "--set", "-s", help="Override a spec field: --set optim.lr=0.001 (repeatable).")
CheckpointOpt = typer.Option(..., "--checkpoint", "-c", help="A .safetensors checkpoint.")
DeviceOpt = typer.Option(None, "--device", help="auto | cpu | cuda | sdaa.")
RawWeightsOpt = typer.Option(False, "--raw-weights", help="Use the trained weights, not their moving average, of "
                             "a checkpoint that holds one (train.ema_decay); without EMA the same weights.")
DataDirOpt = typer.Option(None, "--data-dir", "--data_dir", "--data-root",
                          help="Your COCO-format dataset root (sets data.dataset=coco).")
NprocOpt = typer.Option(None, "--nproc-per-node", "--nproc_per_node",
                        help="Worker processes (devices) on this machine, started here through the elastic "
                        "launcher (1: one worker in a one-rank process group). Default: this process alone.")
NnodesOpt = typer.Option(1, "--nnodes", "--nnode", help="Machines in the job.")
NodeRankOpt = typer.Option(0, "--node-rank", "--node_rank", help="This machine's index, 0..nnodes-1.")
MasterAddrOpt = typer.Option(None, "--master-addr", "--master_addr",
                             help="Address of node 0 (needed with --nnodes > 1).")
MasterPortOpt = typer.Option(None, "--master-port", "--master_port",
                             help="Port of node 0 (default: a free one on one machine, 29500 on several).")


def flag_updates(**flags: object) -> dict[str, object]:
    """Map CLI flag values (None = not given) to dotted spec keys."""
    keys = {"workdir": "logging.workdir", "device": "runtime.device", "epochs": "train.epochs",
            "batch_size": "train.batch_size", "lr": "optim.lr",
            "max_steps": "train.max_steps", "compile": "runtime.compile", "precision": "runtime.precision",
            "workers": "data.workers", "seed": "train.seed"}
    updates = {keys[k]: (str(v) if isinstance(v, Path) else v) for k, v in flags.items() if v is not None}
    if flags.get("lr") is not None:
        updates["optim.base_batch"] = None  # --lr is the lr actually used: no linear batch scaling on top
    return updates


def data_dir_updates(data_dir: object, spec_file: Path | None, sets: list[str],
                     count_classes: bool = False) -> dict[str, object]:
    """--data-dir DIR means "my COCO-format data is at DIR": data.root=DIR and data.dataset=coco, unless the
    spec file or a --set names data.dataset itself (the built-in default does not count). `count_classes`:
    model.num_classes becomes null (the data's count) too, unless the spec file or a --set names it."""
    if data_dir is None:
        return {}
    from centerpoint.spec_io import parse_override, read_spec_dict

    spec = read_spec_dict(spec_file) if spec_file is not None else {}

    def named(section: str, key: str) -> bool:
        part = spec.get(section)
        return (isinstance(part, dict) and key in part) or any(
            parse_override(item)[0] == f"{section}.{key}" for item in sets)

    if named("data", "dataset"):
        return {"data.root": str(data_dir)}
    classes = {"model.num_classes": None} if count_classes and not named("model", "num_classes") else {}
    return {"data.root": str(data_dir), "data.dataset": "coco", **classes}


def resolve_spec(spec_file: Path | None, sets: list[str], base: ExperimentSpec | None = None,
                 **flags: object) -> ExperimentSpec:
    """The spec a command runs: `spec_file` (else `base`, e.g. a checkpoint's spec, else the built-in
    default), then the `--set` overrides in order, then the flags (`data_dir` as `data_dir_updates` says;
    the class count comes from that data unless a model is given as `base`)."""
    from centerpoint.spec_io import (
        apply_override,
        load_spec,
        parse_override,
        spec_from_dict,
        spec_to_dict,
        with_updates,
    )

    if spec_file is None and base is not None:
        data = spec_to_dict(base)
        for item in sets:
            data = apply_override(data, *parse_override(item))
        spec = spec_from_dict(data, "--set")
    else:
        spec = load_spec(spec_file, sets)
    data_dir = flags.pop("data_dir", None)
    updates = {**flag_updates(**flags), **data_dir_updates(data_dir, spec_file, sets, count_classes=base is None)}
    return with_updates(spec, updates) if updates else spec


def launched_workers(nproc_per_node: int | None, nnodes: int, node_rank: int, master_addr: str | None,
                     master_port: int | None, max_restarts: int = 0,
                     before_launch: Callable[[], None] | None = None) -> bool:
    """Check the job shape the launch flags ask for; when it needs workers started here, run this same
    command line as those workers (calling `before_launch()` first) and return True once they finished.
    False: this process is the job (alone, or already a worker of torchrun/srun/a launch)."""
    from centerpoint.runtime.launch import LaunchPlan, check_plan, launch_workers, needs_launch

    plan = LaunchPlan(nproc_per_node or 1, nnodes, node_rank, master_addr, master_port, max_restarts,
                      requested=nproc_per_node is not None)
    check_plan(plan)
    if not needs_launch(plan):
        return False
    if before_launch is not None:
        before_launch()
    launch_workers(plan, [sys.executable, "-u", "-m", "centerpoint", *sys.argv[1:]])
    return True


def check_output_dir(directory: Path, target: Path) -> None:
    """Create `directory` now (before any long work) or fail naming `target`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CenterpointError(f"cannot write {target}: a parent of it is a file, not a directory") from None
    except OSError as err:
        raise CenterpointError(f"cannot write {target}: {err.strerror or err}") from None
