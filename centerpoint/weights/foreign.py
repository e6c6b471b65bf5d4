"""Foreign weights into the model: mmdetection CenterNet checkpoints and torchvision ResNet backbones.

The project's parameter and buffer names are mmdetection's, so an mmdetection state_dict maps one to one,
and a torchvision ResNet maps by prefixing `backbone.` (its classifier `fc.*` is dropped). `.pth` files
are read with `torch.load(weights_only=True)`: tensors and plain containers only, never code.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from centerpoint.checkpoint import check_compatible, save_checkpoint
from centerpoint.classes import Classes
from centerpoint.errors import CenterpointError, first_line
from centerpoint.spec import ExperimentSpec
from centerpoint.spec_io import load_spec
from centerpoint.state import Tree
from centerpoint.weights.published import resolve_weights, verify_name_hash

__all__ = ["ImportResult", "default_recipe", "import_mmdet", "load_torchvision_backbone", "read_state_dict"]

RECIPES = {False: "centernet_r18_coco.yaml", True: "centernet_r18_dcn_coco.yaml"}
_OPTIONAL = ".num_batches_tracked"  # a BatchNorm counter older torchvision files lack; unused in training


def read_state_dict(path: Path) -> tuple[Tree, dict[str, Any]]:
    """(state_dict, meta) of a `.pth` file: mmdetection's {"state_dict": ..., "meta": ...} or a bare
    state_dict (torchvision). A pickle that needs code to load is refused, naming what it asked for."""
    if Path(path).stat().st_size == 0:
        raise CenterpointError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint; download it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if needed:
            raise CenterpointError(f"{path}: refusing to load, the file needs code to unpickle ({needed.group(1)}); "
                                   "only plain tensors and containers are read. Re-save its state_dict with "
                                   "plain types (torch.save({'state_dict': sd}, ...)) where you trust it") from None
        raise CenterpointError(f"{path}: not a readable PyTorch checkpoint (corrupt, truncated or another "
                               "format?)") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse foreign bytes: not a checkpoint
        raise CenterpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(err, 100)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd, meta = obj["state_dict"], obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    elif isinstance(obj, dict):
        sd, meta = obj, {}
    else:
        raise CenterpointError(f"{path}: expected a dict of tensors or {{'state_dict': ...}}, got "
                               f"{type(obj).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CenterpointError(f"{path}: state_dict entry {bad[0]!r} is not a named tensor "
                               f"({len(bad)} such entries); is this a model checkpoint?")
    return dict(sd), meta


def _fill(source: str, got: Tree, params: Tree, buffers: Tree, optional: str | None = None
          ) -> tuple[Tree, Tree]:
    """Check `got` against the union of `params` and `buffers` (names and shapes) and return copies of
    both with every tensor of `got` put in, cast to the template's dtype and device."""
    expected = {**params, **buffers}
    if optional:
        expected = {k: v for k, v in expected.items() if k in got or not k.endswith(optional)}
    check_compatible(source, got, expected)

    def put(tree: Tree) -> Tree:
        return {k: got[k].to(dtype=v.dtype, device=v.device).contiguous() if k in got else v
                for k, v in tree.items()}

    return put(params), put(buffers)


def load_torchvision_backbone(path: Path | str, params: Tree, buffers: Tree) -> tuple[Tree, Tree]:
    """ImageNet initialisation: put a torchvision ResNet state_dict into `backbone.*` of (params, buffers).

    `path` is a local file, an http(s) URL, or the bare name of a published file
    (`resnet18-f37072fd.pth`), fetched into the cache when missing. The sha256 prefix in the file name
    is checked; every backbone tensor must be present with the right shape (`fc.*` is ignored).
    """
    file = resolve_weights(path, "model.pretrained")
    verify_name_hash(file)
    sd, _ = read_state_dict(file)
    mapped = {"backbone." + k: v for k, v in sd.items() if not k.startswith("fc.")}
    backbone_params = {k: v for k, v in params.items() if k.startswith("backbone.")}
    backbone_buffers = {k: v for k, v in buffers.items() if k.startswith("backbone.")}
    new_p, new_b = _fill(f"model.pretrained {file} (torchvision ResNet)", mapped, backbone_params,
                         backbone_buffers, optional=_OPTIONAL)
    return {**params, **new_p}, {**buffers, **new_b}


@dataclass(frozen=True)
class ImportResult:
    """What `import_mmdet` read and wrote."""

    source: Path
    destination: Path
    spec_path: Path
    spec: ExperimentSpec
    num_tensors: int
    sha256_prefix: str | None  # checked against the file name; None when the name carries none


def default_recipe(dcn: bool) -> Path:
    """The project's COCO recipe for the plain or DCN model (`experiments/centernet_r18[_dcn]_coco.yaml`)."""
    path = Path(__file__).resolve().parents[2] / "experiments" / RECIPES[dcn]
    if not path.is_file():
        raise CenterpointError(f"recipe {RECIPES[dcn]} not found next to the package ({path}); pass --spec")
    return path


def mmdet_classes(meta: dict[str, Any], num_classes: int | None) -> Classes | None:
    """The class names an mmdetection checkpoint records (2.x: meta CLASSES, 3.x: meta dataset_meta.classes),
    when they are as many strings as the model has classes; their COCO ids are not recorded there."""
    dataset_meta = meta.get("dataset_meta")
    names = meta.get("CLASSES") or (dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None)
    if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return Classes(tuple(names))
    return None


def import_mmdet(src: Path | str, dst: Path, spec_path: Path | None = None) -> ImportResult:
    """Convert an mmdetection CenterNet checkpoint into a centerpoint checkpoint at step 0.

    The model is built from `spec_path` (default: the COCO recipe, the DCN one when the file has
    `conv_offset` tensors); every tensor name and shape must match it exactly. The result carries that
    spec and a fresh optimizer state, so `eval` and `predict` use it directly.
    """
    from centerpoint.model import init
    from centerpoint.optim.plan import build_optimizer
    from centerpoint.state import init_state

    file = resolve_weights(src, "checkpoint import")
    if Path(dst).resolve() == file.resolve():
        raise CenterpointError(f"{dst}: the destination is the source file; choose another name")
    prefix = verify_name_hash(file)
    sd, meta = read_state_dict(file)
    dcn = any(".conv_offset." in k for k in sd)
    spec_path = Path(spec_path) if spec_path is not None else default_recipe(dcn)
    spec = load_spec(spec_path)
    params, buffers = init(spec.model, spec.train.seed)
    what = (f"{file} (checked against {spec_path}: model.dcn={spec.model.dcn}, "
            f"num_classes={spec.model.num_classes})")
    params, buffers = _fill(what, sd, params, buffers)
    plan = build_optimizer(spec, steps_per_epoch=1, global_batch=spec.train.batch_size)
    save_checkpoint(Path(dst), init_state(params, buffers, plan.transform), spec, epoch=0,
                    classes=mmdet_classes(meta, spec.model.num_classes))
    return ImportResult(file, Path(dst), spec_path, spec, len(sd), prefix)
