"""`centerpoint data download|check`: fetch and unpack COCO 2017; validate a dataset and print a summary.

The download and checking code (and PIL, numpy) is imported only when a command runs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from centerpoint.errors import CenterpointError
from cli.options import SetOpt, SpecArg, resolve_spec

app = typer.Typer(no_args_is_help=True, help="Download and check datasets.")

DATASETS = ("coco2017",)
PARTS = ("train", "val", "annotations")
SPLITS = {"train": ("train",), "val": ("val",), "both": ("train", "val")}


@app.command("download")
def data_download(
    dataset: str = typer.Argument(..., help="Dataset: coco2017."),
    root: Path = typer.Option(Path("data/coco"), "--root", help="Where archives and unpacked folders go."),
    unzip: bool = typer.Option(False, "--unzip", help="Unpack each archive (train2017/, val2017/, annotations/)."),
    delete: bool = typer.Option(False, "--delete", help="Delete each archive once unpacked (needs --unzip)."),
    only: list[str] = typer.Option([], "--only", help="train | val | annotations (repeatable; default: all)."),
    base_url: str | None = typer.Option(None, "--base-url", "--base_url",
                                        help="Mirror to download from (default: $CENTERPOINT_COCO_URL, else "
                                        "images.cocodataset.org)."),
) -> None:
    """Download COCO 2017 (verified by size and md5; interrupted downloads resume)."""
    if dataset not in DATASETS:
        raise CenterpointError(f"data download: unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        raise CenterpointError(f"--only {unknown[0]}: choose from {', '.join(PARTS)}")
    from centerpoint.data.download import download_coco

    paths = download_coco(root, parts=tuple(only) or PARTS, base_url=base_url, unzip=unzip, delete=delete)
    for path in paths:
        print(path)
    if unzip and not only:
        print(f"train with: centerpoint train experiments/centernet_r18_coco.yaml --data-dir {root}")


@app.command("check")
def data_check(
    spec_file: Path | None = SpecArg,
    sets: list[str] = SetOpt,
    data_dir: Path | None = typer.Option(None, "--data-dir", "--data_dir", "--data-root",
                                         help="A COCO-format dataset root to check (read only)."),
    split: str = typer.Option("both", "--split", help="train | val | both."),
    decode: bool = typer.Option(False, "--decode", help="Decode every image fully (slower; also finds "
                                "truncated files that a header check passes)."),
) -> None:
    """Check a dataset: annotation json, image files, boxes, classes. Exit 2 on a blocking problem."""
    if split not in SPLITS:
        raise CenterpointError(f"--split {split}: choose from {', '.join(SPLITS)}")
    spec = resolve_spec(spec_file, sets, data_dir=data_dir)  # --data-dir: a COCO-format dataset
    from rich.console import Console

    from centerpoint.data.check import blocking_problems, check_split
    from centerpoint.data.paths import existing_data_root, shapes_root
    from centerpoint.io.monitor import make_progress

    root = existing_data_root(spec)  # read only: a synthetic set is checked if there, never generated
    if root is None:
        print(f"the synthetic dataset (data.dataset=shapes) is not generated yet at {shapes_root(spec)}: nothing "
              "to check (`centerpoint train` generates it; its files are correct by construction)")
        return
    reports = []
    with make_progress(transient=True) as progress:
        for name in SPLITS[split]:
            task = progress.add_task(f"checking {name}", total=None, info="")
            reports.append(check_split(spec, root, name, decode, progress=lambda n, t=task: progress.advance(t, n)))
    console = Console(highlight=False)
    console.print(f"dataset {root}", markup=False, soft_wrap=True)
    train = next((r for r in reports if r.split == "train"), None)
    if spec.model.num_classes is None and train is not None:
        console.print(f"classes: {len(train.class_boxes)}, the categories of {train.ann_file.name} "
                      "(model.num_classes null)", markup=False, soft_wrap=True)
    console.print(_summary_table(reports))
    console.print(_class_table(reports))
    for r in reports:
        if r.sizes is not None and len(r.sizes.image_wh):
            console.print(_sizes_table(r))
    _print_suggestion(console, reports, spec)
    for r in reports:
        for w in r.warnings:
            console.print(f"warning: {w}", markup=False, soft_wrap=True)
    problems = blocking_problems(reports)
    if problems:
        more = f" (+{len(problems) - 1} more above)" if len(problems) > 1 else ""
        for p in problems:
            console.print(f"blocking: {p}", markup=False, soft_wrap=True)
        raise CenterpointError(f"{root}: {problems[0]}{more}")
    console.print("no blocking problems")


def _summary_table(reports: list) -> object:
    """What was found, one row per finding and one column per split (narrow: fits an 80-column log)."""
    from rich.table import Table

    table = Table(title="images and boxes")
    table.add_column("")
    for r in reports:
        table.add_column(r.split, justify="right")
    rows = (("images", lambda r: r.images), ("missing", lambda r: len(r.missing)),
            ("undecodable", lambda r: len(r.undecodable)), ("size != json", lambda r: len(r.size_mismatch)),
            ("boxes", lambda r: r.boxes), ("degenerate boxes", lambda r: r.degenerate_boxes),
            ("clipped boxes", lambda r: r.clipped_boxes), ("boxes < min size", lambda r: r.small_boxes),
            ("crowd boxes", lambda r: r.crowd), ("images without boxes", lambda r: r.images_without_boxes))
    for name, get in rows:
        table.add_row(name, *(str(get(r)) for r in reports))
    return table


def _sizes_table(report: object) -> object:
    """Percentiles of image and box sizes (pixels) and objects per image of one split."""
    from rich.table import Table

    from centerpoint.data.size_stats import PERCENTILES, percentile_rows

    table = Table(title=f"{report.split}: sizes in pixels, percentiles")
    table.add_column("")
    for q in PERCENTILES:
        table.add_column({0: "min", 100: "max"}.get(q, f"p{q}"), justify="right")
    for name, values in percentile_rows(report.sizes):
        table.add_row(name, *(f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.1f}" for v in values))
    return table


def _print_suggestion(console: object, reports: list, spec: object) -> None:
    """The input_size / test_size the train split's sizes suggest, and why."""
    from centerpoint.data.size_stats import suggest

    train = next((r for r in reports if r.split == "train" and r.sizes is not None), None)
    tip = suggest(train.sizes) if train is not None else None
    if tip is None:
        return
    now = f"now {spec.data.input_size} / {spec.data.test_size}"
    say = partial(console.print, markup=False, soft_wrap=True)  # a long line stays whole in a piped log
    say(f"suggested: --set data.input_size={tip.input_size} --set data.test_size={tip.test_size} ({now})")
    for reason in tip.reasons:
        say(f"  {reason}")
    if spec.data.test_mode == "pad":
        say("  (data.test_mode=pad tests at each image's own size: test_size is then unused)")


def _class_table(reports: list) -> object:
    from rich.table import Table

    table = Table(title="usable boxes / images per class")
    table.add_column("class")
    for r in reports:
        table.add_column(f"{r.split} boxes", justify="right")
        table.add_column(f"{r.split} images", justify="right")
    names = list(dict.fromkeys(n for r in reports for n in r.class_boxes))
    for n in names:
        table.add_row(n, *(str(v) for r in reports for v in (r.class_boxes.get(n, 0), r.class_images.get(n, 0))))
    return table
