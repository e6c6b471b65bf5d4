"""Replicated runs (`train.replicas`): replica i of a K-replica step equals a single-model step with
replica i's spec (init seed, lr, weight decay), in float64 to 1e-10 after several steps; in float32 within
the documented tolerance; stacking and taking states apart round-trips."""

from __future__ import annotations

import pytest
import torch

from centerpoint.model import build_network, init, make_apply
from centerpoint.optim.ema import init_ema
from centerpoint.optim.hyper import HYPER_KEYS
from centerpoint.optim.plan import build_optimizer
from centerpoint.optim.transforms import apply_updates
from centerpoint.replicas.fold import fold_network, make_folded_apply
from centerpoint.replicas.settings import replica_spec, replica_state, replicas_of, replicated_state, stack_states
from centerpoint.replicas.step import make_replicated_step
from centerpoint.runtime.devices import StepMode
from centerpoint.spec_io import load_spec
from centerpoint.state import flatten_state, init_state, map_state
from centerpoint.step import make_train_step

SMALL = ["model.width=8", "model.neck_channels=[16,8,8]", "model.head_channels=8", "model.num_classes=3",
         "data.input_size=64", "train.batch_size=4", "schedule.warmup_steps=2", "optim.grad_clip=2.0"]
STEPS, SPE, BATCH = 4, 10, 4


