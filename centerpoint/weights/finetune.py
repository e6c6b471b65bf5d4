"""Fine-tuning: start a run's model from another checkpoint (`model.init_from`).

Every tensor of the checkpoint whose name and shape match the new model's is loaded; the others keep
their fresh initialisation. When the class count differs that is the heatmap head's last layer, which
then starts as a new head does (weights at the default init, bias at the prior probability's logit), so
the focal loss starts where it would from scratch. The optimizer state, step and schedule start afresh.
A checkpoint with an EMA of its weights (train.ema_decay) gives those, the weights eval and predict use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from centerpoint.errors import CenterpointError

Params = dict[str, Tensor]
HEATMAP_OUT = "bbox_head.heatmap_head.2."  # the heatmap head's last conv: one output channel per class


def _names(names: list[str], limit: int = 3) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def merge(source: Params, params: Params, buffers: Params) -> tuple[Params, Params, dict[str, list[str]]]:
    """(params, buffers) with every tensor of `source` whose name and shape match put in (cast to the
    template's dtype and device), and what happened: 'loaded', 'reinit' (kept fresh: absent from the source
    or of another shape there) and 'ignored' (source tensors whose name the model does not have)."""
    template = {**params, **buffers}
    fits = {k for k, v in source.items() if k in template and tuple(v.shape) == tuple(template[k].shape)}

    def put(tree: Params) -> Params:
        return {k: source[k].to(dtype=v.dtype, device=v.device).clone() if k in fits else v for k, v in tree.items()}

    report = {"loaded": sorted(fits), "reinit": sorted(set(template) - fits),
              "ignored": sorted(set(source) - set(template))}
    return put(params), put(buffers), report


def describe(path: Path, report: dict[str, list[str]]) -> str:
    """The one line a run prints about what `model.init_from` loaded, re-initialised and ignored."""
    loaded, reinit, ignored = report["loaded"], report["reinit"], report["ignored"]
    text = f"model.init_from {path}: loaded {len(loaded)} tensors"
    if reinit:
        why = " (the class count differs)" if reinit and all(k.startswith(HEATMAP_OUT) for k in reinit) else ""
        text += f", re-initialised {len(reinit)}{why}: {_names(reinit)}"
    else:
        text += ", re-initialised none"
    return text + (f", ignored {len(ignored)}: {_names(ignored)}" if ignored else ", ignored none")


def init_from(path: Path, params: Params, buffers: Params, say: Callable[[str], object] | None = None
              ) -> tuple[Params, Params]:
    """`model.init_from`: (params, buffers) started from the checkpoint at `path` (see the module doc).
    A file that gives under half of the model's parameters (by count) is an error: the wrong file, or
    another network (whose biases alone may fit)."""
    from centerpoint.checkpoint import load_checkpoint, require_single_model

    path = Path(path)
    if path.suffix == ".pth":
        raise CenterpointError(f"model.init_from {path}: a .pth file; convert it first with `centerpoint checkpoint "
                               "import mmdet FILE.pth OUT.safetensors` and start from OUT.safetensors")
    if not path.is_file():
        raise CenterpointError(f"model.init_from: checkpoint not found: {path}")
    ckpt = load_checkpoint(path)
    require_single_model(ckpt, "model.init_from")
    source = {**ckpt.group("params"), **ckpt.group("buffers"), **ckpt.group("ema")}  # its EMA weights, if any
    params, buffers, report = merge(source, params, buffers)
    loaded = sum(params[k].numel() for k in report["loaded"] if k in params)
    if loaded * 2 < sum(v.numel() for v in params.values()):
        raise CenterpointError(f"model.init_from {path}: fits under half of this model's parameters ({loaded:,} "
                               "loaded): another network (model.depth, width, neck_channels, head_channels or dcn "
                               "differ from the checkpoint's spec)")
    if say is not None:
        say(describe(path, report))
    return params, buffers
