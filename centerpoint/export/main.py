"""`export_checkpoint`: a checkpoint in, one exported graph file out (what `centerpoint export` runs)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from centerpoint.errors import CenterpointError
from centerpoint.export.files import check_target, write_export
from centerpoint.export.formats import ExportOptions, export_bytes, require_packages
from centerpoint.export.prepost import letterbox_size


def check_options(options: ExportOptions) -> None:
    """CenterpointError for a format, size or batch the export cannot make."""
    require_packages(options.format)
    if options.size is not None and (options.size < 32 or options.size > 4096 or options.size % 32):
        raise CenterpointError(f"--size {options.size}: must be a multiple of 32 between 32 and 4096 (the network "
                               "halves its input five times)")
    if options.batch is not None and not 1 <= options.batch <= 1024:
        raise CenterpointError(f"--batch {options.batch}: must be 1..1024 or 'dynamic'")


def export_checkpoint(checkpoint: Path, out: Path, options: ExportOptions) -> dict:
    """Export the checkpoint's network to `out` as `options` say (size None: the spec's); returns the
    description embedded in the file (also written into its mark). Checks everything it can before the slow part."""
    from centerpoint.checkpoint import load_checkpoint, require_single_model
    from centerpoint.classes import classes_of
    from centerpoint.export.graph import exported_detector

    check_options(options)
    check_target(out)
    ckpt = load_checkpoint(checkpoint)
    require_single_model(ckpt, "export")
    spec = ckpt.spec
    if options.size is None:  # the spec's test size; the crop size for specs that test at full resolution
        options = replace(options, size=letterbox_size(spec.data) or spec.data.input_size)
    batch = options.batch if options.batch is not None else "batch"
    cells, classes = options.size // spec.model.stride, spec.model.num_classes
    k = min(spec.eval.topk, classes * cells * cells)
    shapes = ({"boxes": [batch, k, 4], "scores": [batch, k], "labels": [batch, k]} if options.decode else
              {"heatmap": [batch, classes, cells, cells], "wh": [batch, 2, cells, cells],
               "offset": [batch, 2, cells, cells]})
    description = {
        "format": options.format, "size": options.size, "batch": batch, "decode": options.decode,
        "input": {"images": [batch, 3, options.size, options.size], "dtype": "uint8",
                  "pixels": "RGB 0..255, letterboxed by centerpoint.export.prepost.preprocess(image, size)"},
        "outputs": shapes, "stride": spec.model.stride, "flip_test": spec.eval.flip_test,
        "class_names": classes_of(ckpt), "checkpoint": checkpoint.name, "step": ckpt.step,
    }
    data = export_bytes(exported_detector(ckpt, options.decode), options, description)
    write_export(out, data, description)
    return description
