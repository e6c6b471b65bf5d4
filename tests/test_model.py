from pathlib import Path

import pytest
import torch

from centerpoint.model import build_network, init, make_apply, normalize
from centerpoint.nn.neck import CTResNetNeck
from centerpoint.spec import MMDET_R18, ModelSpec
from centerpoint.spec_io import load_spec
from centerpoint.state import num_elements


def test_names_match_mmdetection_layout():
    params, buffers = init(ModelSpec(**MMDET_R18, num_classes=80), 0)
    keys = set(params) | set(buffers)
    # mmdetection's CenterNet-R18 state_dict (without DCN) has 168 keys including num_batches_tracked.
    assert len(keys) == 168
    for name in ["backbone.conv1.weight", "backbone.layer4.1.bn2.running_var", "backbone.layer2.0.downsample.0.weight",
                 "neck.deconv_layers.0.conv.weight", "neck.deconv_layers.5.bn.num_batches_tracked",
                 "bbox_head.heatmap_head.0.weight", "bbox_head.heatmap_head.2.bias", "bbox_head.wh_head.2.weight",
                 "bbox_head.offset_head.0.bias"]:
        assert name in keys, name
    assert params["bbox_head.heatmap_head.2.weight"].shape == (80, 64, 1, 1)
    assert params["neck.deconv_layers.1.conv.weight"].shape == (256, 256, 4, 4)
    half, _ = init(ModelSpec(), 0)
    assert set(half) == set(params) and 3_400_000 < num_elements(half) < 3_700_000
    assert 14_000_000 < num_elements(params) < 14_300_000


def test_init_is_deterministic_and_follows_recipe():
    p1, _ = init(ModelSpec(), 3)
    p2, _ = init(ModelSpec(), 3)
    p3, _ = init(ModelSpec(), 4)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not torch.equal(p1["backbone.conv1.weight"], p3["backbone.conv1.weight"])
    assert torch.allclose(p1["bbox_head.heatmap_head.2.bias"], torch.full((5,), -2.1972), atol=1e-4)
    assert p1["bbox_head.wh_head.2.weight"].std() < 0.002
    assert torch.count_nonzero(p1["bbox_head.offset_head.2.bias"]) == 0
    ramp = torch.tensor([0.25, 0.75, 0.75, 0.25])
    deconv = p1["neck.deconv_layers.3.conv.weight"]
    assert torch.allclose(deconv[:, 0], torch.outer(ramp, ramp).expand_as(deconv[:, 0]))


def test_dcn_adds_exactly_the_offset_convs():
    plain, _ = init(ModelSpec(), 0)
    dcn, _ = init(ModelSpec(dcn=True), 0)
    extra = set(dcn) - set(plain)
    assert extra == {f"neck.deconv_layers.{i}.conv.conv_offset.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}


def test_apply_matches_module_and_threads_bn_stats():
    spec = ModelSpec()
    params, buffers = init(spec, 0)
    net = build_network(spec)
    net.load_state_dict({**params, **buffers})
    x = normalize(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), (120.0,) * 3, (60.0,) * 3)
    apply = make_apply(build_network(spec))
    before = {k: v.clone() for k, v in buffers.items()}
    out, new_buffers = apply(params, buffers, x, True)
    net.train()
    ref = net(x)
    for k in ("heatmap", "wh", "offset"):
        assert out[k].shape == ref[k].shape
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
    sd = net.state_dict()
    for k in buffers:
        assert torch.equal(buffers[k], before[k])  # inputs untouched
        torch.testing.assert_close(new_buffers[k], sd[k], rtol=1e-6, atol=1e-6)
    assert int(new_buffers["backbone.bn1.num_batches_tracked"]) == 1
    out_eval, same = apply(params, buffers, x, False)
    assert same is buffers and out_eval["heatmap"].shape == (2, 5, 16, 16)


