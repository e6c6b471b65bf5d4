"""Tests for centerpoint.nn.dcn: exactness vs a per-pixel mmcv-style reference, conv limits, grads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from centerpoint.nn.dcn import ModulatedDeformConv2dPack, modulated_deform_conv2d


def _mmcv_bilinear(img: list[list[float]], h: int, w: int, y: float, x: float) -> float:
    """mmcv `dmcn_im2col_bilinear` plus its caller's range check, transcribed literally (scalar floats)."""
    # The im2col kernel only samples when -1 < y < H and -1 < x < W; anything else contributes 0.
    if not (y > -1 and x > -1 and y < h and x < w):
        return 0.0
    y_low, x_low = math.floor(y), math.floor(x)
    y_high, x_high = y_low + 1, x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    # Each corner is read only if it lies inside the image, otherwise it is treated as 0.
    v1 = img[y_low][x_low] if (y_low >= 0 and x_low >= 0) else 0.0
    v2 = img[y_low][x_high] if (y_low >= 0 and x_high <= w - 1) else 0.0
    v3 = img[y_high][x_low] if (y_high <= h - 1 and x_low >= 0) else 0.0
    v4 = img[y_high][x_high] if (y_high <= h - 1 and x_high <= w - 1) else 0.0
    return hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4


def _reference_dcn(
    x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
    dilation: int,
) -> Tensor:
    """Slow, explicit DCNv2: Python loops over batch, output pixels, taps and channels. (B, Cout, Ho, Wo)."""
    b, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = offset.shape[2], offset.shape[3]
    xs, offs, masks, ws = x.tolist(), offset.tolist(), mask.tolist(), weight.tolist()
    out = [[[[0.0] * wo for _ in range(ho)] for _ in range(cout)] for _ in range(b)]
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                acc = [0.0] * cout
                for a in range(kh):
                    for c in range(kw):
                        k = a * kw + c
                        y = i * stride - padding + a * dilation + offs[n][2 * k][i][j]
                        xx = j * stride - padding + c * dilation + offs[n][2 * k + 1][i][j]
                        m = masks[n][k][i][j]
                        for ci in range(cin):
                            v = m * _mmcv_bilinear(xs[n][ci], h, w, y, xx)
                            for co in range(cout):
                                acc[co] += ws[co][ci][a][c] * v
                for co in range(cout):
                    out[n][co][i][j] = acc[co] + (float(bias[co]) if bias is not None else 0.0)
    return torch.tensor(out, dtype=x.dtype)


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _random_case(
    seed: int, b: int, cin: int, cout: int, h: int, w: int, k: int, stride: int, padding: int, dilation: int,
    offset_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ho, wo = _out_size(h, k, stride, padding, dilation), _out_size(w, k, stride, padding, dilation)
    x = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    # Large fractional offsets push many samples partly or fully outside the image.
    offset = torch.randn(b, 2 * k * k, ho, wo, generator=g, dtype=torch.float64) * offset_scale
    mask = torch.rand(b, k * k, ho, wo, generator=g, dtype=torch.float64)
    return x, offset, mask, weight, bias


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "use_bias"),
    [(1, 1, 1, False), (1, 1, 1, True), (2, 1, 1, True), (2, 0, 1, False), (1, 2, 2, True)],
)
def test_matches_reference(stride: int, padding: int, dilation: int, use_bias: bool) -> None:
    x, offset, mask, weight, bias = _random_case(
        seed=stride * 10 + padding + dilation, b=2, cin=2, cout=3, h=5, w=6, k=3, stride=stride,
        padding=padding, dilation=dilation, offset_scale=2.5,
    )
    b = bias if use_bias else None
    got = modulated_deform_conv2d(x, offset, mask, weight, b, stride, padding, dilation)
    want = _reference_dcn(x, offset, mask, weight, b, stride, padding, dilation)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_matches_reference_at_boundaries() -> None:
    """Samples exactly on / just inside / just outside the -1 and H (W) limits, and on integer pixels."""
    x, _, mask, weight, bias = _random_case(
        seed=7, b=1, cin=2, cout=2, h=4, w=4, k=3, stride=1, padding=1, dilation=1, offset_scale=1.0
    )
    # Offsets that put the tap at tap-relative shifts hitting the special values for some pixel/tap combos.
    specials = torch.tensor([-5.0, -4.0, -3.0, -2.0, -1.0, -0.999999, 0.0, 0.5, 1.0, 2.999999, 3.0, 4.0, 5.5],
                            dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(len(specials), (1, 18, 4, 4), generator=g)
    offset = specials[idx]
    got = modulated_deform_conv2d(x, offset, mask, weight, bias)
    want = _reference_dcn(x, offset, mask, weight, bias, 1, 1, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_non_square_kernel_and_input() -> None:
    x, _, _, _, bias = _random_case(
        seed=11, b=1, cin=2, cout=2, h=4, w=7, k=3, stride=1, padding=1, dilation=1, offset_scale=1.0
    )
    g = torch.Generator().manual_seed(12)
    weight = torch.randn(2, 2, 1, 3, generator=g, dtype=torch.float64)
    ho, wo = _out_size(4, 1, 1, 1, 1), _out_size(7, 3, 1, 1, 1)
    offset = torch.randn(1, 6, ho, wo, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(1, 3, ho, wo, generator=g, dtype=torch.float64)
    got = modulated_deform_conv2d(x, offset, mask, weight, bias)
    want = _reference_dcn(x, offset, mask, weight, bias, 1, 1, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_offset_is_scaled_conv(stride: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    conv = F.conv2d(x, weight, stride=stride, padding=1)
    ho, wo = conv.shape[2:]
    offset = torch.zeros(2, 18, ho, wo, dtype=torch.float64)
    half = torch.full((2, 9, ho, wo), 0.5, dtype=torch.float64)
    one = torch.ones(2, 9, ho, wo, dtype=torch.float64)
    torch.testing.assert_close(modulated_deform_conv2d(x, offset, half, weight, None, stride), 0.5 * conv)
    # The mask scales the sampled columns, not the bias, so the bias is added unscaled.
    torch.testing.assert_close(
        modulated_deform_conv2d(x, offset, half, weight, bias, stride), 0.5 * conv + bias.view(1, -1, 1, 1)
    )
    torch.testing.assert_close(modulated_deform_conv2d(x, offset, one, weight, None, stride), conv)
    torch.testing.assert_close(
        modulated_deform_conv2d(x, offset, one, weight, bias, stride),
        F.conv2d(x, weight, bias, stride=stride, padding=1),
    )


def test_integer_offset_is_shifted_conv() -> None:
    """A uniform integer offset (dy, dx) equals a conv of the zero-padded input shifted by (dy, dx)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 7, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    offset = torch.zeros(1, 18, 7, 7, dtype=torch.float64)
    offset[:, 0::2] = 1.0  # dy
    offset[:, 1::2] = -2.0  # dx
    mask = torch.ones(1, 9, 7, 7, dtype=torch.float64)
    # Tap (a, b) of output (i, j) reads x[i + a, j + b - 3]; with xp = x zero-padded by 3 that is
    # xp[i + a + 3, j + b], i.e. an unpadded conv over the window xp[3:12, 0:9].
    xp = F.pad(x, (3, 3, 3, 3))[:, :, 3:12, 0:9]
    torch.testing.assert_close(modulated_deform_conv2d(x, offset, mask, weight, None), F.conv2d(xp, weight))


@pytest.mark.parametrize("use_bias", [False, True])
def test_pack_at_init_is_half_conv(use_bias: bool) -> None:
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(4, 6, 3, stride=1, padding=1, bias=use_bias)
    if use_bias:
        with torch.no_grad():
            layer.bias.normal_()
    x = torch.randn(2, 4, 10, 9)
    want = 0.5 * F.conv2d(x, layer.weight, padding=1)
    if use_bias:
        want = want + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_pack_stride2_shape_and_init() -> None:
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(3, 5, 3, stride=2, padding=1)
    x = torch.randn(1, 3, 11, 8)
    out = layer(x)
    assert out.shape == (1, 5, 6, 4)
    want = 0.5 * F.conv2d(x, layer.weight, stride=2, padding=1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_pack_parameters_and_init() -> None:
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(8, 16, 3)
    assert set(layer.state_dict()) == {"weight", "conv_offset.weight", "conv_offset.bias"}
    assert layer.bias is None
    assert layer.weight.shape == (16, 8, 3, 3)
    assert layer.conv_offset.weight.shape == (27, 8, 3, 3)
    assert layer.conv_offset.bias.shape == (27,)
    assert torch.count_nonzero(layer.conv_offset.weight) == 0
    assert torch.count_nonzero(layer.conv_offset.bias) == 0
    stdv = 1.0 / math.sqrt(8 * 9)
    assert layer.weight.abs().max() <= stdv
    assert layer.weight.abs().max() > 0.5 * stdv
    with_bias = ModulatedDeformConv2dPack(8, 16, 3, bias=True)
    assert set(with_bias.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert torch.count_nonzero(with_bias.bias) == 0


def test_pack_uses_mmcv_channel_split() -> None:
    """conv_offset channels [0, 2K) are offsets (mmcv: cat of the first two chunks), [2K, 3K) the mask."""
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(2, 3, 3).double()
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(std=0.3)
        layer.conv_offset.bias.normal_()
    raw = layer.conv_offset(x)
    want = _reference_dcn(x, raw[:, :18], torch.sigmoid(raw[:, 18:]), layer.weight, None, 1, 1, 1)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-10)


def test_gradcheck() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    # Integer part in [-2, 2] plus a fraction in [0.2, 0.8]: every sample stays away from the integer grid
    # (and from the -1 / H borders), where bilinear interpolation has kinks.
    whole = torch.randint(-2, 3, (1, 18, 4, 4), generator=g).to(torch.float64)
    frac = 0.2 + 0.6 * torch.rand(1, 18, 4, 4, generator=g, dtype=torch.float64)
    offset = whole + frac
    mask = torch.rand(1, 9, 4, 4, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, offset, mask, weight, bias))
    assert torch.autograd.gradcheck(
        lambda a, o, m, wt, bs: modulated_deform_conv2d(a, o, m, wt, bs), inputs, eps=1e-6, atol=1e-7
    )


def test_gradcheck_stride2() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    whole = torch.randint(-1, 2, (1, 18, 3, 3), generator=g).to(torch.float64)
    offset = whole + 0.2 + 0.6 * torch.rand(1, 18, 3, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(1, 9, 3, 3, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, offset, mask, weight))
    assert torch.autograd.gradcheck(
        lambda a, o, m, wt: modulated_deform_conv2d(a, o, m, wt, None, 2, 1), inputs, eps=1e-6, atol=1e-7
    )


def test_shape_errors() -> None:
    x = torch.randn(1, 2, 5, 5)
    weight = torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="offset"):
        modulated_deform_conv2d(x, torch.zeros(1, 9, 5, 5), torch.ones(1, 9, 5, 5), weight, None)
    with pytest.raises(ValueError, match="mask"):
        modulated_deform_conv2d(x, torch.zeros(1, 18, 5, 5), torch.ones(1, 9, 4, 5), weight, None)
    with pytest.raises(ValueError, match="input channels"):
        modulated_deform_conv2d(torch.randn(1, 3, 5, 5), torch.zeros(1, 18, 5, 5), torch.ones(1, 9, 5, 5),
                                weight, None)


# aot_eager traces forward and backward through dynamo + AOT autograd cheaply; inductor (the default backend)
# additionally generates and compiles C++ (~10-40 s cold on a small CPU, cached afterwards).
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(3, 4, 3, stride=1, padding=1, bias=True)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(std=0.5)
        layer.conv_offset.bias.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 3, 8, 7, requires_grad=True)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    want = layer(x)
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    got = compiled(x)
    (gx_got,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx_got, gx_want, rtol=1e-4, atol=1e-4)


def test_non_contiguous_offset_and_mask() -> None:
    x, offset, mask, weight, bias = _random_case(
        seed=21, b=1, cin=2, cout=2, h=5, w=5, k=3, stride=1, padding=1, dilation=1, offset_scale=1.5
    )
    # Same values, stored transposed in memory.
    offset_nc = offset.transpose(2, 3).contiguous().transpose(2, 3)
    mask_nc = mask.transpose(2, 3).contiguous().transpose(2, 3)
    assert not offset_nc.is_contiguous() and not mask_nc.is_contiguous()
    torch.testing.assert_close(
        modulated_deform_conv2d(x, offset_nc, mask_nc, weight, bias),
        modulated_deform_conv2d(x, offset, mask, weight, bias),
        rtol=0, atol=0,
    )
