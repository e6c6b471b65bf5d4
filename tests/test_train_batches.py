"""The loop's global-step bookkeeping: `train_batches` starts at any step with what an uninterrupted run
draws there, across epochs; the cadence rule; the `Checkpointer`'s schedule and recorded positions."""

from __future__ import annotations

from pathlib import Path

import torch

from centerpoint.cadence import epoch_of, itstime
from centerpoint.checkpoint import Checkpointer, load_checkpoint
from centerpoint.data.loader import epoch_batches
from centerpoint.data.train_batches import StepBatches, train_batches
from centerpoint.spec_io import load_spec
from centerpoint.state import TrainState
from tests.conftest import TINY


def test_step_batches_continue_the_epoch_order_from_any_step() -> None:
    for rank in (0, 1):
        whole = [b for e in range(3) for b in epoch_batches(20, 3, 7, e, rank, 2)]  # 3 steps per epoch
        assert len(whole) == 9
        for first in range(9):
            sampler = StepBatches(20, 3, 7, rank, 2, steps_per_epoch=3, first=first, last=8)
            assert list(sampler) == whole[first:8] and len(sampler) == 8 - first


def test_train_batches_from_a_later_step_equal_the_uninterrupted_ones(cache_dir: Path) -> None:
    from centerpoint.data.paths import data_root, load_split
    from centerpoint.runtime.devices import resolve_settings

    spec = load_spec(None, [*TINY, "runtime.device=cpu", "data.photometric=true"])
    backend, resolved, _ = resolve_settings(spec, 0)
    spec = spec.model_copy(update={"resolved": resolved})
    index = load_split(spec, data_root(spec), True)  # 24 images, batch 8: 3 steps per epoch

    def run(start: int) -> list:
        return list(train_batches(index, spec, backend, rank=0, world_size=1, steps_per_epoch=3, start_step=start,
                                  total_steps=5))

    whole, resumed = run(0), run(2)
    assert [(b.step, b.epoch) for b in whole] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]
    assert [(b.step, b.epoch) for b in resumed] == [(3, 0), (4, 1), (5, 1)]
    for a, b in zip(whole[2:], resumed, strict=True):
        assert set(a.batch) == {"images", "heatmap", "wh", "offset", "reg_weight"} and a.bad_images == 0
        assert all(torch.equal(a.batch[k], b.batch[k]) for k in a.batch)
    assert not torch.equal(whole[0].batch["images"], whole[3].batch["images"])


def test_cadence() -> None:
    assert [s for s in range(1, 11) if itstime(s, 4, 10)] == [4, 8, 10]  # and always the last step
    assert [s for s in range(1, 11) if itstime(s, 0, 10)] == [10]
    assert [epoch_of(s, 3) for s in (1, 3, 4, 7)] == [1, 1, 2, 3]


def _state(step: int) -> TrainState:
    return TrainState({"w": torch.full((4,), float(step))}, {}, {"m": torch.zeros(4)}, torch.tensor(step))


def test_checkpointer_saves_on_its_schedule_with_the_position_of_the_step(tmp_path: Path) -> None:
    spec = load_spec(None, ["train.checkpoint_every=2", "train.checkpoint_every_steps=4", "train.keep_last=5"])
    ckpt = Checkpointer(tmp_path, spec, "run", {}, steps_per_epoch=3, total_steps=8)  # the last epoch is cut
    written = {}
    for step in range(1, 9):
        before = {p.name: p.stat().st_ino for p in tmp_path.iterdir()}
        latest = ckpt.save(_state(step), step, {"bbox_mAP": step / 10} if step % 3 == 0 or step == 8 else {})
        assert latest == ckpt.latest_due(step)
        written[step] = sorted(p.name for p in tmp_path.iterdir() if before.get(p.name) != p.stat().st_ino)
    assert written == {1: [], 2: [], 3: ["best.safetensors", "latest.safetensors"], 4: ["latest.safetensors"],
                       5: [], 6: ["best.safetensors", "epoch_0002.safetensors", "latest.safetensors"], 7: [],
                       8: ["best.safetensors", "epoch_0003.safetensors", "latest.safetensors"]}
    last = load_checkpoint(tmp_path / "latest.safetensors")
    assert (last.step, last.epoch, last.batch_in_epoch, last.metrics) == (8, 2, 2, {"bbox_mAP": 0.8})
    assert (load_checkpoint(tmp_path / "epoch_0002.safetensors").epoch, ) == (2, )
    ckpt.save_latest(_state(7), 7)
    assert (load_checkpoint(tmp_path / "latest.safetensors").step, ) == (7, )
