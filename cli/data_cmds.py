"""`centerpoint data download`: fetch and unpack datasets (COCO 2017).

Registered on `cli.main.data_app`; the download code is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from centerpoint.errors import CenterpointError
from cli.main import data_app

DATASETS = ("coco2017",)
PARTS = ("train", "val", "annotations")


@data_app.command("download")
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
