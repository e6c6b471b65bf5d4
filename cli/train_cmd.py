"""`centerpoint train`, and how its `--resume [FILE]` is parsed and repeated in the resume hint."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from typer.core import TyperCommand

from centerpoint.errors import CenterpointError
from cli.options import (
    DataDirOpt,
    DeviceOpt,
    MasterAddrOpt,
    MasterPortOpt,
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    SetOpt,
    SpecArg,
    launched_workers,
    resolve_spec,
)


def split_resume(args: list[str]) -> list[str]:
    """`--resume FILE.safetensors` / `--resume=FILE` -> `--resume-from FILE`: `--resume` alone continues the
    run directory's newest checkpoint; followed by a checkpoint file, from that file."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg.startswith("--resume="):
            out += ["--resume-from", arg.split("=", 1)[1]]
        elif arg == "--resume" and i + 1 < len(args) and args[i + 1].endswith(".safetensors"):
            out += ["--resume-from", args[i + 1]]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


class TrainCommand(TyperCommand):
    """The train command, whose `--resume` takes an optional checkpoint file."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # noqa: ANN001 (typer's vendored click Context)
        return super().parse_args(ctx, split_resume(args))


def resume_command(argv: list[str], workdir: Path | None) -> str:
    """The command line that continues an interrupted `train`: the one given, its `--resume [FILE]` replaced
    by `--resume` (plus the run directory when a checkpoint file chose it)."""
    prog = "centerpoint" if Path(argv[0]).name == "centerpoint" else "python -m centerpoint"
    args = split_resume(argv[1:])
    kept: list[str] = []
    from_file = has_workdir = False
    i = 0
    while i < len(args):
        if args[i] == "--resume-from":
            from_file = True
            i += 2
            continue
        if args[i] != "--resume":
            kept.append(args[i])
        has_workdir |= args[i].split("=", 1)[0] in ("--workdir", "--work-dir", "--work_dir")
        i += 1
    if from_file and not has_workdir and workdir is not None:
        kept += ["--workdir", str(workdir)]
    return shlex.join([*prog.split(), *kept, "--resume"])


def _max_steps_from_spec(spec_file: Path | None, sets: list[str], epochs: int | None,
                         max_steps: int | None) -> dict[str, object]:
    """An explicit --epochs clears a train.max_steps that comes from the spec file (it would stop the run
    first, silently); one given on the same command line (--max-steps, --set) contradicts it: refused."""
    if epochs is None:
        return {}
    set_here = max_steps is not None or any(s.partition("=")[0].strip() == "train.max_steps" for s in sets)
    if set_here:
        given = f"--max-steps {max_steps}" if max_steps is not None else "--set train.max_steps"
        raise CenterpointError(f"--epochs {epochs} and {given} contradict each other (train.max_steps would "
                               "silently override --epochs); give one of them")
    from centerpoint.spec_io import load_spec

    from_spec = load_spec(spec_file).train.max_steps
    if from_spec is None:
        return {}
    from centerpoint.errors import warn

    warn(f"--epochs {epochs} replaces train.max_steps={from_spec} of {spec_file} (it would stop the run first)")
    return {"train.max_steps": None}


def sweep_updates(items: list[str], replicas: int, sets: list[str]) -> dict[str, object]:
    """`--sweep KEY=V1,V2,...` -> spec updates: train.sweep, and train.replicas = the number of values
    unless a --set gives train.replicas (the spec then checks that they agree)."""
    from centerpoint.spec import SWEEP_KEYS

    sweep: dict[str, list[float]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in SWEEP_KEYS:
            raise CenterpointError(f"--sweep {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
        try:
            sweep[key] = [float(v) for v in text.split(",")]
        except ValueError:
            raise CenterpointError(f"--sweep {item!r}: the values must be numbers separated by commas") from None
    given = any(s.partition("=")[0].strip() == "train.replicas" for s in sets)
    counts = {len(v) for v in sweep.values()}
    return {"train.sweep": sweep, **({} if given or len(counts) != 1 else {"train.replicas": counts.pop()})}


def train(
    spec_file: Path | None = SpecArg,
    sets: list[str] = SetOpt,
    workdir: Path | None = typer.Option(None, "--workdir", "--work-dir", "--work_dir", help="Run directory."),
    device: str | None = DeviceOpt,
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs to train."),
    max_steps: int | None = typer.Option(None, "--max-steps", "--max_steps", help="Stop after N steps."),
    batch_size: int | None = typer.Option(None, "--batch-size", "--batch_size", help="Images per device."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate, used as given (no batch scaling)."),
    data_dir: Path | None = DataDirOpt,
    compile: str | None = typer.Option(None, "--compile", help="auto | on | off."),
    precision: str | None = typer.Option(None, "--precision", help="fp32 | bf16 | fp16."),
    workers: int | None = typer.Option(None, "--workers", help="Data loader processes per device."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of init, shuffling and augmentation."),
    sweeps: list[str] = typer.Option([], "--sweep", help="Train one replica per value in one process: "
                                     "--sweep optim.lr=0.001,0.002,0.004 (or optim.weight_decay=...); sets "
                                     "train.replicas to the number of values unless given (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run: from its directory's newest usable "
                                "checkpoint, or `--resume FILE.safetensors` from that file (its run directory "
                                "unless --workdir says otherwise)."),
    resume_from: Path | None = typer.Option(None, "--resume-from", hidden=True),
    nproc_per_node: int | None = NprocOpt,
    nnodes: int = NnodesOpt,
    node_rank: int = NodeRankOpt,
    master_addr: str | None = MasterAddrOpt,
    master_port: int | None = MasterPortOpt,
    max_restarts: int = typer.Option(0, "--max-restarts", "--max_restarts",
                                     help="Restart all workers up to K times after a failure; they resume from "
                                     "the latest checkpoint."),
) -> None:
    """Train an experiment (default: the built-in shapes experiment, offline, on any device).

    --nproc-per-node N starts N workers (one per device) running this same command; under torchrun or srun it joins.
    """
    cleared = _max_steps_from_spec(spec_file, sets, epochs, max_steps)
    if resume_from is not None and workdir is None:
        from centerpoint.checkpoint import run_dir_of

        workdir = run_dir_of(resume_from)
    spec = resolve_spec(spec_file, sets, workdir=workdir, device=device, epochs=epochs, max_steps=max_steps,
                        batch_size=batch_size, lr=lr, data_dir=data_dir, compile=compile, precision=precision,
                        workers=workers, seed=seed)
    if cleared:
        from centerpoint.spec_io import with_updates

        spec = with_updates(spec, cleared)
    if sweeps:
        from centerpoint.spec_io import with_updates

        spec = with_updates(spec, sweep_updates(sweeps, spec.train.replicas, sets))

    def check_run_dir() -> None:  # before the workers all fail on it
        if node_rank == 0:
            from centerpoint.io.run_dir import check_start

            check_start(Path(spec.logging.workdir), bool(resume or resume_from))

    if launched_workers(nproc_per_node, nnodes, node_rank, master_addr, master_port, max_restarts, check_run_dir):
        return
    from rich.console import Console

    from centerpoint.run import build_run
    from centerpoint.runtime.distributed import context
    from centerpoint.train import train as run_train

    try:
        console = Console(soft_wrap=True)  # a long log line stays whole in a piped log (no 80-column wrap)
        run_train(build_run(spec, resume, console, resume_from), console)
    except CenterpointError as err:
        ctx = context()
        if ctx.distributed:
            raise CenterpointError(f"rank {ctx.rank}: {err}") from None
        raise
