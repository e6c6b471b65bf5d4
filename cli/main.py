"""The `centerpoint` command line: parses flags into spec fields, calls the library, prints.

Nothing here imports torch at module level, so `centerpoint --help` stays fast.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand

from centerpoint.errors import CenterpointError
from centerpoint.interrupt import Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="CenterNet object detection on torch.func: train, evaluate, predict.")
spec_app = typer.Typer(no_args_is_help=True, help="Show or validate experiment specs.")
data_app = typer.Typer(no_args_is_help=True, help="Download and check datasets.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect and import checkpoints.")
app.add_typer(spec_app, name="spec")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="checkpoint")

_DEBUG = {"on": False}

SpecArg = typer.Argument(None, help="Spec YAML file (default: the built-in shapes experiment).")
SetOpt = typer.Option([], "--set", "-s", help="Override a spec field: --set optim.lr=0.001 (repeatable).")
NprocOpt = typer.Option(None, "--nproc-per-node", "--nproc_per_node",
                        help="Worker processes (devices) on this machine, started here through the elastic "
                        "launcher (1: one worker in a one-rank process group). Default: this process alone.")
NnodesOpt = typer.Option(1, "--nnodes", "--nnode", help="Machines in the job.")
NodeRankOpt = typer.Option(0, "--node-rank", "--node_rank", help="This machine's index, 0..nnodes-1.")
MasterAddrOpt = typer.Option(None, "--master-addr", "--master_addr",
                             help="Address of node 0 (needed with --nnodes > 1).")
MasterPortOpt = typer.Option(None, "--master-port", "--master_port",
                             help="Port of node 0 (default: a free one on one machine, 29500 on several).")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _DEBUG["on"] = debug


def _flag_updates(**flags: object) -> dict[str, object]:
    """Map CLI flag values (None = not given) to dotted spec keys."""
    keys = {"workdir": "logging.workdir", "device": "runtime.device", "epochs": "train.epochs",
            "batch_size": "train.batch_size", "lr": "optim.lr",
            "max_steps": "train.max_steps", "compile": "runtime.compile", "precision": "runtime.precision",
            "workers": "data.workers", "seed": "train.seed"}
    updates = {keys[k]: (str(v) if isinstance(v, Path) else v) for k, v in flags.items() if v is not None}
    if flags.get("lr") is not None:
        updates["optim.base_batch"] = None  # --lr is the lr actually used: no linear batch scaling on top
    return updates


def _data_dir_updates(data_dir: object, spec_file: Path | None, sets: list[str]) -> dict[str, object]:
    """--data-dir DIR means "my COCO-format data is at DIR": data.root=DIR and data.dataset=coco, unless the
    spec file or a --set names data.dataset itself (the built-in default does not count)."""
    if data_dir is None:
        return {}
    from centerpoint.spec import parse_override, read_spec_dict

    section = read_spec_dict(spec_file).get("data") if spec_file is not None else None
    explicit = (isinstance(section, dict) and "dataset" in section) or any(
        parse_override(item)[0] == "data.dataset" for item in sets)
    return {"data.root": str(data_dir)} if explicit else {"data.root": str(data_dir), "data.dataset": "coco"}


def _resolve(spec_file: Path | None, sets: list[str], **flags: object):  # noqa: ANN202
    from centerpoint.spec import load_spec, with_updates

    spec = load_spec(spec_file, sets)
    data_dir = flags.pop("data_dir", None)
    updates = {**_flag_updates(**flags), **_data_dir_updates(data_dir, spec_file, sets)}
    return with_updates(spec, updates) if updates else spec


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


class _TrainCommand(TyperCommand):
    """The train command, whose `--resume` takes an optional checkpoint file."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # noqa: ANN001 (typer's vendored click Context)
        return super().parse_args(ctx, split_resume(args))


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
    from centerpoint.spec import load_spec

    from_spec = load_spec(spec_file).train.max_steps
    if from_spec is None:
        return {}
    from centerpoint.errors import warn

    warn(f"--epochs {epochs} replaces train.max_steps={from_spec} of {spec_file} (it would stop the run first)")
    return {"train.max_steps": None}


