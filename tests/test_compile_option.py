"""runtime.compile=on in the training loop: the step goes through torch.compile with a persistent cache
directory, and the first step's time (compile included) is reported. torch.compile itself is replaced by
a recording stand-in here (compiling the whole step with inductor takes minutes on a small cpu)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from centerpoint.spec import load_spec


def test_compiled_run_uses_a_persistent_cache_and_reports_the_first_step(
        tmp_path: Path, cache_dir: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from centerpoint.run import build_run
    from centerpoint.train import train

    compiled: list = []

    def fake_compile(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        compiled.append(kwargs["backend"])
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    spec = load_spec(None, [*tiny_overrides, "runtime.compile=on", "train.max_steps=2", "train.eval_every=0",
                            "runtime.device=cpu", f"logging.workdir={tmp_path / 'run'}"])
    out = io.StringIO()
    console = Console(file=out, width=200)
    train(build_run(spec, False, console), console)
    assert compiled == ["inductor", "inductor"]  # the train step and the predict step, the device's backend
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir / "inductor")
    assert "first step after" in out.getvalue() and str(cache_dir / "inductor") in out.getvalue()
    # The compiled step is built for tracing: torch.func.grad, the tensor-select guard, no donation.
    assert "compile inductor" in out.getvalue()
