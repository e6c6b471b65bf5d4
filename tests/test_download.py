"""download_coco against a real HTTP server on 127.0.0.1 that serves small zips and can misbehave."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from centerpoint.data import download as dl
from centerpoint.data.download import COCO2017, RemoteFile, download_coco, file_url
from centerpoint.errors import CenterpointError
from centerpoint.io import http as fetcher
from centerpoint.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from tests.helpers import run_cli, serve

# --------------------------------------------------------------------------------------------- fixtures


@dataclass
class FakeServer:
    """What the handler serves and how it misbehaves; `requests` records (path, Range header)."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    drop_after: dict[str, list[int]] = field(default_factory=dict)  # path -> bytes sent before hanging up
    statuses: dict[str, list[int]] = field(default_factory=dict)  # path -> error codes answered first
    ignore_range: bool = False

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


def _make_handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            state.requests.append((self.path, self.headers.get("Range")))
            queued = state.statuses.get(self.path)
            if queued:
                self.send_error(queued.pop(0))
                return
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            rng = self.headers.get("Range")
            if rng and not state.ignore_range:
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            drops = state.drop_after.get(self.path)
            if drops:
                # Promise the whole payload, send part of it, hang up: a connection lost mid-transfer.
                self.wfile.write(payload[: drops.pop(0)])
                self.close_connection = True
                return
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer()
    with serve(_make_handler(state)) as state.url:
        yield state


@pytest.fixture(autouse=True)
def _no_env_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own mirror setting must not leak into the tests.
    monkeypatch.delenv(dl.ENV_BASE_URL, raising=False)


