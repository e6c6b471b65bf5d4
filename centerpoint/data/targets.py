"""Training targets for CenterNet: per-class gaussian heatmaps plus size/offset regression maps.

Semantics follow mmdetection's ``CenterNetHead.get_targets`` (gaussian radius, ``int()`` truncation,
``gaussian2D`` threshold, window clipping), but everything is computed for all boxes of all images at
once, with no Python loop over objects or images.

Units: boxes come in INPUT pixels (the network input after resize/pad); every output is on the
feature map, in feature-map CELLS (``cell = pixel / stride``).
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from centerpoint.errors import CenterpointError

Allocator = Callable[[tuple[int, ...]], Tensor]  # shape -> uninitialised float32 tensor


def gaussian_radius(h: Tensor, w: Tensor, min_overlap: float = 0.3) -> Tensor:
    """Largest centre displacement that keeps IoU >= ``min_overlap`` for a box of size ``(h, w)``.

    Elementwise over broadcastable ``h`` and ``w`` (box height/width in feature-map cells). Uses the
    corrected three-root formula from mmdetection (the three cases: both corners move inwards, both
    outwards, one each) and returns the smallest root, in cells, with the dtype of ``h * w``.
    For ``0 < min_overlap < 1`` and non-negative sizes every discriminant is >= 0, so no NaN.
    """
    o = min_overlap
    # Case 1: one corner inside the GT box, one outside.
    b1 = h + w
    c1 = w * h * (1 - o) / (1 + o)
    r1 = (b1 - torch.sqrt(b1 * b1 - 4 * c1)) / 2
    # Case 2: both corners inside the GT box.
    b2 = 2 * (h + w)
    c2 = (1 - o) * w * h
    r2 = (b2 - torch.sqrt(b2 * b2 - 16 * c2)) / 8
    # Case 3: both corners outside the GT box.
    a3 = 4 * o
    b3 = -2 * o * (h + w)
    c3 = (o - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 * b3 - 4 * a3 * c3)) / (2 * a3)
    return torch.minimum(torch.minimum(r1, r2), r3)


def _check_inputs(boxes: Tensor, labels: Tensor, num_classes: int, feat_hw: tuple[int, int],
                  stride: int, min_overlap: float) -> None:
    """Raise ``CenterpointError`` for malformed inputs (shapes, sizes, label range)."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise CenterpointError(
            f"make_targets: boxes must have shape (B, N, 4) xyxy, got {tuple(boxes.shape)}"
        )
    if labels.shape != boxes.shape[:2]:
        raise CenterpointError(
            f"make_targets: labels shape {tuple(labels.shape)} must equal boxes shape[:2] "
            f"{tuple(boxes.shape[:2])}"
        )
    if num_classes < 1 or stride < 1 or min(feat_hw) < 1:
        raise CenterpointError(
            f"make_targets: num_classes ({num_classes}), stride ({stride}) and feat_hw {feat_hw} "
            "must all be positive"
        )
    if not 0.0 < min_overlap < 1.0:
        raise CenterpointError(f"make_targets: min_overlap must be in (0, 1), got {min_overlap}")
    # One host sync, acceptable in the data pipeline: an out-of-range label would otherwise be
    # written silently into another image's channels by the flattened index below.
    if labels.numel() > 0 and int(labels.max()) >= num_classes:
        raise CenterpointError(
            f"make_targets: label {int(labels.max())} >= num_classes ({num_classes}); labels must be "
            "in [0, num_classes) or negative for padding"
        )


def _geometry(boxes: Tensor, stride: int, min_overlap: float) -> tuple[Tensor, ...]:
    """(B, N, 4) xyxy input pixels -> centres cx, cy (cells, float64), sizes bw, bh (cells, float64) and
    the gaussian radius (whole cells, float32) of every object."""
    # float64 for geometry: floor() of the centre and int() of the radius are discontinuous, so
    # float32 rounding could move a centre cell or radius versus a Python-float reference.
    bx = boxes.to(torch.float64) / stride
    cx = (bx[..., 0] + bx[..., 2]) / 2  # (B, N) cells
    cy = (bx[..., 1] + bx[..., 3]) / 2
    # Inverted boxes are treated as zero-size, which also keeps the radius formula real.
    bw = (bx[..., 2] - bx[..., 0]).clamp(min=0)
    bh = (bx[..., 3] - bx[..., 1]).clamp(min=0)
    # torch.trunc == Python int() for the non-negative radii; negatives clamp to 0 like max(0, .).
    radius = torch.trunc(gaussian_radius(bh, bw, min_overlap)).clamp(min=0).to(torch.float32)
    return cx, cy, bw, bh, radius


def max_radius(boxes: Tensor, labels: Tensor, num_classes: int, feat_hw: tuple[int, int], stride: int,
               min_overlap: float = 0.3) -> int:
    """Check the inputs of `make_targets` and return the batch's largest gaussian radius (cells): what
    it needs to know on the host. A data loader worker computes it on its cpu copy of the boxes, so that
    `make_targets(..., max_radius=..., check_labels=False)` on the device never waits for the device."""
    _check_inputs(boxes, labels, num_classes, feat_hw, stride, min_overlap)
    radius = _geometry(boxes, stride, min_overlap)[4]
    return int(radius.max()) if radius.numel() > 0 else 0


