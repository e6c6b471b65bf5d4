"""`centerpoint data download coco2017` through the real command parser, against a local HTTP server.

The file table (names, sizes, md5) is swapped for tiny zips in-process; everything else is the command
as users run it.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from centerpoint.data import download as dl
from centerpoint.data.download import RemoteFile
from cli.main import app
from tests.helpers import call_cli, serve_dir


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Iterator[tuple[str, list[str]]]:
    """A 127.0.0.1 server holding annotations/ and zips/ archives, registered in the COCO file table."""
    served = tmp_path / "mirror"
    archives = {
        "annotations": ("annotations", "annotations_trainval2017.zip",
                        {"annotations/instances_val2017.json": b'{"images": []}'}),
        "val": ("zips", "val2017.zip", {"val2017/000000000139.jpg": b"\xff\xd8 not really a jpeg"}),
    }
    for part, (subdir, name, entries) in archives.items():
        data = _zip(entries)
        (served / subdir).mkdir(parents=True, exist_ok=True)
        (served / subdir / name).write_bytes(data)
        monkeypatch.setitem(dl.COCO2017, part, RemoteFile(name, len(data), hashlib.md5(data).hexdigest(), subdir))
    monkeypatch.delenv(dl.ENV_BASE_URL, raising=False)
    with serve_dir(served) as (url, requests):
        yield url, requests


def _printed_paths(output: str, root: Path) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(str(root))]  # CliRunner mixes in the progress bars


def test_download_unzip_delete_only(tmp_path, mirror):
    url, requests = mirror
    root = tmp_path / "coco"
    args = ["data", "download", "coco2017", "--root", str(root), "--only", "annotations", "--only", "val",
            "--unzip", "--delete", "--base-url", url]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (root / "annotations" / "instances_val2017.json").read_bytes() == b'{"images": []}'
    assert (root / "val2017" / "000000000139.jpg").is_file()
    assert not list(root.glob("*.zip"))  # --delete
    assert _printed_paths(res.output, root) == [str(root / "annotations"), str(root / "val2017")]
    assert requests == ["/annotations/annotations_trainval2017.zip", "/zips/val2017.zip"]
    again = CliRunner().invoke(app, args)  # unpacked already: nothing fetched, same answer
    assert again.exit_code == 0 and _printed_paths(again.output, root) == _printed_paths(res.output, root)
    assert len(requests) == 2


def test_download_keeps_archive_without_unzip(tmp_path, mirror):
    url, _ = mirror
    res = CliRunner().invoke(app, ["data", "download", "coco2017", "--root", str(tmp_path), "--only", "val",
                                   "--base_url", url])
    assert res.exit_code == 0, res.output
    assert zipfile.ZipFile(tmp_path / "val2017.zip").namelist() == ["val2017/000000000139.jpg"]


@pytest.mark.parametrize("args, fragment", [
    (["coco2014"], "unknown dataset 'coco2014'; available: coco2017"),
    (["coco2017", "--only", "test"], "--only test: choose from train, val, annotations"),
    (["coco2017", "--delete"], "add --unzip"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, fragment):
    res = call_cli("data", "download", *args, "--root", str(tmp_path / "r"))
    assert res.returncode == 2 and fragment in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
