"""The three export formats, each as the bytes of one file with the export's description embedded.

- onnx: torch.export's program translated by torch.onnx (dynamo exporter, onnxscript; opset 18 or
  later, as GridSample with bilinear sampling needs 16); the description is the model property
  `centerpoint`. Needs the optional packages onnx and onnxscript (`pip install "centerpoint[export]"`).
- torch-export: the `torch.export` program (`torch.export.load(path).module()`), description in the
  archive's extra file `centerpoint.json`.
- torchscript: `torch.jit.trace` of the same module (`torch.jit.load(path)`), description in the extra
  file `centerpoint.json`.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from centerpoint.errors import CenterpointError
from centerpoint.export.graph import DECODED, HEADS, example_images

Format = Literal["onnx", "torch-export", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torch-export", "torchscript")
NEEDS: dict[str, tuple[str, ...]] = {"onnx": ("onnx", "onnxscript"), "torch-export": (), "torchscript": ()}
MAX_BATCH = 1024  # upper bound of a dynamic batch dimension (torch.export needs one)


@dataclass(frozen=True)
class ExportOptions:
    """format; size: the square input side (pixels, a multiple of 32; None: the spec's test size); batch:
    a fixed batch, or None for a dynamic one; decode: graph ends in boxes/scores/labels (True) or the head
    maps (False)."""

    format: Format
    size: int | None
    batch: int | None
    decode: bool

    @property
    def outputs(self) -> tuple[str, ...]:
        return DECODED if self.decode else HEADS


def require_packages(fmt: str) -> None:
    """CenterpointError naming what to install when a format's optional packages are missing."""
    if fmt not in FORMATS:
        raise CenterpointError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    missing = []
    for name in NEEDS[fmt]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CenterpointError(f"--format {fmt} needs the package(s) {', '.join(missing)}, which are not installed: "
                               'pip install "centerpoint[export]"')


def export_bytes(module: nn.Module, options: ExportOptions, description: dict) -> bytes:
    """The file content of `module` exported in `options.format`, with `description` embedded as JSON."""
    require_packages(options.format)
    x = example_images(options.batch or 2, options.size)  # 2: a batch of 1 would be specialised as fixed
    text = json.dumps(description, sort_keys=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter about internals, not about the user's input
        if options.format == "torchscript":
            return _torchscript(module, x, text)
        program = _program(module, x, options.batch is None)
        if options.format == "torch-export":
            buf = io.BytesIO()
            torch.export.save(program, buf, extra_files={"centerpoint.json": text})
            return buf.getvalue()
        return _onnx(program, x, options.outputs, text)


def _program(module: nn.Module, x: torch.Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    shapes = {"images": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}} if dynamic else None
    return torch.export.export(module, (x,), dynamic_shapes=shapes)


def _onnx(program: torch.export.ExportedProgram, x: torch.Tensor, outputs: tuple[str, ...], text: str) -> bytes:
    import onnx

    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, input_names=["images"],
                                         output_names=list(outputs), verbose=False, optimize=True)
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    proto = onnx_program.model_proto
    onnx.helper.set_model_props(proto, {"centerpoint": text})
    return proto.SerializeToString()


def _torchscript(module: nn.Module, x: torch.Tensor, text: str) -> bytes:
    traced = torch.jit.trace(module, (x,), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={"centerpoint.json": text})
    return buf.getvalue()
