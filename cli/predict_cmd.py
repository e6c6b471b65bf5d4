"""`centerpoint predict`: a checkpoint's detections on image files, drawn and listed in detections.json."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.options import CheckpointOpt, DeviceOpt, RawWeightsOpt, check_output_dir, flag_updates


def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files or directories."),
    checkpoint: Path = CheckpointOpt,
    out: Path = typer.Option(Path("predictions"), "--out", help="Output directory."),
    score_thr: float = typer.Option(0.3, "--score-thr", "--score_thr", min=0.0, max=1.0,
                                    help="Minimum score to keep."),
    device: str | None = DeviceOpt,
    raw_weights: bool = RawWeightsOpt,
) -> None:
    """Detect objects in images: writes images with boxes drawn and detections.json.

    --out must not be a folder of the inputs; a file there is replaced only if predict wrote it. A checkpoint
    of a run with train.ema_decay predicts with its EMA weights unless --raw-weights."""
    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.classes import classes_of
    from centerpoint.evaluation.predict import collect_images, predict_files
    from centerpoint.evaluation.predict_out import check_outputs, drawing_names
    from centerpoint.spec_io import with_updates

    ckpt = load_checkpoint(checkpoint)
    spec = with_updates(ckpt.spec, flag_updates(device=device)) if device else ckpt.spec
    files = collect_images(inputs)
    names = drawing_names(files)
    check_outputs(inputs, files, out, names)
    check_output_dir(out, out)
    results = predict_files(spec, ckpt, files, out, score_thr, classes_of(ckpt), names, raw_weights)
    print(f"{len(results)} detections in {len(files)} image(s) -> {out}")
