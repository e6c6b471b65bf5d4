"""EMA of the weights (train.ema_decay): mmdetection's ExpMomentumEMA formula against a direct fp64
computation, the same bits from every step mode, untouched by skipped steps, kept by checkpoints, and
evaluated (best by the EMA's mAP; eval and predict on the EMA weights unless --raw-weights) through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from centerpoint.checkpoint import load_checkpoint, read_header, restore_state, save_checkpoint
from centerpoint.data.paths import data_root
from centerpoint.model import build_network, init, make_apply
from centerpoint.optim.ema import ema_momentum, init_ema, make_ema_update, with_ema
from centerpoint.optim.plan import build_optimizer
from centerpoint.runtime.devices import StepMode
from centerpoint.spec_io import load_spec
from centerpoint.state import flatten_state, init_state
from centerpoint.step import make_train_step
from tests.conftest import TINY
from tests.helpers import call_cli
from tests.test_step import _batch

NET = ["model.width=8", "model.neck_channels=[8,8,8]", "model.head_channels=8", "runtime.channels_last=false"]


def _momentum(k: int, decay: float, warmup: float) -> float:
    """mmdetection's ExpMomentumEMA weight of the new value in update k (mmengine copies at the first)."""
    m = 1 - decay  # mmdetection's `momentum`
    return 1.0 if k == 1 else (1 - m) * math.exp(-k / warmup) + m


def test_update_is_the_exp_momentum_formula_in_fp64() -> None:
    g = torch.Generator().manual_seed(0)
    decay, warmup = 0.9, 3.0
    ema = {"w": torch.randn(5, 3, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g,
                                                                                       dtype=torch.float64)}
    expected = {k: v.flatten().tolist() for k, v in ema.items()}  # computed in Python floats (binary64)
    pure, in_place = make_ema_update(decay, warmup, False), make_ema_update(decay, warmup, True)
    assert make_ema_update(None, warmup, False) is None  # off: no update at all
    mirror = {k: v.clone() for k, v in ema.items()}
    for k in range(1, 6):
        weights = {n: torch.randn(v.shape, generator=g, dtype=torch.float64) for n, v in ema.items()}
        w = _momentum(k, decay, warmup)
        expected = {n: [(1 - w) * e + w * x for e, x in zip(es, weights[n].flatten().tolist(), strict=True)]
                    for n, es in expected.items()}
        old, snapshot = ema, {n: v.clone() for n, v in ema.items()}
        ema = pure(old, weights, torch.tensor(k))
        assert all(torch.equal(old[n], v) for n, v in snapshot.items())  # pure: its input untouched
        mirror = in_place(mirror, weights, torch.tensor(k))
        for n, v in ema.items():
            want = torch.tensor(expected[n], dtype=torch.float64).reshape(v.shape)
            torch.testing.assert_close(v, want, rtol=1e-13, atol=1e-13)
            assert torch.equal(v, mirror[n])  # the in-place form gives the same bits
        if k == 1:
            assert all(torch.equal(ema[n], weights[n]) for n in ema)  # the first update copies
    # The warm-up: the weight of the new value falls from 1 towards 1 - decay as updates pass warmup.
    ws = [float(ema_momentum(torch.tensor(k), 0.9999, 2000.0, torch.float64)) for k in (2, 2000, 40000)]
    assert ws[0] == pytest.approx(0.9999 * math.exp(-2 / 2000) + 1e-4, rel=1e-12)
    assert ws[0] > ws[1] > ws[2] > 1e-4 and ws[2] == pytest.approx(1e-4, rel=1e-3)


def _setup(*sets: str):  # noqa: ANN202
    spec = load_spec(None, [*NET, "optim.name=adamw", "schedule.warmup_steps=0", "train.ema_decay=0.8",
                            "train.ema_warmup=2", *sets])
    plan = build_optimizer(spec, 10, 2)
    params, buffers = init(spec.model, 0)
    apply = make_apply(build_network(spec.model))
    return spec, plan, params, buffers, apply


def _fresh(plan, params, buffers):  # noqa: ANN001, ANN202
    """A step-0 state with EMA, all of its tensors its own (the donating step writes into them)."""
    state = init_state({k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in buffers.items()},
                       plan.transform)
    return state._replace(ema=init_ema(state.params, state.buffers))