def _batches(n: int, classes: int = 3, size: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        m = size // 4
        heat = torch.rand(BATCH, classes, m, m, generator=gen) * 0.9
        heat[:, :, 3, 5] = 1.0  # a few exact centres, as real targets have
        out.append({"images": torch.rand(BATCH, 3, size, size, generator=gen) * 255, "heatmap": heat,
                    "wh": torch.rand(BATCH, 2, m, m, generator=gen) * 8,
                    "offset": torch.rand(BATCH, 2, m, m, generator=gen),
                    "reg_weight": (torch.rand(BATCH, 1, m, m, generator=gen) > 0.9).float()})
    return out


def _cast(tree: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tree.items()}


def _trained(spec, dtype: torch.dtype, batches: list, mode: StepMode, replicated: str | None = None,  # noqa: ANN001, ANN202
             poison: int | None = None):
    """Flat state after training `spec` on `batches` with the single step in `mode`, or the `replicated`
    step ("folded" or "vmap" forward) in `mode`. `poison`: that replica starts with an infinite weight."""
    plan = build_optimizer(spec, SPE, BATCH)
    net = build_network(spec.model).to(dtype)
    apply_ = make_apply(net, traced=replicated is not None or mode is StepMode.TRACED)

    def apply(p, b, x, train):  # noqa: ANN001, ANN202
        return apply_(p, b, x.to(dtype), train)

    def fresh(seed: int):  # noqa: ANN202
        params, buffers = (_cast(t, dtype) for t in init(spec.model, seed))
        state = init_state(params, buffers, plan.transform)
        return state._replace(ema=init_ema(params, buffers)) if spec.train.ema_decay is not None else state

    if replicated is not None:
        state = replicated_state(spec, BATCH, fresh)
        if poison is not None:
            state.params["bbox_head.wh_head.2.bias"][poison, 0] = float("inf")
        folded = None
        if replicated == "folded":
            run_folded = make_folded_apply(fold_network(net, spec.train.replicas), spec.train.replicas, False)

            def folded(p, b, x, train):  # noqa: ANN001, ANN202
                return run_folded(p, b, x.to(dtype), train)
        step = make_replicated_step(apply, spec, plan.transform, mode, folded=folded)
    else:
        state = fresh(replicas_of(spec)[0].init_seed)
        step = make_train_step(apply, spec, plan.transform, mode)
    for batch in batches:
        state, metrics = step(state, batch)
    return state, metrics


def _max_diff(stacked, single, index: int) -> float:  # noqa: ANN001
    one = flatten_state(replica_state(stacked, index))
    other = flatten_state(single)
    assert sorted(one) == sorted(other)
    return max(float((one[k].double() - other[k].double()).abs().max()) for k in one)


ADAMW_SWEEP = "{optim.lr: [0.001, 0.004, 0.02], optim.weight_decay: [0.0, 0.01, 0.1]}"


@pytest.mark.parametrize(("optimizer", "sweep", "ema_decay", "mode", "forward"), [
    ("adamw", ADAMW_SWEEP, "null", StepMode.EAGER_DONATING, "folded"),
    ("adamw", ADAMW_SWEEP, "null", StepMode.TRACED, "folded"),
    ("adamw", ADAMW_SWEEP, "null", StepMode.EAGER, "vmap"),
    ("sgd", "{optim.lr: [0.01, 0.05]}", "0.9", StepMode.TRACED, "vmap"),  # each replica's EMA of the weights too
    ("sgd", "{optim.lr: [0.01, 0.05]}", "0.9", StepMode.EAGER, "folded"),
])
def test_replica_equals_single_run_float64(optimizer: str, sweep: str, ema_decay: str, mode: StepMode,
                                           forward: str) -> None:
    """Every form of the replicated step: the folded network or vmap for the forward, torch.func.grad
    (compiled runs) or autograd (eager runs) for the gradients."""
    k = sweep.split("]")[0].count(",") + 1
    spec = load_spec(None, [*SMALL, f"optim.name={optimizer}", f"train.replicas={k}", "train.seed=5",
                            f"train.sweep={sweep}", f"train.ema_decay={ema_decay}", "train.ema_warmup=2"])
    batches = _batches(STEPS)
    stacked, metrics = _trained(spec, torch.float64, batches, mode, replicated=forward)
    assert metrics["loss"].shape == (k,) and stacked.step.tolist() == [STEPS] * k
    assert sorted(key for key in stacked.opt_state if key in HYPER_KEYS) == sorted(HYPER_KEYS)
    assert bool(stacked.ema) == (ema_decay != "null")
    diffs = []
    for i in range(k):
        single, single_metrics = _trained(replica_spec(spec, i), torch.float64, batches, StepMode.EAGER_DONATING)
        diffs.append(_max_diff(stacked, single, i))
        assert abs(float(metrics["loss"][i]) - float(single_metrics["loss"])) < 1e-10
        assert abs(float(metrics["grad_norm"][i]) / float(single_metrics["grad_norm"]) - 1) < 1e-10
    assert max(diffs) < 1e-10, diffs
    # The replicas did train apart: different seeds and hyperparameters, different weights.
    p = next(iter(stacked.params.values()))
    assert float((p[0] - p[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("forward", ["folded", "vmap"])
def test_replica_equals_single_run_float32_within_tolerance(forward: str) -> None:
    """fp32: the replicated step runs the convolutions grouped over replicas, which sums in another order;
    after STEPS steps replica and single run agree to 1e-3 (absolute, weights of order 0.1) — the README's
    figure."""
    spec = load_spec(None, [*SMALL, "train.replicas=2"])
    batches = _batches(STEPS)
    stacked, _ = _trained(spec, torch.float32, batches, StepMode.EAGER, replicated=forward)
    for i in range(2):
        single, _ = _trained(replica_spec(spec, i), torch.float32, batches, StepMode.EAGER_DONATING)
        assert _max_diff(stacked, single, i) < 1e-3


def test_stack_and_take_apart_round_trip() -> None:
    spec = load_spec(None, [*SMALL])
    plan = build_optimizer(spec, SPE, BATCH)
    states = [init_state(*init(spec.model, s), plan.transform) for s in (3, 4)]
    stacked = stack_states(states)
    assert stacked.step.shape == (2,)
    for i, s in enumerate(states):
        back = flatten_state(replica_state(stacked, i))
        assert all(torch.equal(back[k], v) for k, v in flatten_state(s).items())
    assert flatten_state(map_state(lambda t: t, stacked)).keys() == flatten_state(stacked).keys()


def test_networks_with_other_layers_do_not_fold() -> None:
    """The deformable convolution holds its own weights: no folded network (the step vmaps instead); the
    plain network folds into layers K times as wide."""
    spec = load_spec(None, [*SMALL])
    assert fold_network(build_network(spec.model.model_copy(update={"dcn": True})), 2) is None
    folded = fold_network(build_network(spec.model), 3)
    assert folded is not None and folded.backbone.conv1.out_channels == 3 * 8 and folded.backbone.conv1.groups == 3


@pytest.mark.parametrize("mode", [StepMode.EAGER, StepMode.EAGER_DONATING])
def test_a_non_finite_replica_skips_alone(mode: StepMode) -> None:
    """Replica 1 starts with an infinite weight: every one of its steps is non-finite and keeps its state;
    replica 0 trains on exactly as a single run would."""
    spec = load_spec(None, [*SMALL, "train.replicas=2", "optim.name=sgd", "train.sweep={optim.lr: [0.01, 0.02]}"])
    batches = _batches(3)
    stacked, metrics = _trained(spec, torch.float64, batches, mode, replicated="folded", poison=1)
    assert stacked.step.tolist() == [3, 0] and metrics["finite"].tolist() == [1.0, 0.0]
    single, _ = _trained(replica_spec(spec, 0), torch.float64, batches, StepMode.EAGER_DONATING)
    assert _max_diff(stacked, single, 0) < 1e-10


@pytest.mark.parametrize(("name", "extra"), [("adamw", []), ("adam", []), ("sgd", ["optim.nesterov=true"]),
                                             ("sgd", ["optim.momentum=0.0"]), ("sgd", [])])
@pytest.mark.parametrize("donate", [False, True])
def test_inplace_kernel_equals_the_pure_update_bit_for_bit(name: str, extra: list[str], donate: bool) -> None:
    """The eager replicated step's optimizer kernel (`optim.hyper`: per-replica lr and weight decay over
    stacked trees) gives exactly the pure update's params and state, float32, over several updates."""
    spec = load_spec(None, [*SMALL, f"optim.name={name}", *extra, "train.replicas=3",
                            "train.sweep={optim.lr: [0.001, 0.01, 0.1], optim.weight_decay: [0.0, 0.05, 0.5]}"])
    plan = build_optimizer(spec, SPE, BATCH)
    state = replicated_state(spec, BATCH, lambda s: init_state(*init(spec.model, s), plan.transform))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the moments, momentum buffers and counts move
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in state.params.items()}
        updates, pure_opt = plan.transform.update(grads, state.opt_state, state.params)
        pure_params = apply_updates(state.params, updates)
        given = map_state(torch.clone, state)  # the kernel may write into what it is given
        params, opt = plan.transform.inplace({k: v.clone() for k, v in grads.items()}, given.opt_state,
                                             given.params, donate)
        assert params.keys() == pure_params.keys() and opt.keys() == pure_opt.keys()
        assert all(torch.equal(params[k], pure_params[k]) for k in params)
        assert all(torch.equal(opt[k], pure_opt[k]) for k in opt)
        state = state._replace(params=pure_params, opt_state=pure_opt)
