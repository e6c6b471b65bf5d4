"""A run records what its `auto` settings resolved to; training from its spec.yaml again uses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from centerpoint.runtime import devices
from centerpoint.spec import ResolvedSpec
from centerpoint.spec_io import load_spec, spec_from_json, with_updates
from tests.helpers import run_cli

RECORD = "resolved={device: cpu, precision: fp32, compile: on, workers: 2, augment_on: device}"


@pytest.fixture(autouse=True)
def many_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about records, not this machine's cores (`test_loader_workers` caps workers)."""
    monkeypatch.setattr(devices, "usable_cores", lambda: 16)


def test_recorded_settings_fill_in_auto_and_explicit_ones_win() -> None:
    spec = load_spec(None, [RECORD])
    backend, resolved, notes = devices.resolve_settings(spec)
    assert backend.name == "cpu" and notes == []
    assert resolved == ResolvedSpec(device="cpu", precision="fp32", compile="on", workers=2, augment_on="device")
    explicit = with_updates(spec, {"runtime.compile": "off", "data.workers": 0, "data.augment_on": "workers"})
    _, resolved, notes = devices.resolve_settings(explicit)
    assert (resolved.compile, resolved.workers, resolved.augment_on, notes) == ("off", 0, "workers", [])


def test_no_record_resolves_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_bf16_supported", lambda name: True)
    backend, resolved, notes = devices.resolve_settings(load_spec(None, ["runtime.device=cpu"]))
    assert resolved == ResolvedSpec(device="cpu", precision="bf16", compile="off", workers=0, augment_on="workers")
    assert notes == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without cuda")
def test_a_record_this_machine_cannot_honour_is_said_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_bf16_supported", lambda name: False)
    spec = load_spec(None, ["resolved={device: cuda, precision: bf16, compile: off, workers: 4, augment_on: device}"])
    backend, resolved, notes = devices.resolve_settings(spec)
    assert backend.name == "cpu"
    assert resolved == ResolvedSpec(device="cpu", precision="fp32", compile="off", workers=4, augment_on="device")
    assert len(notes) == 2
    assert "device=cuda" in notes[0] and "precision=bf16" in notes[1] and "no native bf16" in notes[1]


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without cuda")
def test_train_records_resolved_settings_and_a_rerun_uses_them(tmp_path: Path, tiny_overrides: list[str]) -> None:
    sets = [x for o in [*tiny_overrides, "eval.max_images=2", "logging.tensorboard=false"] for x in ("--set", o)]
    first = tmp_path / "first"
    res = run_cli("train", *sets, "--max-steps", "1", "--workdir", str(first))
    assert res.returncode == 0, res.stderr
    written = yaml.safe_load((first / "spec.yaml").read_text())
    assert written["runtime"]["precision"] == "auto" and written["data"]["augment_on"] == "auto"  # as asked
    record = dict(written["resolved"])
    assert record["device"] == "cpu" and record["compile"] == "off" and record["augment_on"] == "workers"
    assert record["precision"] in ("fp32", "bf16") and record["workers"] == 0  # (TINY sets data.workers=0)
    with safe_open(str(first / "checkpoints" / "latest.safetensors"), framework="pt") as f:
        assert spec_from_json(f.metadata()["spec"]).resolved == ResolvedSpec(**record)
    # The same file as if it came from a GPU machine: augmented on the device, which this cpu can do too.
    written["resolved"].update(device="cuda", augment_on="device")
    written["data"]["workers"] = None
    written["logging"]["workdir"] = str(tmp_path / "second")
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(written))
    res = run_cli("train", str(tmp_path / "gpu.yaml"), "--max-steps", "1")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())  # (rich wraps long lines)
    assert "records device=cuda" in out and "augment on device" in out and f"| {record['precision']} |" in out
    again = yaml.safe_load((tmp_path / "second" / "spec.yaml").read_text())["resolved"]
    assert again == {**record, "augment_on": "device"}
