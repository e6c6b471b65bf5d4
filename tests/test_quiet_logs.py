"""Progress everywhere, noise nowhere: loader workers capped to the cores a process has (one line says so),
third-party warnings printed once and by rank 0 only, evaluation progress with images/s, and a piped
training log whose lines are whole."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from centerpoint.errors import one_line_warnings
from centerpoint.io.monitor import ImageCounter, make_progress
from centerpoint.runtime import devices
from tests.helpers import ROOT, cli_env
from tests.own_coco import write_own_coco


def test_workers_are_capped_to_this_process_share_of_the_cores() -> None:
    assert devices.cap_workers(4, cores=8, processes=2) == (4, None)
    workers, note = devices.cap_workers(8, cores=2, processes=1)
    assert workers == 2 and "data.workers=8" in note and "2 loader workers" in note
    workers, note = devices.cap_workers(4, cores=2, processes=2)
    assert workers == 1 and "shared by 2 processes" in note and "1 loader worker per" in note
    assert devices.cap_workers(3, cores=1, processes=4)[0] == 1  # at least one worker when asked for any
    assert devices.cap_workers(0, cores=1, processes=4) == (0, None)
    assert devices.local_processes({"LOCAL_WORLD_SIZE": "4"}) == 4 and devices.local_processes({}) == 1


def test_resolve_settings_caps_workers_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from centerpoint.spec_io import load_spec

    monkeypatch.setattr(devices, "usable_cores", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    _, resolved, notes = devices.resolve_settings(load_spec(None, ["runtime.device=cpu", "data.workers=6"]))
    assert resolved.workers == 2 and len(notes) == 1 and "data.workers=6" in notes[0]
    _, resolved, notes = devices.resolve_settings(load_spec(None, ["runtime.device=cpu", "data.workers=2"]))
    assert resolved.workers == 2 and notes == []


def test_library_warnings_print_once_and_on_rank_zero_only(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    show = warnings.showwarning
    try:
        one_line_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # what resets Python's own once-per-place memory
            for _ in range(3):
                warnings.warn("a loader's worry 1f3a", UserWarning, stacklevel=1)
            monkeypatch.setenv("RANK", "1")
            warnings.warn("another rank's worry 1f3a", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = show
    err = capsys.readouterr().err
    assert err.count("warning: a loader's worry 1f3a") == 1 and "another rank" not in err


def test_evaluation_counter_shows_images_per_second() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with make_progress(console, transient=True) as progress:
        counter = ImageCounter(progress, "eval")
        counter(0, 10)
        assert progress.tasks[0].fields["info"] == ""  # no rate before the first batch
        counter(4, 10)
        counter(4, 10)
        (task,) = progress.tasks
        assert (task.description, task.completed, task.total) == ("eval", 8, 10)
        assert task.fields["info"].endswith(" img/s") and float(task.fields["info"].split()[0]) > 0
        counter.remove()
        assert progress.tasks == []
    piped = make_progress(Console(file=io.StringIO()))  # not a terminal: no bar at all
    assert piped.disable


@pytest.mark.e2e
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_piped_train_log_is_quiet_and_unwrapped(tmp_path: Path, cache_dir: Path) -> None:
    """The seed's command shape on a COCO folder, piped, in a process limited to one core that asks for
    3 loader workers: one capping line, no torch DataLoader warning, no empty `dataset 0/?` bar, and no
    line cut at 80 columns."""
    root = write_own_coco(tmp_path / "data", train=8, val=4)
    sets = ["data.train_ann=annotations/instances_train.json", "data.val_ann=annotations/instances_val.json",
            "data.train_images=train", "data.val_images=val", "data.input_size=64", "data.test_size=64",
            "data.test_mode=resize", "data.workers=3", "model.pretrained=null", "model.num_classes=null",
            "model.width=32", "logging.tensorboard=false"]
    first_core = min(os.sched_getaffinity(0))
    cmd = [sys.executable, "-m", "centerpoint", "train", str(ROOT / "experiments" / "centernet_r18_coco.yaml"),
           "--batch_size", "4", "--lr", "1e-3", "--epochs", "1", "--device", "cpu", "--data-dir", str(root),
           "--workdir", str(tmp_path / "run"), *[x for s in sets for x in ("--set", s)]]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={k: v for k, v in cli_env().items() if k != "COLUMNS"},  # rich's 80-column default
                         preexec_fn=lambda: os.sched_setaffinity(0, {first_core}))
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    capping = [line for line in log.splitlines() if "data.workers=3" in line]
    assert len(capping) == 1 and capping[0].endswith("using 1 loader worker per process"), log
    assert "DataLoader will create" not in log and "0/?" not in log and "━" not in log
    banner = next(line for line in log.splitlines() if line.startswith("device cpu x 1"))
    assert "1 loader workers | augment on workers" in banner  # the whole banner on one line
    assert any(line.startswith("epoch 1: bbox_mAP") and line.endswith(" s)") for line in log.splitlines())
