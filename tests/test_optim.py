"""Functional optimizers and schedules vs torch.optim, purity, torch.compile and safetensors."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from centerpoint.optim import schedules as sch
from centerpoint.optim import transforms as optim
from centerpoint.optim.schedules import Schedule
from centerpoint.state import Tree

TorchOptFactory = Callable[[list[dict]], torch.optim.Optimizer]

STEPS = 10
TOL = 1e-6


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> Tree:
    """A small model-like tree: conv/linear kernels, biases, norm scales, a non-contiguous matrix."""
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone.conv1.weight": torch.randn(8, 4, 3, 3, generator=g, dtype=dtype),
        "backbone.bn1.weight": 1.0 + 0.1 * torch.randn(8, generator=g, dtype=dtype),
        "backbone.bn1.bias": torch.randn(8, generator=g, dtype=dtype),
        "head.fc.weight": torch.randn(5, 7, generator=g, dtype=dtype),
        "head.fc.bias": torch.randn(5, generator=g, dtype=dtype),
        # Transposed view: buffers must still come out contiguous (safetensors needs that).
        "head.proj.weight": torch.randn(6, 3, generator=g, dtype=dtype).t(),
    }


def _grad_sequence(params: Tree, steps: int = STEPS, seed: int = 1, scale: float = 1.0) -> list[Tree]:
    g = torch.Generator().manual_seed(seed)

    def draw(p: Tensor) -> Tensor:
        return scale * torch.randn(p.shape, generator=g, dtype=p.dtype)

    return [{k: draw(p) for k, p in params.items()} for _ in range(steps)]


def _run_functional(opt: optim.Transform, params: Tree, grads_seq: list[Tree]) -> list[Tree]:
    state = opt.init(params)
    history = []
    for grads in grads_seq:
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        history.append(params)
    return history


def _run_torch(
    make_opt: TorchOptFactory,
    params: Tree,
    grads_seq: list[Tree],
    decay_mask: optim.DecayMask | None = None,
    max_grad_norm: float | None = None,
    make_sched: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
) -> list[Tree]:
    """Run a torch optimizer; with ``decay_mask``, masked-out params go in a weight_decay=0 group."""
    tparams = {k: torch.nn.Parameter(p.detach().clone()) for k, p in params.items()}
    if decay_mask is None:
        groups = [{"params": list(tparams.values())}]
    else:
        decayed = [tparams[k] for k, p in params.items() if decay_mask(k, p)]
        plain = [tparams[k] for k, p in params.items() if not decay_mask(k, p)]
        groups = [{"params": decayed}, {"params": plain, "weight_decay": 0.0}]
    opt = make_opt(groups)
    sched = make_sched(opt) if make_sched is not None else None
    history = []
    for grads in grads_seq:
        for k, p in tparams.items():
            p.grad = grads[k].clone()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(tparams.values()), max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        history.append({k: p.detach().clone() for k, p in tparams.items()})
    return history


def _max_diff(a: list[Tree], b: list[Tree]) -> float:
    return max((x[k] - y[k]).abs().max().item() for x, y in zip(a, b, strict=True) for k in x)


def _assert_matches(ours: list[Tree], ref: list[Tree]) -> None:
    """Every step's params agree within 1e-6 absolute (fp32: plus 1e-6 relative).

    The relative slack is for fp32 only: torch's own fp32 AdamW rounds ``p * (1 - lr * wd)`` (with the
    factor cast to fp32) as a separate step and drifts ~1.2e-6 from its fp64 trajectory on |p| ~ 2.5
    within 10 steps, while ours stays ~4e-7 from it (see test_adamw_fp32_is_close_to_fp64_reference).
    """
    for step, (x, y) in enumerate(zip(ours, ref, strict=True)):
        for k in x:
            rtol = 1e-6 if x[k].dtype == torch.float32 else 0.0
            assert torch.allclose(x[k], y[k], rtol=rtol, atol=TOL), (
                step,
                k,
                (x[k] - y[k]).abs().max().item(),
            )


def _all(name: str, tensor: Tensor) -> bool:
    return True


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch(dtype: torch.dtype, nesterov: bool) -> None:
    params = _params(dtype)
    grads = _grad_sequence(params)
    ours = _run_functional(
        optim.sgd(0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-2, decay_mask=_all), params, grads
    )
    ref = _run_torch(
        lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-2),
        params,
        grads,
    )
    _assert_matches(ours, ref)
    # The tolerance is tight enough to tell the variants apart (the test can fail).
    other = _run_functional(
        optim.sgd(0.05, momentum=0.9, nesterov=not nesterov, weight_decay=1e-2, decay_mask=_all),
        params,
        grads,
    )
    assert _max_diff(other, ref) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_without_momentum_matches_torch(dtype: torch.dtype) -> None:
    params = _params(dtype)
    grads = _grad_sequence(params)
    ours = _run_functional(optim.sgd(0.05, momentum=0.0, weight_decay=1e-2, decay_mask=_all), params, grads)
    ref = _run_torch(lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.0, weight_decay=1e-2), params, grads)
    _assert_matches(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_matches_torch(dtype: torch.dtype) -> None:
    params = _params(dtype)
    grads = _grad_sequence(params)
    ours = _run_functional(optim.adamw(1e-2, weight_decay=0.05, decay_mask=_all), params, grads)
    ref = _run_torch(lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.05), params, grads)
    _assert_matches(ours, ref)
    # Coupled decay must not pass as decoupled: wd 0.05 * lr 1e-2 moves params ~5e-4 per step.
    coupled = _run_functional(optim.adam(1e-2, weight_decay=0.05, decay_mask=_all), params, grads)
    assert _max_diff(coupled, ref) > 1e-4


def test_adamw_fp32_is_close_to_fp64_reference() -> None:
    params = _params(torch.float32)
    grads = _grad_sequence(params)
    ours = _run_functional(optim.adamw(1e-2, weight_decay=0.05, decay_mask=_all), params, grads)
    exact = _run_torch(
        lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.05),
        {k: v.double() for k, v in params.items()},
        [{k: v.double() for k, v in g.items()} for g in grads],
    )
    assert _max_diff([{k: v.double() for k, v in t.items()} for t in ours], exact) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_matches_torch(dtype: torch.dtype) -> None:
    params = _params(dtype)
    grads = _grad_sequence(params)
    ours = _run_functional(
        optim.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.05, decay_mask=_all), params, grads
    )
    ref = _run_torch(
        lambda g: torch.optim.Adam(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05), params, grads
    )
    _assert_matches(ours, ref)


CLIP_CASES: dict[str, tuple[Callable[[Schedule], optim.Transform], TorchOptFactory]] = {
    "adamw": (
        lambda lr: optim.adamw(lr, weight_decay=0.05, max_grad_norm=1.0),
        lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.05),
    ),
    "adam": (
        lambda lr: optim.adam(lr, weight_decay=0.05, max_grad_norm=1.0),
        lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.05),
    ),
    "sgd": (
        lambda lr: optim.sgd(lr, momentum=0.9, weight_decay=0.05, max_grad_norm=1.0),
        lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, weight_decay=0.05),
    ),
    "sgd_nesterov": (
        lambda lr: optim.sgd(lr, momentum=0.9, nesterov=True, weight_decay=0.05, max_grad_norm=1.0),
        lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.05),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CLIP_CASES))
def test_clipping_mask_and_schedule_match_torch(name: str, dtype: torch.dtype) -> None:
    # Clipping, the default mask and a schedule stepping on the 0-based count, against torch.
    make_ours, make_torch = CLIP_CASES[name]
    params = _params(dtype)
    grads = _grad_sequence(params, scale=10.0)  # global norm ~ 100 >> 1: clipping is active
    ours = _run_functional(make_ours(sch.multistep(1e-2, [3, 7], gamma=0.1)), params, grads)
    ref = _run_torch(
        make_torch,
        params,
        grads,
        decay_mask=optim.default_decay_mask,
        max_grad_norm=1.0,
        make_sched=lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[3, 7], gamma=0.1),
    )
    _assert_matches(ours, ref)


@pytest.mark.parametrize(
    ("make_ours", "make_torch"),
    [
        (
            lambda: optim.sgd(0.05, momentum=0.9, weight_decay=0.1),
            lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=0.1),
        ),
        (
            lambda: optim.adam(1e-2, weight_decay=0.1),
            lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=0.1),
        ),
        (
            lambda: optim.adamw(1e-2, weight_decay=0.1),
            lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
        ),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_default_decay_mask_skips_biases_and_norms(
    make_ours: Callable[[], optim.Transform], make_torch: TorchOptFactory
) -> None:
    params = _params(torch.float64)
    grads = _grad_sequence(params)
    ours = _run_functional(make_ours(), params, grads)
    ref = _run_torch(make_torch, params, grads, decay_mask=optim.default_decay_mask)
    _assert_matches(ours, ref)
    decay_all = _run_torch(make_torch, params, grads)
    assert _max_diff(ours, decay_all) > 1e-4


def test_default_decay_mask_names() -> None:
    params = _params()
    decayed = {k for k, p in params.items() if optim.default_decay_mask(k, p)}
    assert decayed == {"backbone.conv1.weight", "head.fc.weight", "head.proj.weight"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "unclipped"])
def test_clip_by_global_norm_matches_torch(dtype: torch.dtype, max_norm: float) -> None:
    params = _params(dtype)
    grads = _grad_sequence(params, steps=1)[0]
    tparams = [torch.nn.Parameter(p.detach().clone()) for p in params.values()]
    for p, g in zip(tparams, grads.values(), strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(tparams, max_norm)

    assert torch.allclose(optim.global_norm(grads), total, rtol=1e-6, atol=0.0)
    clipped, state = optim.clip_by_global_norm(max_norm).update(grads, {}, params)
    assert state == {}
    for p, (k, g) in zip(tparams, clipped.items(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-6, atol=1e-7), k
    new_norm = optim.global_norm(clipped).item()
    if max_norm < total.item():
        assert new_norm == pytest.approx(max_norm, rel=1e-5)
    else:
        assert new_norm == pytest.approx(total.item(), rel=1e-6)


def test_constant_schedule() -> None:
    s = sch.constant(0.3)
    for step in [0, 1, 1000]:
        assert s(torch.tensor(step)).item() == pytest.approx(0.3, abs=1e-15)


def test_multistep_schedule() -> None:
    s = sch.multistep(0.1, [10, 20], gamma=0.1)
    expected = {0: 0.1, 9: 0.1, 10: 0.01, 19: 0.01, 20: 0.001, 1000: 0.001}
    for step, lr in expected.items():
        assert s(torch.tensor(step)).item() == pytest.approx(lr, rel=1e-12), step


def test_cosine_schedule() -> None:
    s = sch.cosine(1.0, total_steps=100, final_lr=0.1)
    assert s(torch.tensor(0)).item() == pytest.approx(1.0, rel=1e-12)
    assert s(torch.tensor(50)).item() == pytest.approx(0.55, rel=1e-12)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert s(torch.tensor(25)).item() == pytest.approx(quarter, rel=1e-12)
    assert s(torch.tensor(100)).item() == pytest.approx(0.1, rel=1e-12)
    assert s(torch.tensor(150)).item() == pytest.approx(0.1, rel=1e-12)  # held at final_lr


def test_linear_warmup_schedule() -> None:
    s = sch.linear_warmup(sch.constant(0.01), warmup_steps=100, start_ratio=0.001)
    assert s(torch.tensor(0)).item() == pytest.approx(0.01 * 0.001, rel=1e-12)
    assert s(torch.tensor(50)).item() == pytest.approx(0.01 * (1 - 0.5 * 0.999), rel=1e-12)
    assert s(torch.tensor(100)).item() == 0.01  # exactly the wrapped schedule from warmup end on
    assert s(torch.tensor(500)).item() == 0.01
    # Wrapping a decaying schedule multiplies its value, it does not restart it.
    inner = sch.multistep(0.01, [2], gamma=0.1)
    w = sch.linear_warmup(inner, warmup_steps=4, start_ratio=0.5)
    assert w(torch.tensor(3)).item() == pytest.approx(0.001 * (1 - 0.25 * 0.5), rel=1e-12)
    assert sch.linear_warmup(inner, warmup_steps=0) is inner


def test_schedules_match_torch_schedulers() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    o1 = torch.optim.SGD([p], lr=0.2)
    o2 = torch.optim.SGD([p], lr=0.2)
    cos_t = torch.optim.lr_scheduler.CosineAnnealingLR(o1, T_max=30, eta_min=0.02)
    ms_t = torch.optim.lr_scheduler.MultiStepLR(o2, milestones=[5, 12], gamma=0.5)
    cos, ms = sch.cosine(0.2, 30, final_lr=0.02), sch.multistep(0.2, [5, 12], gamma=0.5)
    for step in range(30):
        assert cos(torch.tensor(step)).item() == pytest.approx(o1.param_groups[0]["lr"], rel=1e-9), step
        assert ms(torch.tensor(step)).item() == pytest.approx(o2.param_groups[0]["lr"], rel=1e-12), step
        o1.step()
        o2.step()
        cos_t.step()
        ms_t.step()


def test_schedule_stays_on_step_device_and_is_a_tensor() -> None:
    s = sch.linear_warmup(sch.cosine(0.1, 10), 3)
    out = s(torch.tensor(2, dtype=torch.int64))
    assert isinstance(out, Tensor) and out.dim() == 0 and out.dtype == torch.float64


OPTIMIZERS: dict[str, Callable[[], optim.Transform]] = {
    "sgd_nesterov": lambda: optim.sgd(0.05, nesterov=True, weight_decay=1e-2, max_grad_norm=1.0),
    "adam": lambda: optim.adam(1e-2, weight_decay=1e-2),
    "adamw_warmup_cosine": lambda: optim.adamw(
        sch.linear_warmup(sch.cosine(1e-2, 20), 5), weight_decay=0.05, max_grad_norm=1.0
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_is_pure(name: str) -> None:
    opt = OPTIMIZERS[name]()
    params = _params()
    state = opt.init(params)
    for grads in _grad_sequence(params, steps=2):  # 2nd step: non-zero buffers in the state
        before = [{k: v.clone() for k, v in t.items()} for t in (grads, state, params)]
        objects = [dict(t) for t in (grads, state, params)]
        updates, new_state = opt.update(grads, state, params)
        new_params = optim.apply_updates(params, updates)
        for tree, copy, objs in zip((grads, state, params), before, objects, strict=True):
            assert tree.keys() == copy.keys()
            for k in tree:
                assert tree[k] is objs[k], k  # the dict itself was not rebound
                assert torch.equal(tree[k], copy[k]), k  # and no tensor was written in place
        assert not any(new_state[k] is state[k] for k in state if k.endswith(tuple(params)))
        params, state = new_params, new_state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiles_once(name: str) -> None:
    opt = OPTIMIZERS[name]()
    compiles = 0

    host_syncs: list[str] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable:
        nonlocal compiles
        compiles += 1
        # Recent dynamo captures `.item()` into the graph instead of breaking it, so look for it.
        host_syncs.extend(str(n.target) for n in gm.graph.nodes if str(n.target) in {"item", "tolist"})
        return gm.forward

    def step(params: Tree, state: Tree, grads: Tree) -> tuple[Tree, Tree]:
        updates, state = opt.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counting_backend, fullgraph=True)
    params = eager_params = _params()
    state = eager_state = opt.init(params)
    for grads in _grad_sequence(params, steps=3):
        params, state = compiled(params, state, grads)
        eager_params, eager_state = step(eager_params, eager_state, grads)
    # One graph for all steps: the count is a tensor and nothing branches on tensor values.
    assert compiles == 1
    assert host_syncs == []
    assert optim.step_count(state).item() == 3
    for k in params:
        assert torch.allclose(params[k], eager_params[k], rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_round_trips_through_safetensors(name: str, tmp_path: Path) -> None:
    opt = OPTIMIZERS[name]()
    params = _params()
    state = opt.init(params)
    for grads in _grad_sequence(params, steps=2):
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    assert all(isinstance(k, str) and isinstance(v, Tensor) and v.is_contiguous() for k, v in state.items())
    path = tmp_path / "optim.safetensors"
    save_file(state, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and torch.equal(loaded[k], v), k
    # Resuming from the loaded state gives the same next step as continuing in memory.
    grads = _grad_sequence(params, steps=1, seed=7)[0]
    u1, _ = opt.update(grads, state, params)
    u2, _ = opt.update(grads, loaded, params)
    assert all(torch.equal(u1[k], u2[k]) for k in u1)


def test_chain_state_keys_and_step_count() -> None:
    params = _params()
    state = optim.adamw(1e-3).init(params)
    assert "adam.count" in state and "lr.count" in state
    assert {f"adam.mu.{k}" for k in params} <= state.keys()
    assert {f"adam.nu.{k}" for k in params} <= state.keys()
    assert optim.step_count(state).dtype == torch.int64 and optim.step_count(state).item() == 0
    sgd_state = optim.sgd(0.1, momentum=0.9).init(params)
    assert set(sgd_state) == {f"sgd.momentum.{k}" for k in params} | {"lr.count"}
    assert set(optim.adam(1e-3).init(params)) == set(state)  # the same roles, whatever the order
    assert set(optim.chain(optim.trace(0.9), optim.scale_by_learning_rate(0.1)).init(params)) == \
        {f"0.momentum.{k}" for k in params} | {"1.count"}
    # Toggling clipping keeps the keys stable (checkpoints stay loadable).
    assert set(optim.sgd(0.1, max_grad_norm=1.0).init(params)) == set(sgd_state)
    with pytest.raises(KeyError):
        optim.step_count(optim.trace(0.9).init(params))


def test_schedule_sees_zero_based_step_count() -> None:
    # lr(0) must drive the first update: a schedule that is 1 at step 0 and 0 afterwards moves params once.
    params = {"w": torch.ones(2, 2)}
    opt = optim.chain(optim.scale_by_learning_rate(lambda step: (step == 0).to(torch.float64)))
    history = _run_functional(opt, params, [{"w": torch.ones(2, 2)}] * 3)
    assert torch.equal(history[0]["w"], torch.zeros(2, 2))
    assert torch.equal(history[2]["w"], torch.zeros(2, 2))


def test_chain_never_writes_into_a_foreign_transforms_tensors() -> None:
    # A user transform (not from centerpoint.optim.transforms) that keeps its input updates in its state: the
    # elements after it in the chain must not scale those tensors in place.
    def remember_init(params: Tree) -> Tree:
        return {f"last.{k}": torch.zeros_like(p) for k, p in params.items()}

    def remember_update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        return grads, {f"last.{k}": g for k, g in grads.items()}

    remember = optim.Transform(remember_init, remember_update)
    params = _params()
    grads = _grad_sequence(params, steps=1, scale=10.0)[0]
    opt = optim.chain(optim.clip_by_global_norm(1.0), remember, optim.scale_by_learning_rate(0.5))
    updates, state = opt.update(grads, opt.init(params), params)
    clipped, _ = optim.clip_by_global_norm(1.0).update(grads, {}, params)
    for k in params:
        assert torch.allclose(state[f"1.last.{k}"], clipped[k]), k
        assert torch.allclose(updates[k], -0.5 * clipped[k]), k


def test_moment_buffers_follow_channels_last_weights() -> None:
    params = {"w": torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last), "b": torch.randn(4)}
    state = optim.adamw(1e-3).init(params)
    mu = state["adam.mu.w"]
    assert mu.is_contiguous(memory_format=torch.channels_last) and not mu.is_contiguous()
    assert state["adam.nu.b"].is_contiguous()


KERNEL_CASES: dict[str, Callable[[], optim.Transform]] = {
    "adamw": lambda: optim.adamw(sch.linear_warmup(sch.cosine(1e-2, 20), 5), weight_decay=0.05),
    "adam": lambda: optim.adam(1e-2, b1=0.8, weight_decay=0.05),
    "sgd": lambda: optim.sgd(0.05, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, decay_mask=None),
    "sgd_plain": lambda: optim.sgd(0.05, momentum=0.0, weight_decay=1e-2),
}


@pytest.mark.parametrize("donate", [False, True], ids=["consuming", "donating"])
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_inplace_kernel_equals_the_pure_update_bit_for_bit(name: str, donate: bool) -> None:
    """`Transform.inplace` (the eager steps' kernel) computes exactly what `update` + `apply_updates` do,
    writing only into the memory it is given: the gradients, and with `donate` the state and params."""
    opt = KERNEL_CASES[name]()
    assert opt.inplace is not None
    params = kernel_params = _params()
    state = kernel_state = opt.init(params)
    for grads in _grad_sequence(params, steps=4):
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        given = (kernel_state, kernel_params)
        kept = [{k: v.clone() for k, v in t.items()} for t in given]
        kernel_params, kernel_state = opt.inplace({k: g.clone() for k, g in grads.items()}, kernel_state,
                                                  kernel_params, donate)
        assert kernel_state.keys() == state.keys()
        for k in params:
            assert torch.equal(kernel_params[k], params[k]), k
            assert (kernel_params[k] is given[1][k]) == donate, k  # updated in place exactly when donated
        for k in state:
            assert torch.equal(kernel_state[k], state[k]), k
        if not donate:  # what it was given is intact
            for tree, copy in zip(given, kept, strict=True):
                assert all(torch.equal(tree[k], copy[k]) for k in tree)


def test_clipping_leaves_the_kernel_to_the_pure_update() -> None:
    # The train step clips before the kernel; a transform that clips itself has no kernel to disagree with.
    assert optim.adamw(1e-2, max_grad_norm=1.0).inplace is None
    assert optim.sgd(1e-2, max_grad_norm=1.0).inplace is None
