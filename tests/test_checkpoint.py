from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from centerpoint.checkpoint import latest_checkpoint, load_checkpoint, restore_state, save_checkpoint
from centerpoint.errors import CenterpointError
from centerpoint.model import init
from centerpoint.optim.plan import build_optimizer
from centerpoint.optim.transforms import apply_updates
from centerpoint.spec_io import load_spec
from centerpoint.state import flatten_state, init_state
from tests.conftest import TINY
from tests.helpers import call_cli

# The network of the format-1 run checkpoint (tests/data/make_format1_checkpoints.py).
TINY_NET = ["model.width=8", "model.neck_channels=[8,8,8]", "model.head_channels=8"]


def _state(spec, seed=0):
    plan = build_optimizer(spec, 10, 8)
    params, buffers = init(spec.model, seed)
    st = init_state(params, buffers, plan.transform)
    # Make optimizer state non-trivial so the round trip means something.
    opt = {k: torch.randn_like(v) if v.is_floating_point() else v + 3 for k, v in st.opt_state.items()}
    return st._replace(opt_state=opt, step=torch.tensor(7))


def test_round_trip_is_bit_exact_with_metadata(tmp_path):
    spec = load_spec(None, ["optim.name=adamw", "train.epochs=5"])
    state = _state(spec)
    path = save_checkpoint(tmp_path / "c.safetensors", state, spec, epoch=2, batch_in_epoch=5,
                           metrics={"bbox_mAP": 0.25})
    ckpt = load_checkpoint(path)
    assert ckpt.spec == spec and ckpt.step == 7 and ckpt.epoch == 2 and ckpt.batch_in_epoch == 5
    assert ckpt.metrics == {"bbox_mAP": 0.25}
    restored = restore_state(ckpt, _state(spec, seed=1))
    for a, b in ((state.params, restored.params), (state.buffers, restored.buffers),
                 (state.opt_state, restored.opt_state)):
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert int(restored.step) == 7
    assert restored.buffers["backbone.bn1.num_batches_tracked"].dtype == torch.int64


def test_bad_checkpoints_are_clear_errors(tmp_path):
    spec = load_spec(None)
    with pytest.raises(CenterpointError, match="not found"):
        load_checkpoint(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CenterpointError, match="not a readable"):
        load_checkpoint(junk)
    good = save_checkpoint(tmp_path / "good.safetensors", _state(spec), spec, 1)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CenterpointError, match="not a readable"):
        load_checkpoint(trunc)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CenterpointError, match="not a centerpoint checkpoint"):
        load_checkpoint(foreign)
    other = load_spec(None, ["model.num_classes=7"])
    with pytest.raises(CenterpointError, match=r"bbox_head\.heatmap_head\.2\.bias.*\(7,\), expected \(5,\)"):
        restore_state(load_checkpoint(save_checkpoint(tmp_path / "o.safetensors", _state(other), other, 1)),
                      _state(spec))


def test_refuses_non_finite_and_keeps_previous(tmp_path):
    spec = load_spec(None)
    state = _state(spec)
    path = save_checkpoint(tmp_path / "latest.safetensors", state, spec, 1)
    before = path.read_bytes()
    bad = state._replace(params={**state.params, "backbone.conv1.weight": torch.full((64, 3, 7, 7), float("nan"))})
    with pytest.raises(CenterpointError, match="non-finite"):
        save_checkpoint(path, bad, spec, 2)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_latest_skips_truncated_newest(tmp_path, capsys):
    spec = load_spec(None)
    ckpt_dir = tmp_path / "checkpoints"
    save_checkpoint(ckpt_dir / "epoch_0001.safetensors", _state(spec), spec, 1)
    latest = save_checkpoint(ckpt_dir / "latest.safetensors", _state(spec)._replace(step=torch.tensor(9)), spec, 2)
    data = latest.read_bytes()
    latest.write_bytes(data[:100])
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.step == 7
    err = capsys.readouterr().err.splitlines()  # one `warning:` line, no Python warning with its source line
    assert len(err) == 1 and err[0].startswith("warning: --resume: skipping unreadable checkpoint ")
    assert "latest.safetensors" in err[0]


def as_newer_version(path):
    """Rewrite a checkpoint as a later version would write it: its spec has a key this version lacks."""
    import json

    from safetensors.torch import load_file

    from centerpoint.checkpoint import read_header

    meta = read_header(path)
    spec = json.loads(meta["spec"])
    spec["train"]["a_later_field"] = 1
    save_file(load_file(str(path)), str(path), metadata={**meta, "spec": json.dumps(spec)})


