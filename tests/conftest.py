"""Shared fixtures: a tiny synthetic dataset in a per-session cache, small spec overrides (the helpers the
tests share live in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Small, fast settings for end-to-end runs (R18 at 64x64 on a few images).
TINY = [
    "data.shapes_train=24", "data.shapes_val=8", "data.input_size=64", "data.test_size=64", "data.workers=0",
    "train.batch_size=8", "eval.batch_size=8", "train.log_every=1", "logging.progress=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["CENTERPOINT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir: Path) -> list[str]:
    return list(TINY)