def _render_heatmap(cx_int: Tensor, cy_int: Tensor, radius: Tensor, labels: Tensor, num_classes: int,
                    feat_hw: tuple[int, int], heat: Tensor, half: int | None = None) -> None:
    """Write the per-class max of all objects' gaussians into ``heat``, a zeroed ``(B, C, H, W)`` float32.

    ``cx_int``/``cy_int`` ``(B, N)`` int64 centre cells inside the map, ``radius`` ``(B, N)`` float32
    whole cells, ``labels`` ``(B, N)`` with ``< 0`` for padding. Each object gets
    ``exp(-(dx^2 + dy^2) / (2 sigma^2))``, ``sigma = (2r + 1) / 6``, on cells with ``|dx|, |dy| <= r``
    (mmdet's gen_gaussian_target window, clipped by the map border). ``half``: the largest radius, or
    any bound above it (None: read from ``radius``, a host sync).
    """
    b = labels.shape[0]
    h_map, w_map = feat_hw
    dev = labels.device
    # Render each object on a window of (2R+1)^2 cells, R = the batch's largest radius (one host
    # sync), instead of the whole map. The window is shifted to lie inside the map and shrunk to
    # the map side when larger, so it always covers the object's clipped (2r+1)^2 square and never
    # costs more than the full map.
    if half is None:
        half = int(radius.max()) if radius.numel() > 0 else 0
    sx, sy = min(2 * half + 1, w_map), min(2 * half + 1, h_map)
    xs = (cx_int - half).clamp(0, w_map - sx)[..., None] + torch.arange(sx, device=dev)  # (B, N, Sx)
    ys = (cy_int - half).clamp(0, h_map - sy)[..., None] + torch.arange(sy, device=dev)  # (B, N, Sy)
    dx = xs - cx_int[..., None]
    dy = ys - cy_int[..., None]
    r = radius[..., None]
    in_x, in_y = dx.abs() <= r, dy.abs() <= r

    dx2, dy2 = (dx * dx).to(torch.float32), (dy * dy).to(torch.float32)
    sigma = ((2 * radius + 1) / 6)[..., None, None]  # (B, N, 1, 1)
    gauss = torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2 * sigma * sigma))  # (B, N, Sy, Sx)
    # mmdet's gaussian2D zeroes values below eps * max (max = exp(0) = 1); inside the window the
    # smallest value is exp(-9), so this never fires, but it is kept for exact semantics.
    keep = (in_y[..., :, None] & in_x[..., None, :] & (labels >= 0)[..., None, None]
            & (gauss >= torch.finfo(torch.float32).eps))

    # One flat scatter-amax over (image, class, y, x), straight into the output. A dropped cell sends 0
    # to cell 0, which changes nothing (every value is >= 0), so there is no data-dependent boolean
    # indexing and no extra slot (the output can be any preallocated buffer).
    plane = torch.arange(b, device=dev)[:, None] * num_classes + labels.clamp(min=0)  # (B, N)
    flat = (plane[..., None, None] * h_map + ys[..., :, None]) * w_map + xs[..., None, :]
    flat = torch.where(keep, flat, torch.zeros_like(flat))
    gauss = torch.where(keep, gauss, torch.zeros_like(gauss))
    heat.view(-1).scatter_reduce_(0, flat.reshape(-1), gauss.reshape(-1), "amax")