def unused_port_url() -> str:
    """A URL nothing listens on: bind a free port, then release it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps hostile names verbatim
    return buf.getvalue()


def remote_for(name: str, data: bytes, subdir: str = "zips") -> RemoteFile:
    return RemoteFile(name, len(data), hashlib.md5(data).hexdigest(), subdir)


VAL_ENTRIES = {"val2017/000001.jpg": b"jpeg-one" * 5000, "val2017/000002.jpg": b"jpeg-two" * 3000}
ANN_ENTRIES = {"annotations/instances_val2017.json": b'{"images": []}'}
VAL_ZIP = make_zip(VAL_ENTRIES)
ANN_ZIP = make_zip(ANN_ENTRIES)
TABLE = {
    "val": remote_for("val2017.zip", VAL_ZIP),
    "annotations": remote_for("annotations_trainval2017.zip", ANN_ZIP, "annotations"),
}
VAL_PATH = "/zips/val2017.zip"
ANN_PATH = "/annotations/annotations_trainval2017.zip"


def serve_coco(server: FakeServer) -> None:
    server.files[VAL_PATH] = VAL_ZIP
    server.files[ANN_PATH] = ANN_ZIP


def fetch(server: FakeServer, root: Path, **kwargs: object) -> list[Path]:
    """download_coco with the test table, quiet and with tiny backoff unless overridden."""
    options: dict = {
        "parts": ("val",),
        "base_url": server.url,
        "files": TABLE,
        "backoff_s": 0.01,
        "progress": False,
    }
    options.update(kwargs)
    return download_coco(root, **options)


def leftovers(root: Path) -> list[str]:
    """Temporary files or directories a crash-safe step must not leave behind."""
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".part", ".owner", ".tmp", ".unpacking")))


def our_part(root: Path, data: bytes) -> Path:
    """A val2017.zip.part holding `data`, as an earlier run of the downloader left it (with its marker)."""
    part = root / "val2017.zip.part"
    remote = TABLE["val"]
    fetcher._create_part(part, fetcher.Expected(remote.name, remote.size, remote.md5))
    part.write_bytes(data)  # in place: the same file the marker names
    return part


# ---------------------------------------------------------------------------------------- happy paths


def test_full_download_verify_unzip_then_skip(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    root = tmp_path / "coco"
    got = fetch(server, root, parts=("val", "annotations"), unzip=True, progress=True)

    assert got == [root / "val2017", root / "annotations"]
    for name, data in {**VAL_ENTRIES, **ANN_ENTRIES}.items():
        assert (root / name).read_bytes() == data
    assert (root / "val2017.zip").read_bytes() == VAL_ZIP
    assert (root / "val2017.zip.verified").is_file()
    assert (root / ".val2017.zip.unpacked").is_file()
    assert (root / ".annotations_trainval2017.zip.unpacked").is_file()
    assert leftovers(root) == []
    assert sorted(server.paths()) == sorted([VAL_PATH, ANN_PATH])

    server.requests.clear()
    assert fetch(server, root, parts=("val", "annotations"), unzip=True) == got
    assert server.requests == []


def test_archives_only_are_skipped_via_sidecar_and_reverified(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    archive = tmp_path / "val2017.zip"
    assert fetch(server, tmp_path) == [archive]
    assert not (tmp_path / "val2017").exists()  # no unzip asked

    server.requests.clear()
    fetch(server, tmp_path)
    assert server.requests == []

    # A touched archive no longer matches its sidecar: re-hashed from disk, still no request.
    st = archive.stat()
    dl.os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fetch(server, tmp_path)
    assert server.requests == []

    # Same size, different bytes: not what this module wrote there, so it is refused and left as it is.
    archive.write_bytes(bytes(len(VAL_ZIP)))
    with pytest.raises(CenterpointError, match="val2017.zip exists but is not the expected val2017.zip .md5 differs"):
        fetch(server, tmp_path)
    assert server.requests == [] and archive.read_bytes() == bytes(len(VAL_ZIP))


def test_env_var_base_url_and_argument_precedence(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_coco(server)
    monkeypatch.setenv(dl.ENV_BASE_URL, server.url + "/")
    assert fetch(server, tmp_path / "a", base_url=None) == [tmp_path / "a" / "val2017.zip"]

    # The argument wins over an environment variable pointing nowhere.
    monkeypatch.setenv(dl.ENV_BASE_URL, unused_port_url())
    assert fetch(server, tmp_path / "b", base_url=server.url) == [tmp_path / "b" / "val2017.zip"]
    assert server.paths() == [VAL_PATH, VAL_PATH]


def test_coco_table_and_url_layout() -> None:
    assert COCO2017["train"] == RemoteFile(
        "train2017.zip", 19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2", "zips"
    )
    assert file_url(dl.DEFAULT_BASE_URL, COCO2017["val"]) == "http://images.cocodataset.org/zips/val2017.zip"
    assert (
        file_url("http://mirror/coco/", COCO2017["annotations"])
        == "http://mirror/coco/annotations/annotations_trainval2017.zip"
    )


# ------------------------------------------------------------------------------------------- resuming


def test_interrupted_transfer_resumes_with_range(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    k = 1000
    server.drop_after[VAL_PATH] = [k]
    fetch(server, tmp_path, unzip=True)

    assert server.requests == [(VAL_PATH, None), (VAL_PATH, f"bytes={k}-")]
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP
    assert (tmp_path / "val2017" / "000001.jpg").read_bytes() == VAL_ENTRIES["val2017/000001.jpg"]
    assert leftovers(tmp_path) == []


def test_progress_resets_retry_count(server: FakeServer, tmp_path: Path) -> None:
    # Three drops with retries=1: each attempt kept new bytes, so the download still completes.
    serve_coco(server)
    server.drop_after[VAL_PATH] = [100, 100, 100]
    fetch(server, tmp_path, retries=1)
    assert [r for _, r in server.requests] == [None, "bytes=100-", "bytes=200-", "bytes=300-"]
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP


def test_part_of_an_earlier_run_is_resumed(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    k = 777
    server.drop_after[VAL_PATH] = [k]
    with pytest.raises(CenterpointError, match="it resumes from .*val2017.zip.part"):
        fetch(server, tmp_path, retries=0)
    assert (tmp_path / "val2017.zip.part").read_bytes() == VAL_ZIP[:k]
    fetch(server, tmp_path)
    assert server.requests == [(VAL_PATH, None), (VAL_PATH, f"bytes={k}-")]
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP
    assert leftovers(tmp_path) == []


def test_a_part_file_the_downloader_did_not_start_is_left_alone(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    (tmp_path / "val2017.zip.part").write_bytes(b"someone else's bytes")
    with pytest.raises(CenterpointError, match="val2017.zip.part exists but was not started by this downloader"):
        fetch(server, tmp_path)
    assert server.requests == [] and (tmp_path / "val2017.zip.part").read_bytes() == b"someone else's bytes"
    # Nor one that replaced ours since (the marker names the file it was written for: device and inode).
    our_part(tmp_path, VAL_ZIP[:100])
    (tmp_path / "other").write_bytes(b"x" * 100)  # made while ours still exists: another inode for sure
    os.replace(tmp_path / "other", tmp_path / "val2017.zip.part")
    with pytest.raises(CenterpointError, match="not started by this downloader"):
        fetch(server, tmp_path)
    assert (tmp_path / "val2017.zip.part").read_bytes() == b"x" * 100


def test_complete_part_is_verified_without_a_request(server: FakeServer, tmp_path: Path) -> None:
    our_part(tmp_path, VAL_ZIP)
    fetch(server, tmp_path)
    assert server.requests == []
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP


def test_server_ignoring_range_restarts_from_zero(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    server.ignore_range = True
    # Garbage that would corrupt the result if the 200 body were appended to it.
    our_part(tmp_path, b"x" * 500)
    fetch(server, tmp_path)
    assert server.requests == [(VAL_PATH, "bytes=500-")]
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP


def test_corrupt_part_is_discarded_and_refetched(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    our_part(tmp_path, b"x" * 500)
    fetch(server, tmp_path)
    # The resumed result fails md5, so the .part is deleted and the next attempt starts from zero.
    assert server.requests == [(VAL_PATH, "bytes=500-"), (VAL_PATH, None)]
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP


# ------------------------------------------------------------------------------------------- failures


def test_checksum_mismatch_retries_then_fails(server: FakeServer, tmp_path: Path) -> None:
    server.files[VAL_PATH] = bytes(len(VAL_ZIP))  # the right size, other bytes: a transfer may have gone wrong
    with pytest.raises(CenterpointError) as info:
        fetch(server, tmp_path, unzip=True, retries=2)

    message = str(info.value)
    assert "val2017.zip" in message and TABLE["val"].md5 in message and str(len(VAL_ZIP)) in message
    assert "\n" not in message
    assert server.paths() == [VAL_PATH] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no archive, .part, marker, sidecar or unpacked tree


@pytest.mark.parametrize("served", [VAL_ZIP[:-10], VAL_ZIP + b"tail"], ids=["shorter", "longer"])
def test_a_size_known_from_the_headers_fails_at_once(server: FakeServer, tmp_path: Path, served: bytes) -> None:
    server.files[VAL_PATH] = served  # Content-Length says it: another file, which no retry can change
    with pytest.raises(CenterpointError, match=f"not the expected file: expected {len(VAL_ZIP)} bytes, the server "
                       f"sends {len(served)} bytes"):
        fetch(server, tmp_path, retries=1, backoff_s=5.0)
    assert server.paths() == [VAL_PATH] and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_a_wrong_size_through_the_cli_is_one_error_line_at_once(server: FakeServer, tmp_path: Path) -> None:
    """The real command (the real COCO table, no monkeypatching): one request, stderr exactly one line."""
    server.files[VAL_PATH] = b"not the 815 MB archive"
    res = run_cli("data", "download", "coco2017", "--root", str(tmp_path / "coco"), "--only", "val", "--base-url",
                  server.url, env_extra={"TERM": "xterm-256color"}, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert f"expected {COCO2017['val'].size} bytes, the server sends 22 bytes" in res.stderr
    assert server.paths() == [VAL_PATH] and list((tmp_path / "coco").iterdir()) == []


def test_a_full_disk_names_the_file_being_written(server: FakeServer, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    serve_coco(server)

    class Full(io.FileIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = open
    monkeypatch.setattr(fetcher, "open", lambda path, mode="r", *a, **k: Full(path, mode) if mode == "ab"
                        else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(CenterpointError, match=f"cannot write {tmp_path / 'val2017.zip.part'}: No space left"):
        fetch(server, tmp_path)
    assert server.paths() == [VAL_PATH]  # a full disk is not retried


def test_server_errors_are_retried(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    server.statuses[VAL_PATH] = [500, 503]
    fetch(server, tmp_path)
    assert server.paths() == [VAL_PATH] * 3
    assert (tmp_path / "val2017.zip").read_bytes() == VAL_ZIP


def test_server_errors_exhaust_retries(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    server.statuses[VAL_PATH] = [500] * 10
    with pytest.raises(CenterpointError, match=r"could not download .*val2017\.zip .*3 attempts in a row"):
        fetch(server, tmp_path, retries=2)
    assert server.paths() == [VAL_PATH] * 3
    assert not (tmp_path / "val2017.zip").exists()


def test_not_found_fails_at_once(server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(CenterpointError, match=r"/zips/val2017\.zip answered HTTP 404") as info:
        fetch(server, tmp_path, retries=5)
    assert dl.ENV_BASE_URL in str(info.value)
    assert server.paths() == [VAL_PATH]


def test_connection_refused_is_a_clear_error(tmp_path: Path) -> None:
    state = FakeServer(url=unused_port_url())
    with pytest.raises(
        CenterpointError, match=r"could not download http://127\.0\.0\.1:\d+/zips/val2017\.zip"
    ):
        fetch(state, tmp_path, retries=1)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CenterpointError, match="unknown COCO part 'test'"):
        download_coco(tmp_path, parts=("test",), files=TABLE, progress=False)
    with pytest.raises(CenterpointError, match="--unzip"):
        download_coco(tmp_path, parts=("val",), files=TABLE, delete=True, progress=False)


# --------------------------------------------------------------------------------------------- unpack


@pytest.mark.parametrize("evil", ["../evil.txt", "ABSOLUTE", "ok/../../evil.txt", "..\\evil.txt"])
def test_zip_slip_is_refused_before_writing(server: FakeServer, tmp_path: Path, evil: str) -> None:
    root = tmp_path / "root"
    if evil == "ABSOLUTE":
        evil = str(tmp_path / "abs-evil.txt")
    # A harmless entry first: it must not be extracted either.
    data = make_zip({"good/ok.txt": b"fine", evil: b"pwned"})
    assert evil in zipfile.ZipFile(io.BytesIO(data)).namelist()
    server.files["/zips/evil.zip"] = data

    with pytest.raises(CenterpointError, match="refusing to unpack .*evil.zip"):
        download_coco(
            root, parts=("x",), base_url=server.url, files={"x": remote_for("evil.zip", data)},
            unzip=True, delete=True, progress=False,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing next to root
    assert sorted(p.name for p in root.iterdir()) == ["evil.zip", "evil.zip.verified"]  # archive kept


def test_delete_removes_archive_after_complete_unpack(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    got = fetch(server, tmp_path, unzip=True, delete=True)
    assert got == [tmp_path / "val2017"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".val2017.zip.unpacked", "val2017"]

    # The marker alone makes the next run a no-op, archive or not.
    server.requests.clear()
    assert fetch(server, tmp_path, unzip=True, delete=True) == got
    assert server.requests == []


def test_delete_after_earlier_unzip_run(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    fetch(server, tmp_path, unzip=True)
    assert (tmp_path / "val2017.zip").exists()
    fetch(server, tmp_path, unzip=True, delete=True)
    assert not (tmp_path / "val2017.zip").exists()
    assert not (tmp_path / "val2017.zip.verified").exists()


def test_failed_unpack_keeps_archive_and_leaves_no_partial_tree(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_coco(server)
    real_extract = zipfile.ZipFile.extract
    calls = []

    def flaky_extract(self: zipfile.ZipFile, member: object, path: object = None, pwd: object = None) -> str:
        calls.append(member)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", flaky_extract)
    with pytest.raises(CenterpointError, match="cannot unpack .*val2017.zip"):
        fetch(server, tmp_path, unzip=True, delete=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val2017.zip", "val2017.zip.verified"]

    # The next run unpacks from the kept archive without downloading again.
    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    server.requests.clear()
    assert fetch(server, tmp_path, unzip=True, delete=True) == [tmp_path / "val2017"]
    assert server.requests == []
    assert not (tmp_path / "val2017.zip").exists()


def test_existing_destination_is_not_overwritten(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "mine.txt").write_text("user data")
    with pytest.raises(CenterpointError, match="val2017 already exists"):
        fetch(server, tmp_path, unzip=True)
    assert [p.name for p in (tmp_path / "val2017").iterdir()] == ["mine.txt"]
    assert leftovers(tmp_path) == []


def test_stale_unpacking_dir_is_cleaned(server: FakeServer, tmp_path: Path) -> None:
    serve_coco(server)
    stale = tmp_path / ".val2017.zip.abc123.unpacking"
    (stale / "val2017").mkdir(parents=True)  # what a kill -9 during extraction leaves: marked as ours first
    (stale / ".centerpoint-tmp").write_bytes(b"")
    unmarked = tmp_path / ".val2017.zip.mine.unpacking"
    unmarked.mkdir()
    fetch(server, tmp_path, unzip=True)
    assert not stale.exists() and unmarked.is_dir()  # only a marked one is the downloader's
    assert (tmp_path / "val2017" / "000002.jpg").read_bytes() == VAL_ENTRIES["val2017/000002.jpg"]


# --------------------------------------------------------------------------------------------- atomic


def test_atomic_writes_replace_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_atomic_path_failure_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists()
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
