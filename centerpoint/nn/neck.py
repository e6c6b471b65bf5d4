"""CTResNetNeck: three (3x3 conv + BN + ReLU, 4x4 stride-2 deconv + BN + ReLU) stages, /32 -> /4.

Module names follow mmdetection (`deconv_layers.{0..5}.{conv,bn}`) so its checkpoints load by name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU, named `conv` and `bn` like mmcv's ConvModule."""

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


def bilinear_kernel_(weight: Tensor) -> None:
    """Fill `weight[:, 0]` of a (Cin, Cout, 4, 4) deconv with the bilinear upsampling kernel, in place.

    The kernel is the outer product of [.25, .75, .75, .25]; like mmdetection, only output channel 0 of
    each input channel gets it, the rest keep their default initialisation.
    """
    k = weight.shape[-1]
    f = (k + 1) // 2
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    ramp = 1 - (torch.arange(k, dtype=torch.float64) / f - c).abs()
    with torch.no_grad():
        weight[:, 0] = torch.outer(ramp, ramp).to(weight.dtype)


class CTResNetNeck(nn.Module):
    """(B, Cin, H/32, W/32) -> (B, channels[-1], H/4, W/4)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (256, 128, 64), dcn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for out in channels:
            if dcn:
                from centerpoint.nn.dcn import ModulatedDeformConv2dPack

                conv: nn.Module = ModulatedDeformConv2dPack(in_channels, out, 3, padding=1, bias=False)
            else:
                conv = nn.Conv2d(in_channels, out, 3, padding=1, bias=False)
            layers.append(ConvBNReLU(conv, out))
            deconv = nn.ConvTranspose2d(out, out, 4, stride=2, padding=1, bias=False)
            bilinear_kernel_(deconv.weight)
            layers.append(ConvBNReLU(deconv, out))
            in_channels = out
        self.deconv_layers = nn.Sequential(*layers)
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv_layers(x)
