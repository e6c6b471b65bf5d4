"""The CenterNet network as pure functions: `init(spec, seed) -> (params, buffers)` and `apply(...)`, put
together for a device by `build_model` (training, evaluation, prediction and the benchmarks all use it).

The nn.Module tree is only the structure (it fixes the state_dict names, identical to mmdetection's);
parameters and BatchNorm statistics are flat dicts of tensors owned by the caller's train state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from centerpoint.nn.head import CenterNetHead
from centerpoint.nn.neck import CTResNetNeck
from centerpoint.nn.resnet import resnet
from centerpoint.spec import ModelSpec
from centerpoint.state import Tree

Apply = Callable[[Tree, Tree, Tensor, bool], tuple[dict[str, Tensor], Tree]]


class CenterNet(nn.Module):
    """backbone (ResNet) -> neck (CTResNetNeck) -> bbox_head (CenterNetHead); output stride 4."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = resnet(spec.depth, spec.width, spec.zero_init_residual)
        self.neck = CTResNetNeck(self.backbone.out_channels, spec.neck_channels, spec.dcn)
        self.bbox_head = CenterNetHead(self.neck.out_channels, spec.num_classes, spec.head_channels)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.bbox_head(self.neck(self.backbone(images)))


def build_network(spec: ModelSpec) -> CenterNet:
    """The structure; its own tensors are only templates (names, shapes, init)."""
    return CenterNet(spec)


def init(spec: ModelSpec, seed: int) -> tuple[Tree, Tree]:
    """Fresh (params, buffers) for `spec`, a pure function of the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(spec)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
    return params, buffers


@dataclass(frozen=True)
class Model:
    """A network ready to run on a device: its structure, its apply function and a fresh init."""

    net: nn.Module  # structure only: holds no training state (`make_apply` swaps the tensors in per call)
    apply: Apply
    params: Tree  # from `init`, on the cpu: the caller places them (in its train state)
    buffers: Tree


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", *, seed: int = 0, traced: bool = False,
                channels_last: bool = False, convert: Callable[[nn.Module], nn.Module] | None = None) -> Model:
    """The network for `spec` on `device` with its apply function and fresh (params, buffers).

    traced: apply will run under torch.compile or torch.func transforms (see `make_apply`).
    channels_last: the structure's own templates in channels-last memory format.
    convert: applied to the network on the device before anything else (e.g. SyncBatchNorm layers).
    (model.pretrained weights are the training run's to load: `weights.foreign.load_torchvision_backbone`.)
    """
    net = build_network(spec).to(device)
    if convert is not None:
        net = convert(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    params, buffers = init(spec, seed)
    return Model(net, make_apply(net, traced=traced), params, buffers)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(B, 3, H, W) RGB in 0..255 (uint8 or float) -> float32 (x - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() - m) / s


def make_apply(net: nn.Module, traced: bool = True) -> Apply:
    """apply(params, buffers, images, train) -> (outputs, new_buffers).

    images: normalised (B, 3, H, W) float. outputs: heatmap logits (B, C, H/4, W/4), wh and offset
    (B, 2, H/4, W/4) in feature cells. In train mode BatchNorm updates running statistics; it writes them
    into the dict it is given, so a clone goes in and the updated clone comes out (inputs stay untouched).

    traced: the caller may run apply under torch.compile or torch.func transforms; it then goes through
    `torch.func.functional_call`. traced=False (eager steps) swaps the tensors into the modules' own
    parameter/buffer slots directly and back out after the call: the same computation without
    functional_call's per-call checks and setattr walk (~1 ms a call for the R18 network on a cpu).
    Either way the module keeps none of the tensors it is given.
    """
    slots = _slots(net) if not traced else {}

    def set_mode(train: bool) -> None:
        # train() walks every module: skip it when nothing changes (eager only: under torch.compile the
        # flag would be one more guard to recompile on).
        if traced or net.training is not train:
            net.train(train)

    def swapped(params: Tree, buffers: Tree, images: Tensor) -> dict[str, Tensor]:
        saved = []
        try:
            for tree in (params, buffers):
                for k, v in tree.items():
                    table, attr = slots[k]
                    saved.append((table, attr, table[attr]))
                    table[attr] = v
            return net(images)
        finally:
            for table, attr, old in saved:
                table[attr] = old

    def apply(params: Tree, buffers: Tree, images: Tensor, train: bool) -> tuple[dict[str, Tensor], Tree]:
        set_mode(train)
        new_buffers = {k: v.clone() for k, v in buffers.items()} if train else buffers
        if traced:
            outputs = functional_call(net, (params, new_buffers), (images,), strict=True)
        else:
            if len(params) + len(new_buffers) != len(slots):  # (an unknown name fails in `swapped`)
                missing = sorted(slots.keys() - params.keys() - new_buffers.keys())[:3]
                raise KeyError(f"apply: params/buffers do not match the network (missing e.g. {missing})")
            outputs = swapped(params, new_buffers, images)
        return outputs, new_buffers

    return apply


def _slots(net: nn.Module) -> dict[str, tuple[dict, str]]:
    """dotted name -> (the owning module's _parameters or _buffers dict, attribute name)."""
    slots: dict[str, tuple[dict, str]] = {}
    for module_name, module in net.named_modules():
        prefix = module_name + "." if module_name else ""
        for table in (module._parameters, module._buffers):
            for attr, value in table.items():
                if value is not None:
                    slots[prefix + attr] = (table, attr)
    return slots
