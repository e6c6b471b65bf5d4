"""`centerpoint predict`: a checkpoint's detections on image files, drawn, listed in detections.json (COCO
results with file names and class names) and images.json (the images' ids)."""

from __future__ import annotations

from pathlib import Path

import typer

from centerpoint.errors import CenterpointError
from cli.options import CheckpointOpt, DeviceOpt, RawWeightsOpt, SetOpt, check_output_dir, resolve_spec

DEFAULT_SCORE_THR = 0.3


def score_threshold(flag: float | None, sets: list[str], spec_value: float) -> float:
    """The lowest score predict keeps: --score-thr, else `--set eval.score_threshold=X` when given here
    (not the checkpoint's evaluation threshold, often 0: every top-k box), else 0.3. Both given: an error."""
    from centerpoint.spec_io import parse_override

    in_sets = any(parse_override(s)[0] == "eval.score_threshold" for s in sets)
    if flag is not None and in_sets:
        raise CenterpointError("--score-thr and --set eval.score_threshold both give the score threshold; "
                               "give one of them")
    if flag is not None:
        return flag
    return spec_value if in_sets else DEFAULT_SCORE_THR


def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files, directories (searched recursively) or glob "
                                        "patterns ('photos/**/*.jpg', quoted)."),
    checkpoint: Path = CheckpointOpt,
    out: Path = typer.Option(Path("predictions"), "--out", help="Output directory."),
    sets: list[str] = SetOpt,
    score_thr: float | None = typer.Option(None, "--score-thr", "--score_thr", min=0.0, max=1.0,
                                           help="Minimum score to keep (default 0.3)."),
    batch_size: int | None = typer.Option(None, "--batch-size", "--batch_size", min=1,
                                          help="Images per forward (default: the spec's eval.batch_size)."),
    device: str | None = DeviceOpt,
    raw_weights: bool = RawWeightsOpt,
) -> None:
    """Detect objects in images: writes images with boxes drawn, detections.json and images.json.

    --set changes the checkpoint's spec for this prediction: eval.flip_test=true, eval.topk=N,
    data.test_size=N, data.test_mode=resize|pad, eval.score_threshold=X (as --score-thr).
    --out must not be a folder of the inputs; a file there is replaced only if predict wrote it. A checkpoint
    of a run with train.ema_decay predicts with its EMA weights unless --raw-weights."""
    from centerpoint.checkpoint import load_checkpoint
    from centerpoint.evaluation.predict import predict_files
    from centerpoint.evaluation.predict_in import collect_images
    from centerpoint.evaluation.predict_out import check_outputs, drawing_names
    from centerpoint.io.monitor import ImageCounter, make_progress

    ckpt = load_checkpoint(checkpoint)
    spec = resolve_spec(None, sets, base=ckpt.spec, device=device)
    threshold = score_threshold(score_thr, sets, spec.eval.score_threshold)
    files = collect_images(inputs)
    names = drawing_names(files)
    check_outputs(inputs, files, out, names)
    check_output_dir(out, out)
    with make_progress(transient=True) as progress:
        results = predict_files(spec, ckpt, files, out, threshold, names, batch_size,
                                ImageCounter(progress, "predicting"), raw_weights)
    print(f"{len(results)} detections in {len(files)} image(s) -> {out}")