def test_latest_refuses_unusable_checkpoints_naming_each(tmp_path):
    spec = load_spec(None)
    ckpt_dir = tmp_path / "checkpoints"
    older = save_checkpoint(ckpt_dir / "epoch_0001.safetensors", _state(spec), spec, 1)
    latest = save_checkpoint(ckpt_dir / "latest.safetensors", _state(spec)._replace(step=torch.tensor(9)), spec, 2)
    as_newer_version(latest)
    # The newest cannot be read by this version: going back to the older one would overwrite it.
    with pytest.raises(CenterpointError, match="newest checkpoint cannot be used") as err:
        latest_checkpoint(tmp_path)
    assert "latest.safetensors: unknown key 'train.a_later_field'" in str(err.value)
    assert f"--resume {older}" in str(err.value)
    as_newer_version(older)
    (ckpt_dir / "best.safetensors").write_bytes(b"garbage")
    with pytest.raises(CenterpointError, match="no usable checkpoint") as err:
        latest_checkpoint(tmp_path)
    for name in ("latest", "epoch_0001", "best"):
        assert f"{name}.safetensors" in str(err.value)


DATA = Path(__file__).resolve().parent / "data"  # format-1 files written by `make_format1_checkpoints.py`


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_format1_checkpoint_loads_with_optimizer_state_named_by_role(optimizer: str) -> None:
    """A checkpoint of the version before optimizer state was named by role (keys by chain position) is
    renamed on load, and holds exactly what this version computes for the same two updates."""
    path = DATA / f"format1_{optimizer}_tree.safetensors"
    ckpt = load_checkpoint(path)
    raw = load_file(str(path))
    old_opt = sorted(k for k in raw if k.startswith("opt."))
    assert all(k.split(".")[1].isdigit() for k in old_opt)  # really the old layout
    # The generator's two updates, redone here (same seeds, same spec).
    spec = load_spec(None, [f"optim.name={optimizer}", f"optim.nesterov={str(optimizer == 'sgd').lower()}"])
    assert ckpt.spec.optim == spec.optim
    plan = build_optimizer(spec, 10, 8)
    g = torch.Generator().manual_seed(0)
    params = {"head.weight": torch.randn(2, 3, generator=g), "head.bias": torch.randn(2, generator=g)}
    state = init_state(params, {"bn.running_mean": torch.zeros(2)}, plan.transform)
    for _ in range(2):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in state.params.items()}
        updates, opt = plan.transform.update(grads, state.opt_state, state.params)
        state = state._replace(params=apply_updates(state.params, updates), opt_state=opt, step=state.step + 1)
    want = flatten_state(state)
    assert set(ckpt.tensors) == set(want) and len(old_opt) == len(plan.transform.init(params))
    for k, v in want.items():
        assert torch.equal(ckpt.tensors[k], v), k
    template = init_state(params, {"bn.running_mean": torch.ones(2)}, plan.transform)
    restored = restore_state(ckpt, template)
    assert all(torch.equal(v, want[k]) for k, v in flatten_state(restored).items())


def test_format1_checkpoint_of_a_real_run_inspects_and_resumes_through_the_cli(
        tmp_path: Path, cache_dir: Path) -> None:
    """A format-1 run checkpoint (3 steps of a tiny network, SGD with momentum): `centerpoint checkpoint
    inspect` reads it, the same run trained by this version ends with exactly its tensors, and `train
    --resume FILE` continues it."""
    old = DATA / "format1_sgd_tiny.safetensors"
    code, out, err = call_cli("checkpoint", "inspect", str(old))
    assert code == 0, err
    assert "step 3  epoch 1  batch_in_epoch 0" in out
    sets = [x for s in [*TINY, *TINY_NET, "optim.name=sgd", "runtime.threads=1", "logging.tensorboard=false"]
            for x in ("--set", s)]
    again, resumed = tmp_path / "again", tmp_path / "resumed"
    code, _, err = call_cli("train", *sets, "--max-steps", "3", "--device", "cpu", "--workdir", str(again))
    assert code == 0, err
    upgraded, now = load_checkpoint(old).tensors, load_file(str(again / "checkpoints" / "latest.safetensors"))
    assert set(upgraded) == set(now) and "opt.sgd.momentum.backbone.conv1.weight" in now and "opt.lr.count" in now
    assert not [k for k in now if not torch.equal(now[k], upgraded[k])]
    code, out, err = call_cli("train", *sets, "--max-steps", "4", "--device", "cpu", "--workdir", str(resumed),
                              "--resume", str(old))
    assert code == 0, err
    assert "format1_sgd_tiny.safetensors (step 3, epoch 1)" in " ".join(out.split())
    after = load_checkpoint(resumed / "checkpoints" / "latest.safetensors")
    assert after.step == 4 and int(after.tensors["opt.lr.count"]) == 4 and set(after.tensors) == set(now)