@app.command(cls=_TrainCommand)
def train(
    spec_file: Path | None = SpecArg,
    sets: list[str] = SetOpt,
    workdir: Path | None = typer.Option(None, "--workdir", "--work-dir", "--work_dir", help="Run directory."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | sdaa."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs to train."),
    max_steps: int | None = typer.Option(None, "--max-steps", "--max_steps", help="Stop after N steps."),
    batch_size: int | None = typer.Option(None, "--batch-size", "--batch_size", help="Images per device."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate, used as given (no batch scaling)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", "--data_dir", "--data-root",
                                         help="Your COCO-format dataset root (sets data.dataset=coco)."),
    compile: str | None = typer.Option(None, "--compile", help="auto | on | off."),
    precision: str | None = typer.Option(None, "--precision", help="fp32 | bf16 | fp16."),
    workers: int | None = typer.Option(None, "--workers", help="Data loader processes per device."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of init, shuffling and augmentation."),
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
    spec = _resolve(spec_file, sets, workdir=workdir, device=device, epochs=epochs, max_steps=max_steps,
                    batch_size=batch_size, lr=lr, data_dir=data_dir, compile=compile, precision=precision,
                    workers=workers, seed=seed)
    if cleared:
        from centerpoint.spec import with_updates

        spec = with_updates(spec, cleared)
    from centerpoint.launch import LaunchPlan, check_plan, launch_workers, needs_launch

    plan = LaunchPlan(nproc_per_node or 1, nnodes, node_rank, master_addr, master_port, max_restarts,
                      requested=nproc_per_node is not None)
    check_plan(plan)
    if needs_launch(plan):
        if node_rank == 0:
            from centerpoint.rundir import check_start

            check_start(Path(spec.logging.workdir), bool(resume or resume_from))  # before workers all fail on it
        launch_workers(plan, [sys.executable, "-u", "-m", "centerpoint", *sys.argv[1:]])
        return
    from centerpoint.distributed import context
    from centerpoint.train import train as run_train

    try:
        run_train(spec, resume=resume, resume_from=resume_from)
    except CenterpointError as err:
        ctx = context()
        if ctx.distributed:
            raise CenterpointError(f"rank {ctx.rank}: {err}") from None
        raise


@app.command("eval")
def evaluate(
    spec_file: Path | None = typer.Argument(None, help="Spec YAML (default: the spec stored in the checkpoint)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A .safetensors checkpoint."),
    sets: list[str] = SetOpt,
    data_dir: Path | None = typer.Option(None, "--data-dir", "--data_dir",
                                         help="Your COCO-format dataset root (sets data.dataset=coco)."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | sdaa."),
    out: Path | None = typer.Option(None, "--out", help="Write metrics JSON here (and detections beside it)."),
    nproc_per_node: int | None = NprocOpt,
    nnodes: int = NnodesOpt,
    node_rank: int = NodeRankOpt,
    master_addr: str | None = MasterAddrOpt,
    master_port: int | None = MasterPortOpt,
) -> None:
    """Evaluate a checkpoint on the validation split with COCOeval (bbox).

    --nproc-per-node N: N workers (one per device) each predict a shard; rank 0 computes the metrics."""
    import json

    from rich.progress import Progress

    from centerpoint.atomic import atomic_write_text
    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.coco_metrics import format_metrics_table
    from centerpoint.distributed import context
    from centerpoint.evaluate import write_results
    from centerpoint.inference import evaluate_checkpoint
    from centerpoint.launch import LaunchPlan, check_plan, launch_workers, needs_launch
    from centerpoint.spec import load_spec, spec_to_dict, with_updates

    ckpt = load_checkpoint(checkpoint)
    base = load_spec(spec_file) if spec_file is not None else ckpt.spec
    updates = {**_flag_updates(device=device), **_data_dir_updates(data_dir, spec_file, sets)}
    from centerpoint.spec import apply_override, parse_override, spec_from_dict

    data = spec_to_dict(base)
    for item in sets:
        data = apply_override(data, *parse_override(item))
    spec = with_updates(spec_from_dict(data, "--set"), updates) if updates else spec_from_dict(data, "--set")
    if out is not None:
        _check_output_dir(out.parent, out)
    plan = LaunchPlan(nproc_per_node or 1, nnodes, node_rank, master_addr, master_port,
                      requested=nproc_per_node is not None)
    check_plan(plan)
    if needs_launch(plan):
        launch_workers(plan, [sys.executable, "-u", "-m", "centerpoint", *sys.argv[1:]])
        return
    main_rank = context().rank == 0
    with Progress(transient=True, disable=not main_rank) as progress:
        task = progress.add_task("evaluating", total=None)
        metrics, rows = evaluate_checkpoint(spec, ckpt, lambda n: progress.advance(task, n))
    if not main_rank:
        return
    print(format_metrics_table(metrics))
    if out is not None:
        atomic_write_text(out, json.dumps(metrics, indent=1))
        write_results(out.with_name(out.stem + ".detections.json"), rows)
        print(f"wrote {out}")


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files or directories."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A .safetensors checkpoint."),
    out: Path = typer.Option(Path("predictions"), "--out", help="Output directory."),
    score_thr: float = typer.Option(0.3, "--score-thr", "--score_thr", min=0.0, max=1.0,
                                    help="Minimum score to keep."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | sdaa."),
) -> None:
    """Detect objects in images: writes images with boxes drawn and detections.json.

    --out must not be a folder of the inputs; a file there is replaced only if predict wrote it."""
    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.inference import class_names_of, collect_images, predict_files
    from centerpoint.predict_out import check_outputs, drawing_names
    from centerpoint.spec import with_updates

    ckpt = load_checkpoint(checkpoint)
    spec = with_updates(ckpt.spec, _flag_updates(device=device)) if device else ckpt.spec
    files = collect_images(inputs)
    names = drawing_names(files)
    check_outputs(inputs, files, out, names)
    _check_output_dir(out, out)
    results = predict_files(spec, ckpt, files, out, score_thr, class_names_of(spec), names)
    print(f"{len(results)} detections in {len(files)} image(s) -> {out}")


@spec_app.command("show")
def spec_show(spec_file: Path | None = SpecArg, sets: list[str] = SetOpt) -> None:
    """Print the resolved spec as YAML."""
    from centerpoint.spec import spec_to_yaml

    sys.stdout.write(spec_to_yaml(_resolve(spec_file, sets)))


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the JSON schema of spec files."""
    import json

    from centerpoint.spec import json_schema

    print(json.dumps(json_schema(), indent=2))


@ckpt_app.command("inspect")
def checkpoint_inspect(path: Path = typer.Argument(..., help="A .safetensors checkpoint.")) -> None:
    """Print a checkpoint's spec, step, metrics and a parameter summary."""
    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.spec import spec_to_yaml

    ckpt = load_checkpoint(path)
    params = ckpt.group("params")
    print(f"checkpoint {path}\nstep {ckpt.step}  epoch {ckpt.epoch}  batch_in_epoch {ckpt.batch_in_epoch}")
    shown = {k: v for k, v in ckpt.metrics.items() if k.startswith("bbox_")}
    print("metrics " + (", ".join(f"{k} {v:.4f}" for k, v in shown.items()) if shown else "none"))
    groups: dict[str, int] = {}
    for k, v in params.items():
        top = k.split(".")[0]
        groups[top] = groups.get(top, 0) + v.numel()
    total = sum(groups.values())
    print(f"parameters {total:,} in {len(params)} tensors: " + ", ".join(f"{k} {n:,}" for k, n in groups.items()))
    print("spec:")
    sys.stdout.write(spec_to_yaml(ckpt.spec))


def _check_output_dir(directory: Path, target: Path) -> None:
    """Create `directory` now (before any long work) or fail naming `target`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CenterpointError(f"cannot write {target}: a parent of it is a file, not a directory") from None
    except OSError as err:
        raise CenterpointError(f"cannot write {target}: {err.strerror or err}") from None


def _one_line(err: BaseException | str) -> str:
    """The error's message on one line. An error raised in a DataLoader worker arrives re-raised with the
    worker's traceback inside its message; its last line holds the original message."""
    text = str(err).strip()
    if "Caught " in text and "Original Traceback" in text:
        last = text.splitlines()[-1]  # "centerpoint.errors.CenterpointError: <message>"
        text = text.split("Caught ", 1)[0] + (last.split(": ", 1)[1] if ": " in last else last)
    return " ".join(text.split())


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


def _interrupted(sig: Interrupted) -> None:
    """The one line an interrupted command prints (none on workers that rank 0 speaks for)."""
    if sig.quiet:
        return
    if sig.step is not None:
        print(f"interrupted at step {sig.step}; resume with: {resume_command(sys.argv, sig.workdir)}",
              file=sys.stderr, flush=True)
    else:
        print(f"interrupted ({sig})", file=sys.stderr, flush=True)


def main() -> None:
    """Console-script entry: CenterpointError, OSError and usage errors -> one line on stderr, exit 2
    (--debug: traceback); SIGINT / SIGTERM -> exit 130 / 143."""
    from centerpoint.errors import one_line_warnings
    from centerpoint.interrupt import raise_on_signals

    raise_on_signals()
    one_line_warnings()
    debug = _DEBUG["on"] or "--debug" in sys.argv
    try:
        code = app(standalone_mode=False)
    except Interrupted as sig:
        _interrupted(sig)
        sys.exit(sig.exit_code)
    except CenterpointError as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # disk full, permissions, a path that is a file: the user's environment
        if debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or _one_line(err)}{where}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # click's usage errors and friends (typer may vendor its own click: duck-typed)
        if isinstance(err, typer.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, typer.Abort):
            sys.exit(130)
        if type(err).__name__ == "NoArgsIsHelpError":  # a group without its subcommand: show its help
            err.show()  # type: ignore[attr-defined]
            sys.exit(getattr(err, "exit_code", 2))
        if callable(getattr(err, "format_message", None)) and hasattr(err, "exit_code"):
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"error: {_one_line(err.format_message())}{hint}", file=sys.stderr)  # type: ignore[attr-defined]
            sys.exit(2)
        raise
    # Without standalone mode typer returns an exit code instead of exiting (130 for a KeyboardInterrupt
    # raised by code that is not ours): pass it on rather than ending with 0.
    if isinstance(code, int) and code:
        if code == 130:
            print("interrupted", file=sys.stderr)
        sys.exit(code)


from cli import (  # noqa: E402,F401  (registers commands)
    checkpoint_cmds,
    data_cmds,
    doctor_cmd,  # noqa: E402,F401  (registers commands)
    export_cmd,
)

if __name__ == "__main__":
    main()
