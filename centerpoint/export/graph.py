"""The module an export traces: uint8 images in, the network's head maps or decoded detections out.

Normalisation, the network (BatchNorm in eval mode), the flip test when the spec asks for it and, with
decoding, the 3x3 peak test and top-k are all inside, written with the same functions as the PyTorch
predict step (`step.make_heads_step`, `decode.decode_heatmap`), in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from centerpoint.checkpoint import Checkpoint
from centerpoint.evaluation.decode import decode_heatmap
from centerpoint.evaluation.predict import load_model
from centerpoint.model import build_network
from centerpoint.runtime.devices import select_backend
from centerpoint.spec import ExperimentSpec
from centerpoint.spec_io import with_updates
from centerpoint.step import make_heads_step

DECODED = ("boxes", "scores", "labels")
HEADS = ("heatmap", "wh", "offset")


class ExportedDetector(nn.Module):
    """images (B, 3, S, S) uint8 RGB -> with decode: boxes (B, k, 4) float32 x1 y1 x2 y2 in input pixels,
    scores (B, k) float32 (descending), labels (B, k) int64; without: heatmap probabilities (B, C, S/4, S/4),
    wh and offset (B, 2, S/4, S/4) in feature cells (stride 4)."""

    def __init__(self, net: nn.Module, spec: ExperimentSpec, decode: bool) -> None:
        super().__init__()
        self.net = net.eval()
        self.decode = decode
        self.stride, self.k = spec.model.stride, spec.eval.topk
        self.heads = make_heads_step(lambda params, buffers, x, train: (self.net(x), buffers), spec)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        heatmap, wh, offset = self.heads({}, {}, images)
        if not self.decode:
            return heatmap, wh, offset
        return decode_heatmap(heatmap, wh, offset, self.stride, k=self.k)


def exported_detector(ckpt: Checkpoint, decode: bool) -> ExportedDetector:
    """The checkpoint's network on the cpu, its tensors checked against the spec's architecture."""
    spec = ckpt.spec
    # fp32 whatever the run trained in: the graph is the reference computation, and a cpu has no fp16.
    _, params, buffers = load_model(with_updates(spec, {"runtime.precision": "fp32"}), ckpt, select_backend("cpu"))
    net = build_network(spec.model)
    net.load_state_dict({**params, **buffers}, strict=True)
    return ExportedDetector(net, spec, decode).eval()


def example_images(batch: int, size: int) -> Tensor:
    """A (batch, 3, size, size) uint8 input to trace with (its values do not matter)."""
    return torch.zeros(batch, 3, size, size, dtype=torch.uint8)