def test_every_step_mode_gives_the_same_ema_and_it_follows_the_formula() -> None:
    spec, plan, params, buffers, apply = _setup()
    runs = {}
    for mode in StepMode:  # TRACED uncompiled: the pure traced form (compiled: test_step's compile test)
        step, state = make_train_step(apply, spec, plan.transform, mode), _fresh(plan, params, buffers)
        seen = [{k: v.double() for k, v in {**state.params, **state.buffers}.items() if k in state.ema}]
        for i in range(3):
            state, metrics = step(state, _batch(seed=i))
            assert float(metrics["finite"]) == 1.0
            seen.append({k: v.double() for k, v in {**state.params, **state.buffers}.items() if k in state.ema})
        runs[mode] = state
        expected = seen[0]
        for k, weights in enumerate(seen[1:], start=1):
            w = _momentum(k, 0.8, 2.0)
            expected = {n: (1 - w) * e + w * weights[n] for n, e in expected.items()}
        for n, v in state.ema.items():
            torch.testing.assert_close(v.double(), expected[n], rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(state.ema[n], state.params[n]) for n in state.params)  # an average, not a copy
    assert set(runs[StepMode.EAGER].ema) == set(params) | {k for k, v in buffers.items() if v.is_floating_point()}
    for mode, state in runs.items():
        assert all(torch.equal(v, runs[StepMode.EAGER].ema[k]) for k, v in state.ema.items()), mode


# EAGER guards as TRACED does (a tensor select); the donating mode skips by a host-side branch.
@pytest.mark.parametrize("mode", [StepMode.TRACED, StepMode.EAGER_DONATING])
def test_a_skipped_step_leaves_the_ema_untouched(mode: StepMode) -> None:
    spec, plan, params, buffers, apply = _setup()
    step = make_train_step(apply, spec, plan.transform, mode)
    state, _ = step(_fresh(plan, params, buffers), _batch(seed=0))
    before = {k: v.clone() for k, v in state.ema.items()}
    bad = {**_batch(seed=2), "images": _batch(seed=2)["images"].float() * float("nan")}
    new, metrics = step(state, bad)
    assert float(metrics["finite"]) == 0.0 and int(new.step) == 1
    assert all(torch.equal(new.ema[k], v) and torch.equal(state.ema[k], v) for k, v in before.items())
    # The next applied update is update 2 (the state's count, not the steps taken).
    after, _ = step(new, _batch(seed=3))
    w = _momentum(2, 0.8, 2.0)
    weights = {**after.params, **after.buffers}
    for k, v in after.ema.items():
        torch.testing.assert_close(v.double(), (1 - w) * before[k].double() + w * weights[k].double(),
                                   rtol=1e-6, atol=1e-7)