def test_direct_swap_apply_equals_functional_call_and_leaves_the_module_untouched():
    """traced=False (eager steps) swaps tensors into the module's slots: same outputs, BN statistics and
    gradients as functional_call, and the module holds its own template tensors again afterwards."""
    spec = ModelSpec()
    params, buffers = init(spec, 0)
    params = {k: v + 0.01 * torch.randn_like(v) for k, v in params.items()}  # not the module's own values
    net = build_network(spec)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    x = normalize(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), (120.0,) * 3, (60.0,) * 3)
    results = []
    for traced in (True, False):
        apply = make_apply(net, traced=traced)
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        out, new_buffers = apply(leaves, buffers, x, True)
        grads = torch.autograd.grad(sum(o.square().mean() for o in out.values()), list(leaves.values()))
        results.append((out, new_buffers, grads, apply(params, buffers, x, False)[0]))
    (out_t, buf_t, grad_t, eval_t), (out_d, buf_d, grad_d, eval_d) = results
    for k in out_t:
        assert torch.equal(out_t[k], out_d[k]) and torch.equal(eval_t[k], eval_d[k])
    assert all(torch.equal(buf_t[k], buf_d[k]) for k in buffers)
    assert all(torch.equal(a, b) for a, b in zip(grad_t, grad_d, strict=True))
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())  # the module kept nothing
    assert not torch.equal(buf_d["backbone.bn1.running_mean"], buffers["backbone.bn1.running_mean"])
    apply = make_apply(net, traced=False)
    with pytest.raises(KeyError, match="do not match"):
        apply({k: v for k, v in params.items() if k != "backbone.conv1.weight"}, buffers, x, False)
    with pytest.raises(KeyError):
        apply({**params, "extra.weight": params["backbone.conv1.weight"]}, buffers, x, False)


def test_resnet_depths_output_shapes():
    assert build_network(ModelSpec()).backbone.out_channels == 256  # the half-width default
    for depth, channels in ((34, 512), (50, 2048)):
        spec = ModelSpec(**MMDET_R18, depth=depth)
        net = build_network(spec)
        assert net.backbone.out_channels == channels
        out = net.eval()(torch.zeros(1, 3, 64, 64))
        assert out["heatmap"].shape == (1, 5, 16, 16)
    assert isinstance(build_network(ModelSpec()).neck, CTResNetNeck)


@pytest.mark.parametrize("depth", [18, 50])
def test_zero_init_residual_zeroes_the_last_bn_of_every_block(depth: int) -> None:
    """mmdetection's ResNet default (zero_init_residual=True): bn2 of each BasicBlock, bn3 of each
    Bottleneck start with weight 0 and bias 0; every other BatchNorm starts at weight 1, bias 0."""
    spec = ModelSpec(depth=depth, width=8, neck_channels=(16, 16, 8), head_channels=8, zero_init_residual=True)
    last = "bn2" if depth == 18 else "bn3"
    blocks = {18: 8, 50: 16}[depth]
    params, _ = init(spec, 0)
    zeroed = sorted(k for k, v in params.items() if k.endswith("weight") and v.dim() == 1 and not v.any())
    assert len(zeroed) == blocks
    assert all(k.startswith("backbone.layer") and k.endswith(f".{last}.weight") for k in zeroed)
    norms = [k for k in params if k.endswith(".weight") and params[k].dim() == 1]
    assert all(torch.equal(params[k], torch.ones_like(params[k])) for k in norms if k not in zeroed)
    assert all(not params[k.replace("weight", "bias")].any() for k in norms)
    plain, _ = init(spec.model_copy(update={"zero_init_residual": False}), 0)
    assert all(torch.equal(plain[k], torch.ones_like(plain[k])) for k in norms)
    recipes = Path(__file__).resolve().parents[1] / "experiments"
    for recipe in ("centernet_r18_coco.yaml", "centernet_r18_dcn_coco.yaml"):  # mmdetection's default
        assert load_spec(recipes / recipe).model.zero_init_residual
    assert not ModelSpec().zero_init_residual  # the built-in experiment trains faster without
