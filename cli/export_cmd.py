"""`centerpoint export`: a checkpoint as an ONNX, torch.export or TorchScript graph file.

Registered by `cli.main`; torch is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from centerpoint.errors import CenterpointError


def parse_batch(text: str) -> int | None:
    """--batch N (a fixed batch) or 'dynamic' (None)."""
    if text == "dynamic":
        return None
    if text.isdigit():
        return int(text)
    raise CenterpointError(f"--batch {text}: give a number of images or 'dynamic'")


def export(
    checkpoint: Path = typer.Argument(..., help="A .safetensors checkpoint."),
    out: Path = typer.Argument(..., help="The file to write (replaced only if an earlier export wrote it)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx | torch-export | torchscript."),
    size: int | None = typer.Option(None, "--size", help="Square input side in pixels, a multiple of 32 "
                                    "(default: the spec's test size, or its crop size for full-resolution tests)."),
    batch: str = typer.Option("dynamic", "--batch", help="Images per call: a number, or 'dynamic'."),
    decode: bool = typer.Option(True, "--with-decode/--no-decode", help="End in boxes, scores, labels (3x3 peak "
                                "test and top-k inside the graph) or in the heatmap, wh and offset maps."),
) -> None:
    """Export a checkpoint's network, input normalisation included, as one graph file."""
    from centerpoint.export.formats import ExportOptions
    from centerpoint.export.main import export_checkpoint

    options = ExportOptions(format=fmt, size=size, batch=parse_batch(batch), decode=decode)  # type: ignore[arg-type]
    info = export_checkpoint(checkpoint, out, options)
    outputs = ", ".join(f"{k} ({', '.join(map(str, v))})" for k, v in info["outputs"].items())
    print(f"wrote {out} ({fmt}): images ({info['batch']}, 3, {info['size']}, {info['size']}) uint8 RGB -> {outputs}")
