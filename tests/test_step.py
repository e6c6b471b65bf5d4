import pytest
import torch

from centerpoint.data.targets import make_targets
from centerpoint.loss import centernet_loss
from centerpoint.model import build_network, init, make_apply, normalize
from centerpoint.optim import transforms as optim
from centerpoint.optim.ema import init_ema
from centerpoint.optim.plan import build_optimizer
from centerpoint.runtime import memory_format as layout
from centerpoint.runtime.devices import StepMode, make_backend, step_mode
from centerpoint.spec_io import load_spec
from centerpoint.state import init_state
from centerpoint.step import make_predict_step, make_train_step


def _batch(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, 3, 2, generator=g) * (size - 24)
    boxes = torch.cat([xy, xy + 8 + torch.rand(b, 3, 2, generator=g) * 14], -1)
    labels = torch.randint(0, 5, (b, 3), generator=g)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)
    return {"images": images, **make_targets(boxes, labels, 5, (size // 4, size // 4), 4)}


def _setup(*sets):
    spec = load_spec(None, ["optim.name=sgd", "optim.grad_clip=null", "schedule.warmup_steps=0",
                            "schedule.kind=constant", "optim.lr=0.01", "runtime.channels_last=false", *sets])
    plan = build_optimizer(spec, 10, 2)
    params, buffers = init(spec.model, 0)
    step = make_train_step(make_apply(build_network(spec.model)), spec, plan.transform, StepMode.EAGER)
    return spec, plan, params, buffers, step


def test_step_equals_module_backward_and_torch_sgd():
    spec, plan, params, buffers, step = _setup("optim.weight_decay=0.0")
    batch = _batch()
    net = build_network(spec.model)
    net.load_state_dict({**params, **buffers})
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    state = init_state(params, buffers, plan.transform)
    state, metrics = step(state, batch)
    loss = centernet_loss(net(normalize(batch["images"], spec.data.mean, spec.data.std)), batch)["loss"]
    opt.zero_grad()
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9)
    opt.step()
    torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["grad_norm"], gnorm, rtol=1e-5, atol=1e-6)
    sd = net.state_dict()
    for k, v in state.params.items():
        torch.testing.assert_close(v, sd[k], rtol=1e-6, atol=1e-6)
    for k, v in state.buffers.items():
        torch.testing.assert_close(v, sd[k], rtol=1e-6, atol=1e-6)
    # A second step exercises the momentum buffer; the loss (computed before the update) still agrees.
    state, metrics = step(state, batch)
    loss = centernet_loss(net(normalize(batch["images"], spec.data.mean, spec.data.std)), batch)["loss"]
    torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert int(state.step) == 2 and float(metrics["finite"]) == 1.0


def test_step_is_pure():
    _, plan, params, buffers, step = _setup()
    state = init_state(params, buffers, plan.transform)
    snapshot = {k: v.clone() for k, v in {**state.params, **state.buffers, **state.opt_state}.items()}
    batch = _batch()
    new, _ = step(state, batch)
    for k, v in {**state.params, **state.buffers, **state.opt_state}.items():
        assert torch.equal(v, snapshot[k]), k
    assert int(state.step) == 0 and int(new.step) == 1
    again, _ = step(state, batch)
    for k in new.params:
        assert torch.equal(new.params[k], again.params[k])  # same inputs, same outputs


def test_non_finite_step_keeps_old_state():
    _, plan, params, buffers, step = _setup()
    state = init_state(params, buffers, plan.transform)
    batch = _batch()
    batch["wh"] = batch["wh"].clone()
    batch["wh"][0, 0, 0, 0] = float("nan")
    batch["reg_weight"] = torch.ones_like(batch["reg_weight"])
    new, metrics = step(state, batch)
    assert float(metrics["finite"]) == 0.0
    assert int(new.step) == 0
    for k in state.params:
        assert torch.equal(new.params[k], state.params[k])
    assert all(bool(torch.isfinite(v).all()) for v in new.params.values())


@pytest.mark.parametrize(("optimizer", "channels_last", "ema"), [("sgd", False, "null"), ("sgd", True, "null"),
                                                                 ("adamw", True, "0.9")])
def test_compiled_step_compiles_once_and_matches_eager(optimizer: str, channels_last: bool, ema: str):
    """One graph over 3 steps: no graph break anywhere in the step (optimizer and EMA included), and the
    state a step returns has the strides it was traced with, also for channels-last state with 1x1 conv
    weights (canonical strides, `memory_format.channels_last`)."""
    torch._dynamo.reset()
    spec, plan, params, buffers, step = _setup(f"runtime.channels_last={channels_last}", f"optim.name={optimizer}",
                                               f"train.ema_decay={ema}", "train.ema_warmup=2")
    net = build_network(spec.model)
    if channels_last:
        params, buffers = ({k: layout.channels_last(v) for k, v in t.items()} for t in (params, buffers))
        net = net.to(memory_format=torch.channels_last)
        assert any(v.shape[2:] == (1, 1) for v in params.values() if v.dim() == 4)
    traceable = make_train_step(make_apply(net), spec, plan.transform, StepMode.TRACED)
    counts = {"n": 0}

    def counting_backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    compiled = torch.compile(traceable, backend=counting_backend)
    state_c = state_e = init_state(params, buffers, plan.transform)
    if spec.train.ema_decay is not None:
        state_c = state_e = state_c._replace(ema=init_ema(params, buffers))
    for i in range(3):
        batch = _batch(seed=i)
        state_c, m_c = compiled(state_c, batch)
        state_e, m_e = step(state_e, batch)
    assert counts["n"] == 1, f"compiled {counts['n']} graphs over 3 steps"
    torch.testing.assert_close(m_c["loss"], m_e["loss"], rtol=1e-4, atol=1e-5)
    for k in ("backbone.conv1.weight", "bbox_head.heatmap_head.2.bias"):
        torch.testing.assert_close(state_c.params[k], state_e.params[k], rtol=1e-4, atol=1e-5)
        if state_e.ema:
            torch.testing.assert_close(state_c.ema[k], state_e.ema[k], rtol=1e-4, atol=1e-5)
            assert not torch.equal(state_e.ema[k], state_e.params[k])


def test_predict_step_shapes_and_flip():
    spec, _, params, buffers, _ = _setup("eval.topk=7")
    images = _batch()["images"]
    net = build_network(spec.model)
    boxes, scores, labels = make_predict_step(make_apply(net), spec)(params, buffers, images)
    assert boxes.shape == (2, 7, 4) and scores.shape == (2, 7) and labels.dtype == torch.int64
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    spec_f, *_ = _setup("eval.topk=7", "eval.flip_test=true")
    fb, fs, _ = make_predict_step(make_apply(net), spec_f)(params, buffers, images)
    assert fb.shape == boxes.shape and bool(torch.isfinite(fs).all())


def test_global_norm_matches_metric_definition():
    g = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}
    assert float(optim.global_norm(g)) == 5.0


