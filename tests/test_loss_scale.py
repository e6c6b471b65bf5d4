"""fp16 dynamic loss scaling: the scaler's rule, the step's use of it, and its place in checkpoints."""

import numpy as np
import torch

from centerpoint.checkpoint import load_checkpoint, restore_state, save_checkpoint
from centerpoint.model import build_network, init, make_apply
from centerpoint.optim.loss_scale import init_loss_scale, update_loss_scale
from centerpoint.optim.plan import build_optimizer
from centerpoint.runtime.devices import StepMode
from centerpoint.spec_io import load_spec
from centerpoint.state import init_state
from centerpoint.step import make_train_step
from tests.test_step import _batch


def test_rule_matches_torch_grad_scaler_kernel():
    rng = np.random.default_rng(0)
    ours = init_loss_scale(1024.0)
    scale, tracker = torch.tensor(1024.0), torch.zeros((), dtype=torch.int32)
    for overflow in rng.random(300) < 0.08:
        flag = torch.tensor(bool(overflow))
        ours = update_loss_scale(ours, ~flag, flag, growth_interval=7)
        torch._amp_update_scale_(scale, tracker, flag.float(), 2.0, 0.5, 7)  # what GradScaler.update runs
        assert float(ours["scale"]) == float(scale) and int(ours["good_steps"]) == int(tracker)


def test_non_finite_loss_leaves_the_scale_alone():
    s = init_loss_scale(8.0)
    out = update_loss_scale(s, torch.tensor(False), torch.tensor(False), growth_interval=1)
    assert float(out["scale"]) == 8.0 and int(out["good_steps"]) == 0


def _setup(precision_ctx=None):
    spec = load_spec(None, ["optim.name=sgd", "optim.grad_clip=null", "schedule.warmup_steps=0",
                            "schedule.kind=constant", "optim.lr=0.01", "runtime.channels_last=false",
                            "runtime.loss_scale_growth_interval=2"])
    plan = build_optimizer(spec, 10, 2)
    params, buffers = init(spec.model, 0)
    apply = make_apply(build_network(spec.model))
    step = make_train_step(apply, spec, plan.transform, StepMode.EAGER, autocast=precision_ctx)
    return spec, plan, params, buffers, step


def test_overflow_skips_the_update_and_halves_the_scale_until_it_fits():
    _, plan, params, buffers, step = _setup()
    batch = _batch()
    plain, _ = step(init_state(params, buffers, plan.transform), batch)
    # 2**127 overflows the fp32 scaled loss; every halving is exact, so the first applied step multiplies and
    # divides by a power of two and must give exactly the unscaled step's parameters.
    state = init_state(params, buffers, plan.transform, scaler=init_loss_scale(2.0**127))
    overflows = 0
    while int(state.step) == 0:
        before = state
        state, m = step(state, batch)
        assert float(m["finite"]) == 1.0  # an overflow is not a diverging run
        if float(m["overflow"]):
            overflows += 1
            assert float(state.scaler["scale"]) == float(before.scaler["scale"]) / 2
            assert all(torch.equal(state.params[k], params[k]) for k in params)
        assert overflows < 40
    assert overflows >= 1 and float(m["overflow"]) == 0.0
    for k in params:
        assert torch.equal(state.params[k], plain.params[k]), k
    for k in buffers:
        assert torch.equal(state.buffers[k], plain.buffers[k]), k
    # growth_interval=2: two applied steps in a row double the scale.
    scale = float(state.scaler["scale"])
    state, _ = step(state, batch)
    assert float(state.scaler["scale"]) == 2 * scale and int(state.scaler["good_steps"]) == 0


def test_fp16_autocast_steps_on_cpu_stay_finite():
    _, plan, params, buffers, step = _setup(lambda: torch.autocast("cpu", dtype=torch.float16))
    state = init_state(params, buffers, plan.transform, scaler=init_loss_scale(65536.0))
    for i in range(3):
        state, m = step(state, _batch(seed=i))
        assert float(m["finite"]) == 1.0 and float(m["loss_scale"]) > 0
    assert int(state.step) >= 1
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in state.params.values())


def test_scaler_is_checkpointed_and_optional_at_resume(tmp_path):
    spec, plan, params, buffers, step = _setup()
    state = init_state(params, buffers, plan.transform, scaler=init_loss_scale(2.0**127))
    state, _ = step(state, _batch())
    path = save_checkpoint(tmp_path / "a.safetensors", state, spec, epoch=0)
    ckpt = load_checkpoint(path)
    back = restore_state(ckpt, init_state(params, buffers, plan.transform, scaler=init_loss_scale(65536.0)))
    assert float(back.scaler["scale"]) == 2.0**126 and int(back.scaler["good_steps"]) == 0
    # fp16 checkpoint resumed without loss scaling, and an fp32 checkpoint resumed with it.
    assert restore_state(ckpt, init_state(params, buffers, plan.transform)).scaler == {}
    fp32 = save_checkpoint(tmp_path / "b.safetensors", init_state(params, buffers, plan.transform), spec, epoch=0)
    fresh = restore_state(load_checkpoint(fp32), init_state(params, buffers, plan.transform, init_loss_scale(4.0)))
    assert float(fresh.scaler["scale"]) == 4.0