def test_checkpoints_keep_the_ema_and_a_run_may_switch_it(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    spec, plan, params, buffers, _ = _setup()
    state = _fresh(plan, params, buffers)
    state = state._replace(ema={k: v + 0.5 for k, v in state.ema.items()}, step=torch.tensor(4))
    assert {k for k in flatten_state(state) if k.startswith("ema.")} == {"ema." + k for k in state.ema}
    path = save_checkpoint(tmp_path / "ema.safetensors", state, spec, epoch=1)
    ckpt = load_checkpoint(path)
    back = restore_state(ckpt, _fresh(plan, params, buffers))
    assert all(torch.equal(v, state.ema[k]) for k, v in back.ema.items()) and set(back.ema) == set(state.ema)
    assert restore_state(ckpt, init_state(params, buffers, plan.transform)).ema == {}  # EMA off: dropped
    # Resuming with EMA on from a checkpoint without one: the average starts from its weights, said once.
    plain = save_checkpoint(tmp_path / "plain.safetensors", state._replace(ema={}), spec, epoch=1)
    capsys.readouterr()
    started = restore_state(load_checkpoint(plain), _fresh(plan, params, buffers))
    assert "holds no EMA of these weights" in capsys.readouterr().err
    weights = {**state.params, **state.buffers}
    assert set(started.ema) == set(state.ema) and all(torch.equal(v, weights[k]) for k, v in started.ema.items())
    assert all(started.ema[k] is not started.params[k] for k in started.params)  # copies: updated in place later
    # with_ema: the EMA's tensors where it has them, the trained integer buffers kept.
    p, b = with_ema(state.params, state.buffers, state.ema)
    assert all(p[k] is state.ema[k] for k in p)
    assert all(b[k] is (state.ema[k] if k in state.ema else state.buffers[k]) for k in b)


def _stand_in_map(params: dict[str, torch.Tensor]) -> float:
    """A number in (0, 1) that tells two sets of weights apart (the tiny run's real mAP is 0 for both)."""
    return float(torch.sigmoid(params["bbox_head.heatmap_head.2.bias"].double().mean()))


@pytest.mark.e2e
def test_training_evaluates_the_ema_and_eval_uses_it(tmp_path: Path, cache_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real CLI: metrics.jsonl rows hold the EMA weights' metrics as bbox_* and the trained
    weights' as raw_bbox_*; `best` ranks by the EMA's; eval uses the EMA weights unless --raw-weights."""
    import centerpoint.train as train_module

    real = train_module.evaluate

    def evaluate(predict, params, buffers, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        record, rows = real(predict, params, buffers, *args, **kwargs)
        return {**record, "bbox_mAP": _stand_in_map(params)}, rows  # the real evaluation, a telling mAP

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    work = tmp_path / "run"
    sets = [*TINY, *NET, "logging.tensorboard=false", "runtime.device=cpu", "train.eval_every=1", "eval.max_images=2",
            "train.ema_decay=0.5", "train.ema_warmup=1", "optim.lr=0.01", "train.batch_size=12",  # 2 steps an epoch
            "eval.flip_test=false"]
    code, out, err = call_cli("train", *[x for s in sets for x in ("--set", s)], "--max-steps", "4",
                              "--workdir", str(work))
    assert code == 0, err
    assert "(EMA; trained weights: mAP" in out
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["weights"] == "ema" for r in rows)
    for row, name in zip(rows, ("epoch_0001", "epoch_0002"), strict=True):
        ckpt = load_checkpoint(work / "checkpoints" / f"{name}.safetensors")
        assert ckpt.step == row["step"]
        assert row["bbox_mAP"] == _stand_in_map(ckpt.group("ema"))
        assert row["raw_bbox_mAP"] == _stand_in_map(ckpt.group("params")) != row["bbox_mAP"]
        assert "raw_bbox_mAP_50" in row  # the real metrics of the trained weights beside the EMA's
    best = max(rows, key=lambda r: r["bbox_mAP"])
    meta = read_header(work / "checkpoints" / "best.safetensors")
    assert int(meta["step"]) == best["step"] and json.loads(meta["metrics"])["bbox_mAP"] == best["bbox_mAP"]

    # eval: the EMA weights by default, the trained ones with --raw-weights; the same detections as a file
    # whose params are the EMA's. (Four steps barely move the heads' outputs: the file's EMA gets a heatmap
    # bias of 0, scores near 0.5 instead of the prior's 0.1, so that the two sets of weights detect apart.)
    last = work / "checkpoints" / "epoch_0002.safetensors"
    tensors = load_file(str(last))
    tensors["ema.bbox_head.heatmap_head.2.bias"] = torch.zeros_like(tensors["ema.bbox_head.heatmap_head.2.bias"])
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=read_header(last))
    swapped = {k: v for k, v in tensors.items() if not k.startswith("ema.")}
    swapped.update({("params." if "params." + k[4:] in tensors else "buffers.") + k[4:]: v
                    for k, v in tensors.items() if k.startswith("ema.")})
    save_file(swapped, str(tmp_path / "swapped.safetensors"), metadata=read_header(last))
    detections = {}
    for name, ckpt, extra in (("ema", "edited", ()), ("raw", "edited", ("--raw-weights",)), ("swapped", "swapped", ())):
        code, _, err = call_cli("eval", "-c", str(tmp_path / f"{ckpt}.safetensors"), "--out",
                                str(tmp_path / f"{name}.json"), *extra)
        assert code == 0, err
        detections[name] = json.loads((tmp_path / f"{name}.detections.json").read_text())
    assert detections["ema"] == detections["swapped"]
    assert detections["ema"] != detections["raw"]
    # predict: the EMA's scores (about 0.5) pass --score-thr 0.3, the trained weights' (about 0.1) do not.
    image = next((data_root(load_checkpoint(last).spec) / "val").glob("*.jpg"))
    found = {}
    for name, extra in (("ema", ()), ("raw", ("--raw-weights",))):
        code, _, err = call_cli("predict", "-c", str(tmp_path / "edited.safetensors"), str(image), "--out",
                                str(tmp_path / f"predict_{name}"), *extra)
        assert code == 0, err
        found[name] = json.loads((tmp_path / f"predict_{name}" / "detections.json").read_text())
    assert len(found["ema"]) > 0 and found["raw"] == []
    code, out, _ = call_cli("checkpoint", "inspect", str(last))
    assert code == 0 and f"EMA of the weights: {sum(k.startswith('ema.') for k in tensors)} tensors" in out


@pytest.mark.parametrize("value", ["train.ema_decay=1.0", "train.ema_decay=0", "train.ema_warmup=0"])
def test_bad_ema_settings_are_one_line_errors(value: str, tmp_path: Path) -> None:
    code, _, err = call_cli("train", "--set", value, "--workdir", str(tmp_path / "run"))
    assert code == 2 and err.startswith("error: ") and value.split("=")[0] in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
