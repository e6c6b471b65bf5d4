"""CenterNetHead: heatmap / wh / offset branches, each 3x3 conv -> ReLU -> 1x1 conv.

Names follow mmdetection: `heatmap_head.{0,2}`, `wh_head.{0,2}`, `offset_head.{0,2}`.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

HEATMAP_PRIOR = 0.1


def _branch(in_channels: int, feat_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, feat_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(feat_channels, out_channels, 1),
    )


class CenterNetHead(nn.Module):
    """(B, Cin, h, w) features -> heatmap logits (B, num_classes, h, w), wh (B, 2, h, w), offset (B, 2, h, w).

    wh is the box size and offset the sub-cell centre offset, both in feature-map cells.
    """

    def __init__(self, in_channels: int, num_classes: int, feat_channels: int = 64) -> None:
        super().__init__()
        self.heatmap_head = _branch(in_channels, feat_channels, num_classes)
        self.wh_head = _branch(in_channels, feat_channels, 2)
        self.offset_head = _branch(in_channels, feat_channels, 2)
        # Start every cell at the prior probability so the focal loss does not explode on step one.
        nn.init.constant_(self.heatmap_head[2].bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        for branch in (self.wh_head, self.offset_head):
            for m in branch.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.001)
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"heatmap": self.heatmap_head(x), "wh": self.wh_head(x), "offset": self.offset_head(x)}
