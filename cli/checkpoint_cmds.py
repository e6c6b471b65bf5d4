"""`centerpoint checkpoint import`: foreign weights into a centerpoint checkpoint.

Registered on `cli.main.ckpt_app`; torch is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from centerpoint.errors import CenterpointError
from cli.main import ckpt_app

FORMATS = ("mmdet",)


@ckpt_app.command("import")
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
    from centerpoint.imports import import_mmdet

    result = import_mmdet(src, dst, spec)
    checked = f"sha256 {result.sha256_prefix} verified" if result.sha256_prefix else "no sha256 in the name"
    print(f"imported {result.num_tensors} tensors from {result.source} ({checked})\n"
          f"model: {result.spec_path} (dcn={result.spec.model.dcn}, {result.spec.model.num_classes} classes)\n"
          f"wrote {result.destination}; evaluate it with:\n"
          f"  centerpoint eval --checkpoint {result.destination} --data-dir DIR")
