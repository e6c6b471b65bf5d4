"""Modulated deformable convolution (DCNv2) in plain torch, with mmcv `ModulatedDeformConv2dPack` semantics.

No custom ops: sampling is one `F.grid_sample` call (bilinear, zero padding), the taps are stacked into
im2col columns and contracted with the weight by one batched matmul. Everything is differentiable through
autograd and traceable by `torch.compile`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModulatedDeformConv2dPack", "modulated_deform_conv2d"]


def _tap_coords(
    offset: Tensor, kh: int, kw: int, stride: int, padding: int, dilation: int
) -> tuple[Tensor, Tensor]:
    """Absolute sampling coordinates in input pixels for every output position and kernel tap.

    Args:
        offset: (B, 2*kh*kw, Ho, Wo), mmcv layout: channel 2k is the row (y) offset of tap k, 2k+1 the
            column (x) offset; taps are row-major over (kh, kw).

    Returns:
        (ys, xs), each (B, kh*kw, Ho, Wo): y = i*stride - padding + a*dilation + dy (same for x).
    """
    b, _, ho, wo = offset.shape
    k = kh * kw
    off = offset.reshape(b, k, 2, ho, wo)  # reshape: callers may pass non-contiguous slices
    opts = {"dtype": offset.dtype, "device": offset.device}
    # Regular conv grid: output row/col origin plus the tap's dilated displacement.
    base_y = torch.arange(ho, **opts) * stride - padding  # (Ho,)
    base_x = torch.arange(wo, **opts) * stride - padding  # (Wo,)
    tap_y = (torch.arange(kh, **opts) * dilation).repeat_interleave(kw)  # (K,) row-major taps
    tap_x = (torch.arange(kw, **opts) * dilation).repeat(kh)  # (K,)
    ys = base_y.view(1, 1, ho, 1) + tap_y.view(1, k, 1, 1) + off[:, :, 0]
    xs = base_x.view(1, 1, 1, wo) + tap_x.view(1, k, 1, 1) + off[:, :, 1]
    return ys, xs


def modulated_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
) -> Tensor:
    """DCNv2 forward (single offset group, groups=1), matching mmcv `modulated_deform_conv2d`.

    Each tap samples x bilinearly at its offset position; a sample partly outside the image keeps only its
    in-image corners (zero padding), and one at y <= -1, y >= H, x <= -1 or x >= W is 0. This is exactly
    bilinear interpolation of the zero-padded image, i.e. `grid_sample(padding_mode="zeros")`.

    Args:
        x: (B, Cin, H, W) input.
        offset: (B, 2*kh*kw, Ho, Wo) offsets in input pixels, (dy, dx) interleaved per tap (mmcv layout).
        mask: (B, kh*kw, Ho, Wo) modulation, already passed through a sigmoid.
        weight: (Cout, Cin, kh, kw).
        bias: (Cout,) or None.

    Returns:
        (B, Cout, Ho, Wo) with Ho = (H + 2*padding - dilation*(kh-1) - 1) // stride + 1 (same for Wo).
    """
    b, cin, h, w = x.shape
    cout, wcin, kh, kw = weight.shape
    k = kh * kw
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    if wcin != cin:
        raise ValueError(f"weight expects {wcin} input channels, x has {cin}")
    if tuple(offset.shape) != (b, 2 * k, ho, wo):
        raise ValueError(f"offset must be {(b, 2 * k, ho, wo)}, got {tuple(offset.shape)}")
    if tuple(mask.shape) != (b, k, ho, wo):
        raise ValueError(f"mask must be {(b, k, ho, wo)}, got {tuple(mask.shape)}")

    ys, xs = _tap_coords(offset, kh, kw, stride, padding, dilation)
    # grid_sample(align_corners=False) maps normalised g to pixel ((g + 1) * size - 1) / 2; invert that so
    # pixel p lands exactly on p. Taps are stacked along the grid's row axis: one sampling call for all.
    gx = (2.0 * xs + 1.0) / w - 1.0
    gy = (2.0 * ys + 1.0) / h - 1.0
    grid = torch.stack((gx, gy), dim=-1).view(b, k * ho, wo, 2)
    cols = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    # (B, Cin, K*Ho, Wo) -> modulate per tap -> (B, Cin*K, Ho*Wo); Cin-major then tap matches weight.view.
    cols = cols.view(b, cin, k, ho, wo) * mask.reshape(b, 1, k, ho, wo).to(x.dtype)
    cols = cols.view(b, cin * k, ho * wo)
    # bmm against an expanded (not copied) weight: torch.matmul on (Cout, N) @ (B, N, L) instead folds the
    # batch by materialising cols transposed, an extra full copy of the largest tensor (measured slower).
    out = torch.bmm(weight.reshape(1, cout, cin * k).expand(b, cout, cin * k), cols)  # (B, Cout, Ho*Wo)
    if bias is not None:
        out = out + bias.view(1, cout, 1)
    return out.view(b, cout, ho, wo)


class ModulatedDeformConv2dPack(nn.Module):
    """DCNv2 layer that predicts its own offsets and mask, named like mmcv so its state_dicts load.

    Parameters: `weight` (Cout, Cin, k, k), `bias` (Cout,) or None, and `conv_offset` (a Conv2d to
    3*k*k channels) initialised to zero, so a fresh layer is 0.5 * a plain conv (sigmoid(0) = 0.5).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            # Registered as None (as mmcv does) so "bias" is absent from the state_dict.
            self.register_parameter("bias", None)
        k2 = kernel_size * kernel_size
        self.conv_offset = nn.Conv2d(
            in_channels, 3 * k2, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=True
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv init: weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias 0, offset/mask conv all zero."""
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size * self.kernel_size)
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        # Zero offsets start the layer as a regular conv, so training begins from a sane point.
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
        out = self.conv_offset(x)
        # mmcv splits the 3k² channels into two offset halves and a mask third, then re-concatenates the
        # halves: that (not a per-tap split) is what pretrained conv_offset weights were trained against.
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return modulated_deform_conv2d(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}"
        )
