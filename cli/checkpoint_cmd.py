"""`centerpoint checkpoint inspect|import|extract`: a checkpoint's contents; foreign weights into a checkpoint;
one replica of a replicated run's checkpoint as an ordinary one.

torch is imported only when a command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from centerpoint.errors import CenterpointError

app = typer.Typer(no_args_is_help=True, help="Inspect and import checkpoints.")

FORMATS = ("mmdet",)


@app.command("inspect")
def checkpoint_inspect(path: Path = typer.Argument(..., help="A .safetensors checkpoint.")) -> None:
    """Print a checkpoint's spec, step, metrics and a parameter summary."""
    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.spec_io import spec_to_yaml

    ckpt = load_checkpoint(path)
    params = ckpt.group("params")
    print(f"checkpoint {path}\nstep {ckpt.step}  epoch {ckpt.epoch}  batch_in_epoch {ckpt.batch_in_epoch}")
    from centerpoint.classes import checkpoint_classes

    classes = checkpoint_classes(ckpt)
    ids = classes.ids or (None,) * len(classes.names)
    recorded = "" if ckpt.classes is not None else " (not recorded in the file: from its spec)"
    print(f"classes {len(classes.names)}{recorded}: " + ", ".join(
        n if i is None else f"{n} (id {i})" for n, i in zip(classes.names, ids, strict=True)))
    shown = {k: v for k, v in ckpt.metrics.items() if k.startswith("bbox_")}
    print("metrics " + (", ".join(f"{k} {v:.4f}" for k, v in shown.items()) if shown else "none"))
    groups: dict[str, int] = {}
    for k, v in params.items():
        top = k.split(".")[0]
        groups[top] = groups.get(top, 0) + v.numel()
    total = sum(groups.values())
    print(f"parameters {total:,} in {len(params)} tensors: " + ", ".join(f"{k} {n:,}" for k, n in groups.items()))
    ema = ckpt.group("ema")
    print(f"EMA of the weights: {len(ema)} tensors (eval and predict use them; --raw-weights: the trained ones)"
          if ema else "EMA of the weights: none")
    if (k := ckpt.spec.train.replicas) > 1:
        print(f"replicas {k} (parameters counted over all of them; `checkpoint extract --replica I` writes one)")
    print("spec:")
    sys.stdout.write(spec_to_yaml(ckpt.spec))


@app.command("import")
def checkpoint_import(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="Source format: mmdet."),
    src: str = typer.Argument(..., help="The .pth file, its URL, or the bare name of a published file "
                              "(fetched into $CENTERPOINT_CACHE/weights)."),
    dst: Path = typer.Argument(..., help="The .safetensors checkpoint to write."),
    spec: Path | None = typer.Option(None, "--spec", help="Spec the weights must fit (default: "
                                     "experiments/centernet_r18_coco.yaml, or the DCN recipe for DCN weights)."),
) -> None:
    """Convert an mmdetection CenterNet checkpoint (.pth) into a centerpoint checkpoint."""
    if fmt not in FORMATS:
        raise CenterpointError(f"checkpoint import: unknown format {fmt!r}; supported: {', '.join(FORMATS)} "
                               "(torchvision ResNets load through the spec field model.pretrained)")
    from centerpoint.weights.foreign import import_mmdet

    result = import_mmdet(src, dst, spec)
    checked = f"sha256 {result.sha256_prefix} verified" if result.sha256_prefix else "no sha256 in the name"
    print(f"imported {result.num_tensors} tensors from {result.source} ({checked})\n"
          f"model: {result.spec_path} (dcn={result.spec.model.dcn}, {result.spec.model.num_classes} classes)\n"
          f"wrote {result.destination}; evaluate it with:\n"
          f"  centerpoint eval --checkpoint {result.destination} --data-dir DIR")


@app.command("extract")
def checkpoint_extract(
    src: Path = typer.Argument(..., help="A checkpoint of a replicated run (train.replicas > 1)."),
    dst: Path = typer.Argument(..., help="The single-model .safetensors checkpoint to write."),
    replica: int = typer.Option(..., "--replica", help="Which replica, 0 .. replicas - 1."),
) -> None:
    """Write one replica of a replicated run's checkpoint as a normal single-model checkpoint: its weights,
    statistics and optimizer state, and a spec with its init seed and hyperparameters (eval, predict and
    --resume take it as any other). DST must not exist yet."""
    from centerpoint.replicas.extract import extract_replica

    if dst.resolve() == src.resolve():
        raise CenterpointError(f"checkpoint extract: {dst} is the source checkpoint; write to another file")
    if dst.exists():  # never replace a file this command did not just write
        raise CenterpointError(f"checkpoint extract: {dst} already exists; name a new file")
    spec = extract_replica(src, dst, replica)
    print(f"wrote {dst}: replica {replica} of {src} (init seed {spec.train.init_seed}, lr {spec.optim.lr:g}, "
          f"weight decay {spec.optim.weight_decay:g})")
