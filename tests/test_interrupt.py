"""Signals and warnings outside the training loop: every command ends with 130 / 143 on SIGINT / SIGTERM,
the stop request's rules, and warnings as one `warning:` line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from centerpoint.errors import one_line_warnings
from centerpoint.runtime.interrupt import Interrupted, stop_requests

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_command_waiting_on_the_network_exits_130_or_143(sig: signal.Signals, tmp_path: Path) -> None:
    """`data download` from a server that accepts and never answers: the signal ends it with 128 + signal."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen([sys.executable, "-m", "centerpoint", "data", "download", "coco2017", "--root",
                                 str(tmp_path / "coco"), "--only", "annotations", "--base-url", url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        server.settimeout(120)
        conn, _ = server.accept()  # the command is now inside its download
        with conn:
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"interrupted ({sig.name})"
    assert "Traceback" not in err


def test_stop_request_first_asks_second_stops(capfd: pytest.CaptureFixture[str]) -> None:
    now = [100.0]
    with stop_requests(announce=True, clock=lambda: now[0]) as request:
        assert request.signum == 0
        signal.raise_signal(signal.SIGTERM)
        assert request.signum == signal.SIGTERM  # recorded, not raised: the loop stops at its boundary
        assert "SIGTERM: stopping at the next step boundary" in capfd.readouterr().err
        now[0] += 0.2
        signal.raise_signal(signal.SIGTERM)  # the same signal again at once: a launcher forwarding it
        now[0] += 1.5
        with pytest.raises(Interrupted) as stopped:
            signal.raise_signal(signal.SIGTERM)  # the same signal, later: a second request, stop at once
        assert stopped.value.exit_code == 143
        with pytest.raises(Interrupted) as stopped:
            signal.raise_signal(signal.SIGINT)  # another signal: at once
        assert stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_python_warnings_print_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    show = warnings.showwarning
    try:
        one_line_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library's\n  multi-line warning", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = show
    assert capsys.readouterr().err == "warning: a library's multi-line warning\n"


def test_the_resume_hint_is_the_command_given_with_resume() -> None:
    from cli.train_cmd import resume_command

    run = Path("runs/a")
    assert resume_command(["/venv/bin/centerpoint", "train", "x.yaml", "--epochs", "3"], run) == \
        "centerpoint train x.yaml --epochs 3 --resume"
    assert resume_command(["/src/centerpoint/__main__.py", "train", "--set", "a.b=it's", "--resume"], run) == \
        "python -m centerpoint train --set 'a.b=it'\"'\"'s' --resume"
    # A checkpoint file chose the run directory: the hint names it, and continues from its latest.
    assert resume_command(["centerpoint", "train", "--resume", "runs/a/checkpoints/epoch_0002.safetensors"], run) \
        == "centerpoint train --workdir runs/a --resume"
    assert resume_command(["centerpoint", "train", "--resume=b/epoch_0002.safetensors", "--workdir", "w"], run) \
        == "centerpoint train --workdir w --resume"