def make_targets(boxes: Tensor, labels: Tensor, num_classes: int, feat_hw: tuple[int, int], stride: int,
                 min_overlap: float = 0.3, empty: Allocator | None = None, max_radius: int | None = None,
                 check_labels: bool = True, zeros: Allocator | None = None) -> dict[str, Tensor]:
    """Render CenterNet targets for a padded batch of boxes.

    Args:
        boxes: ``(B, N, 4)`` float, ``x1, y1, x2, y2`` in input pixels.
        labels: ``(B, N)`` int64 class ids in ``[0, num_classes)``; ``label < 0`` marks padding, which is
            ignored entirely.
        num_classes: number of heatmap channels ``C``.
        feat_hw: feature-map size ``(H, W)`` in cells.
        stride: input pixels per feature-map cell.
        min_overlap: IoU used by :func:`gaussian_radius`.
        empty: ``empty(shape)`` returns the uninitialised float32 tensor an output is written into (e.g. one
            in shared memory, saving a data loader worker a copy of every batch); default ``torch.empty``
            on the boxes' device.
        max_radius: the batch's largest gaussian radius (see :func:`max_radius`), None to read it here.
        check_labels: check shapes and the label range here (one host sync); False when the caller did.
        zeros: ``zeros(shape)`` returns a zero-filled float32 tensor for the heatmap (e.g. fresh shared
            memory, which the kernel hands out zeroed: no second pass over ~5 MB per image); default
            ``empty(shape).zero_()``.

    Returns:
        ``heatmap`` ``(B, C, H, W)`` float32 in [0, 1], exactly 1 at each object's centre cell;
        ``wh`` ``(B, 2, H, W)`` float32 box ``(w, h)`` in cells at the centre cell;
        ``offset`` ``(B, 2, H, W)`` float32 ``c - floor(c)`` (sub-cell centre) at the centre cell;
        ``reg_weight`` ``(B, 1, H, W)`` float32, 1 at centre cells of valid objects, else 0.

    The centre cell is ``floor(c)`` clamped into the map; the offset stays ``c - floor(c)`` (mmdet),
    so a centre outside the map does not decode exactly. When several objects share a centre cell,
    the heatmap takes their max, while ``wh``/``offset`` hold the last of them in ``N`` order (the later
    box wins, as in mmdetection), on every device.

    Cost: one host sync for the label check and one for the batch's largest radius ``R`` (none when
    both are settled by the caller); memory
    about ``B * N * S_y * S_x * 17`` bytes with ``S = min(2R + 1, map side)`` (float32 gaussian and
    sum, int64 index, bool mask): ~0.75 MB for N=100, R=10; at worst (one box as large as the map)
    ~28 MB per image for N=100, H=W=128, so prefer calling it per sample when boxes can be huge.
    """
    if check_labels:
        _check_inputs(boxes, labels, num_classes, feat_hw, stride, min_overlap)
    b = labels.shape[0]
    h_map, w_map = feat_hw
    hw = h_map * w_map
    dev = boxes.device
    valid = labels >= 0  # (B, N)

    cx, cy, bw, bh, radius = _geometry(boxes, stride, min_overlap)
    cx_floor, cy_floor = torch.floor(cx), torch.floor(cy)
    cx_int = cx_floor.clamp(0, w_map - 1).long()  # (B, N)
    cy_int = cy_floor.clamp(0, h_map - 1).long()
    if empty is None:
        empty = partial(torch.empty, dtype=torch.float32, device=dev)
    shape = (b, num_classes, h_map, w_map)
    heatmap = zeros(shape) if zeros is not None else empty(shape).zero_()
    _render_heatmap(cx_int, cy_int, radius, labels, num_classes, feat_hw, heatmap, max_radius)

    wh, offset, reg_weight = _regression_maps(cx, cy, bw, bh, cx_int, cy_int, valid, feat_hw)

    def _to_map(t: Tensor) -> Tensor:
        """(K, B*H*W + 1) -> (B, K, H, W), dropping the dump slot."""
        return empty((b, t.shape[0], h_map, w_map)).copy_(t[:, : b * hw].reshape(-1, b, h_map, w_map).transpose(0, 1))

    return {
        "heatmap": heatmap,
        "wh": _to_map(wh),
        "offset": _to_map(offset),
        "reg_weight": _to_map(reg_weight[None]),
    }


def _regression_maps(cx: Tensor, cy: Tensor, bw: Tensor, bh: Tensor, cx_int: Tensor, cy_int: Tensor, valid: Tensor,
                     feat_hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """wh (2, B*H*W + 1), offset (2, B*H*W + 1) and reg_weight (B*H*W + 1,) float32, flat over the batch's
    cells plus one dump slot. Inputs are (B, N): centres and sizes in cells, the clamped centre cells,
    the valid-object mask."""
    b, dev = valid.shape[0], valid.device
    h_map, w_map = feat_hw
    hw = h_map * w_map
    # Scatter into one extra dump slot that absorbs padding objects, so no data-dependent boolean indexing
    # (and no host sync) is needed.
    flat = torch.arange(b, device=dev)[:, None] * hw + cy_int * w_map + cx_int  # (B, N)
    dump = torch.full_like(flat, b * hw)
    flat = torch.where(valid, flat, dump)
    # Objects sharing a centre cell: the later one (higher index in its image) wins, as mmdetection
    # writes the maps box by box. A scatter with duplicate indices leaves the winner undefined (cuda), so
    # each cell's winner is found first by an order-independent amax, and only winners are written.
    order = torch.arange(flat.shape[1], device=dev).expand_as(flat)
    winner = torch.full((b * hw + 1,), -1, dtype=torch.int64, device=dev)
    winner.scatter_reduce_(0, flat.reshape(-1), order.reshape(-1), "amax")
    flat = torch.where(winner[flat] == order, flat, dump).reshape(-1)
    wh = torch.zeros(2, b * hw + 1, dtype=torch.float32, device=dev)
    wh[:, flat] = torch.stack([bw, bh]).reshape(2, -1).to(torch.float32)
    offset = torch.zeros(2, b * hw + 1, dtype=torch.float32, device=dev)
    offset[:, flat] = torch.stack([cx - torch.floor(cx), cy - torch.floor(cy)]).reshape(2, -1).to(torch.float32)
    reg_weight = torch.zeros(b * hw + 1, dtype=torch.float32, device=dev)
    reg_weight[flat] = 1.0
    return wh, offset, reg_weight
