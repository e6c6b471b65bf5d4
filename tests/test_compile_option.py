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

from centerpoint.spec_io import load_spec


def test_compiled_run_uses_a_persistent_cache_and_reports_the_first_step(
        tmp_path: Path, cache_dir: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import centerpoint.model as model
    from centerpoint.run import build_run
    from centerpoint.train import train

    compiled: list[dict] = []  # the keyword arguments of each torch.compile call
    traced = {"grad": 0, "functional_call": 0}  # calls of the torch.func entry points a traced step goes through

    def fake_compile(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        compiled.append(kwargs)
        return fn

    def counting(name: str, real):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            traced[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.func, "grad", counting("grad", torch.func.grad))
    monkeypatch.setattr(model, "functional_call", counting("functional_call", model.functional_call))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    spec = load_spec(None, [*tiny_overrides, "runtime.compile=on", "train.max_steps=2", "train.eval_every=0",
                            "runtime.device=cpu", "data.test_mode=pad", f"logging.workdir={tmp_path / 'run'}"])
    out = io.StringIO()
    console = Console(file=out, width=200)
    train(build_run(spec, False, console), console)
    # The train step, then the predict step, with the device's backend; padded test images vary in size, so
    # the predict step is compiled for dynamic shapes.
    assert compiled == [{"backend": "inductor"}, {"backend": "inductor", "dynamic": True}]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir / "inductor")
    assert "first step after" in out.getvalue() and str(cache_dir / "inductor") in out.getvalue()
    # The compiled step is built for tracing: gradients through torch.func.grad (built once), the network
    # applied through functional_call (each train and predict call).
    assert "compile inductor" in out.getvalue()
    assert traced["grad"] == 1 and traced["functional_call"] >= 2, traced
