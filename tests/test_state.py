import pytest
import torch

from centerpoint.optim import transforms as optim
from centerpoint.optim.loss_scale import init_loss_scale
from centerpoint.runtime.memory_format import is_channels_last
from centerpoint.state import flatten_state, init_state, map_state, to_device, unflatten_state


def _state():
    params = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4)}
    return init_state(params, {"bn.running_var": torch.ones(4)}, optim.adamw(1e-3), init_loss_scale(8.0))


def test_flatten_names_every_group_and_unflatten_inverts_it():
    state = _state()
    flat = flatten_state(state)
    assert set(flat) == {"params.conv.weight", "params.conv.bias", "buffers.bn.running_var", "step",
                         "scaler.scale", "scaler.good_steps", "opt.adam.count", "opt.lr.count",
                         *(f"opt.adam.{m}.conv.{p}" for m in ("mu", "nu") for p in ("weight", "bias"))}
    back = unflatten_state(flat)
    assert all(a is b for a, b in zip(flatten_state(back).values(), flat.values(), strict=True))
    with pytest.raises(KeyError, match="belongs to no group"):
        unflatten_state({**flat, "other.x": torch.zeros(1)})


def test_map_and_to_device_reach_every_tensor():
    state = _state()
    doubled = map_state(lambda t: t * 2, state)
    assert all(torch.equal(doubled_t, t * 2) for doubled_t, t in
               zip(flatten_state(doubled).values(), flatten_state(state).values(), strict=True))
    moved = to_device(state, torch.device("cpu"), channels_last=True)
    flat = flatten_state(moved)
    assert is_channels_last(flat["params.conv.weight"]) and is_channels_last(flat["opt.adam.mu.conv.weight"])
    assert not is_channels_last(state.params["conv.weight"])  # the original is left as it was
    assert int(moved.step) == 0 and float(moved.scaler["scale"]) == 8.0