def _copy(state):
    return state._replace(params={k: v.clone() for k, v in state.params.items()},
                          buffers={k: v.clone() for k, v in state.buffers.items()},
                          opt_state={k: v.clone() for k, v in state.opt_state.items()})


@pytest.mark.parametrize("sets", [
    ("optim.name=adamw", "optim.grad_clip=1.0"),
    ("optim.name=sgd", "optim.momentum=0.9"),
    ("optim.name=sgd", "optim.nesterov=true", "optim.decay_norm_and_bias=true"),
    ("optim.name=adam",),
])
def test_donating_step_equals_the_pure_step_bit_for_bit(sets):
    spec, plan, params, buffers, _ = _setup(*sets)
    apply = make_apply(build_network(spec.model))
    # The pure transforms (no in-place kernel) against the eager-donating step's in-place kernel.
    pure = make_train_step(apply, spec, plan.transform._replace(inplace=None), StepMode.EAGER)
    donating = make_train_step(apply, spec, plan.transform, StepMode.EAGER_DONATING)
    a = init_state(params, buffers, plan.transform)
    b = _copy(a)
    for i in range(3):
        batch = _batch(seed=i)
        a, ma = pure(a, batch)
        given = b
        b, mb = donating(b, batch)
        assert all(given.params[k] is b.params[k] for k in b.params)  # updated in place, not copied
        assert torch.equal(ma["loss"], mb["loss"])
    for tree in ("params", "buffers", "opt_state"):
        for k, v in getattr(a, tree).items():
            assert torch.equal(v, getattr(b, tree)[k]), (tree, k)
    assert int(a.step) == int(b.step) == 3


def test_donating_step_keeps_the_state_on_a_non_finite_step():
    spec, plan, params, buffers, _ = _setup("optim.name=adamw")
    step = make_train_step(make_apply(build_network(spec.model)), spec, plan.transform, StepMode.EAGER_DONATING)
    state = init_state(params, buffers, plan.transform)
    snapshot = _copy(state)
    batch = {**_batch(), "images": _batch()["images"].float() * float("nan")}
    new, metrics = step(state, batch)
    assert float(metrics["finite"]) == 0.0 and int(new.step) == 0
    for k, v in snapshot.params.items():
        assert torch.equal(new.params[k], v) and torch.equal(state.params[k], v)
    for k, v in snapshot.opt_state.items():
        assert torch.equal(new.opt_state[k], v)
    # Donation needs the guard that reads `finite` on the host first: only where that read is free (cpu).
    assert step_mode(make_backend("cpu"), compiled=False) is StepMode.EAGER_DONATING
    assert step_mode(make_backend("cuda"), compiled=False) is StepMode.EAGER
    assert step_mode(make_backend("cpu"), compiled=True) is StepMode.TRACED
