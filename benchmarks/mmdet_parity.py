"""Parity with mmdetection 3.3.0's own CenterNet code, through the project's public functions.

Run with a Python that has mmdet 3.3.0, mmengine 0.10.x and mmcv-lite 2.1.0 importable and the project on
PYTHONPATH (benchmarks/README.md gives the install). mmcv-lite ships no compiled kernels: a stand-in
`mmcv._ext` is installed before mmcv is imported, so `mmdet.models` imports, and any kernel it would call
raises at once (the CenterNet-R18 path without DCN calls none).

On random inputs with fixed seeds it compares, for mmdetection's CenterNet-R18 (its config file, 3 classes):
the network's outputs with the same weights in eval and train mode and the BatchNorm statistics after a
train forward; the deterministic parts of the initialisation; the targets on edge cases; the loss terms and
their gradients (head outputs and every parameter); decoding; the test transform of PNG images of odd and
even sizes; the detections of a few images end to end (mmdetection's test pipeline at batch 1 against
`centerpoint checkpoint import mmdet` + evaluation at batch 1 and 4) and their COCO metrics.

Prints one JSON line: per check the max abs error, the max relative error (max abs error over the largest
magnitude of the reference), the number of mismatching integers where integers are compared, and `pass`
(relative error <= 1e-5 in float32, integers exact); `info` holds measured differences the README
documents (JPEG decoding, the training crop); the top-level `pass` is all checks'. Exit code 0 on pass.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

TOL = 1e-5
NUM_CLASSES = 3
ROOT = Path(__file__).resolve().parents[1]
# (width, height): odd and even sides, a COCO-like size, one narrower than 32
IMAGE_SIZES = [(75, 61), (64, 96), (97, 50), (128, 80), (33, 70), (160, 123)]


def install_ext_stand_in() -> None:
    """A `mmcv._ext` module whose every attribute is a kernel that raises when called."""
    ext = types.ModuleType("mmcv._ext")

    def missing(name: str) -> Callable:
        def kernel(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"mmcv._ext.{name} was called: mmcv-lite has no compiled kernels, and the "
                               "parity harness must not need one")
        return kernel

    def getattr_(name: str) -> Callable:
        if name.startswith("__"):
            raise AttributeError(name)
        return missing(name)

    ext.__getattr__ = getattr_  # type: ignore[attr-defined]
    sys.modules["mmcv._ext"] = ext


install_ext_stand_in()
sys.path.insert(0, str(ROOT))

import mmdet  # noqa: E402
import torch  # noqa: E402
from mmdet.evaluation import CocoMetric  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import Compose, pseudo_collate  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from centerpoint.checkpoint import load_checkpoint  # noqa: E402
from centerpoint.data.coco import load_index  # noqa: E402
from centerpoint.data.loader import DetectionDataset, read_image  # noqa: E402
from centerpoint.data.targets import make_targets  # noqa: E402
from centerpoint.data.transforms import transform_boxes, warp, zero_padding_  # noqa: E402
from centerpoint.evaluation.decode import decode_heatmap  # noqa: E402
from centerpoint.evaluation.predict import evaluate_checkpoint  # noqa: E402
from centerpoint.loss import centernet_loss  # noqa: E402
from centerpoint.model import build_model, init  # noqa: E402
from centerpoint.spec import ModelSpec  # noqa: E402
from centerpoint.spec_io import load_spec, spec_to_yaml  # noqa: E402
from centerpoint.weights.foreign import import_mmdet  # noqa: E402

RECIPE = ROOT / "experiments" / "centernet_r18_coco.yaml"
CONFIG = Path(mmdet.__file__).parent / ".mim" / "configs" / "centernet" / "centernet_r18_8xb16-crop512-140e_coco.py"
Result = dict[str, float | int | bool | str]


def compare(pairs: list[tuple[torch.Tensor, torch.Tensor]],
            integers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Result:
    """Errors of (got, reference) pairs: float ones by magnitude, integer ones by count of mismatches; a
    pair of different shapes fails the check (reported, not raised)."""
    max_abs = max_rel = 0.0
    mismatches, shapes = 0, []
    for got, want in pairs:
        got, want = got.detach().double(), want.detach().double()
        if got.shape != want.shape:
            shapes.append(f"{tuple(got.shape)} vs {tuple(want.shape)}")
            continue
        err = float((got - want).abs().max()) if got.numel() else 0.0
        max_abs = max(max_abs, err)
        scale = float(want.abs().max()) if want.numel() else 0.0
        max_rel = max(max_rel, err / scale if scale > 0 else err)
    for got, want in integers or []:
        got, want = torch.as_tensor(got).long(), torch.as_tensor(want).long()
        if got.shape != want.shape:
            shapes.append(f"{tuple(got.shape)} vs {tuple(want.shape)}")
            continue
        mismatches += int((got != want).sum())
    out: Result = {"max_abs": float(f"{max_abs:.3g}"), "max_rel": float(f"{max_rel:.3g}")}
    if integers:
        out["int_mismatches"] = mismatches
    if shapes:
        out["shape_mismatches"] = "; ".join(shapes[:3])
    out["pass"] = max_rel <= TOL and mismatches == 0 and not shapes
    return out


def mmdet_model() -> torch.nn.Module:
    """mmdetection's CenterNet-R18 from its own config file, 3 classes, initialised from scratch."""
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.init_cfg = None  # from scratch: Kaiming convs, zero-init residual BatchNorms
    cfg.model.bbox_head.num_classes = NUM_CLASSES
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def perturb(model: torch.nn.Module) -> None:
    """Random BatchNorm affine parameters and statistics, so that no block is an identity, and a size head that
    predicts boxes of a few cells (it starts near 0), so that end-to-end boxes and metrics mean something."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        wh = model.bbox_head.wh_head[2]
        wh.weight.normal_(0, 0.05, generator=g)
        wh.bias.copy_(torch.tensor([5.0, 4.0]))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def recipe_model() -> ModelSpec:
    """The network of the project's COCO recipe (experiments/centernet_r18_coco.yaml), 3 classes."""
    return load_spec(RECIPE, [f"model.num_classes={NUM_CLASSES}", "model.pretrained=null"]).model


def project_state(model: torch.nn.Module) -> tuple[dict, dict, ModelSpec]:
    """The project's (params, buffers) holding the mmdetection model's tensors, by name."""
    spec = recipe_model()
    params, buffers = init(spec, 0)
    sd = model.state_dict()
    missing = sorted((set(params) | set(buffers)) ^ set(sd))
    if missing:
        raise AssertionError(f"state_dict names differ: {missing[:5]}")
    return ({k: sd[k].clone() for k in params}, {k: sd[k].clone() for k in buffers}, spec)


def head_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heat, wh, offset = model.bbox_head(model.extract_feat(x))
    return heat[0], wh[0], offset[0]


def check_forward(model: torch.nn.Module) -> dict[str, Result]:
    params, buffers, spec = project_state(model)
    apply = build_model(spec).apply
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    out = {}
    eval_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        want = head_outputs(eval_model, x)
        got, _ = apply(params, buffers, x, False)
    out["forward_eval"] = compare([(got["heatmap"].sigmoid(), want[0]), (got["wh"], want[1]),
                                   (got["offset"], want[2])])
    train_model = copy.deepcopy(model).train()
    with torch.no_grad():
        want = head_outputs(train_model, x)
        got, new_buffers = apply(params, buffers, x, True)
    out["forward_train"] = compare([(got["heatmap"].sigmoid(), want[0]), (got["wh"], want[1]),
                                    (got["offset"], want[2])])
    stats = train_model.state_dict()
    floats = [(new_buffers[k], stats[k]) for k in new_buffers if not k.endswith("num_batches_tracked")]
    counts = [(new_buffers[k], stats[k]) for k in new_buffers if k.endswith("num_batches_tracked")]
    out["bn_stats_after_train_forward"] = compare(floats, counts)
    return out


def check_init(model: torch.nn.Module) -> Result:
    """What is not random in the two initialisations: bilinear deconv kernels on output channel 0, head
    biases, every BatchNorm (zero-init residual included) and its statistics."""
    want = model.state_dict()
    params, buffers = init(recipe_model(), 0)
    got = {**params, **buffers}
    pairs = [(got[k][:, 0], want[k][:, 0]) for k in got if k.startswith("neck.") and got[k].dim() == 4
             and k.endswith("conv.weight") and int(k.split(".")[2]) % 2 == 1]
    deterministic = [k for k in got if k.startswith("bbox_head.") and k.endswith("2.bias")]
    deterministic += [k for k in got if "bn" in k or ".downsample.1." in k]
    pairs += [(got[k], want[k]) for k in deterministic if not k.endswith("num_batches_tracked")]
    result = compare(pairs, [(got[k], want[k]) for k in got if k.endswith("num_batches_tracked")])
    zeroed = sorted(k for k in want if k.endswith("bn2.weight") and not want[k].any())
    result["zero_init_residual_blocks"] = len(zeroed)
    result["pass"] = result["pass"] and result["max_abs"] == 0 and len(zeroed) == 8
    return result


def target_cases() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Boxes (xyxy input pixels of a 128 x 96 input) and labels of four images: borders, sub-pixel boxes,
    shared centre cells (same and other class), an empty image, a crowd of random boxes."""
    g = torch.Generator().manual_seed(3)
    edge = torch.tensor([[0, 0, 10, 14], [118, 82, 128, 96], [0, 40, 128, 52], [60, 0, 75, 96],
                         [30.2, 30.1, 30.5, 30.6], [33.0, 31.0, 33.9, 31.4],
                         [40, 40, 52, 50], [42, 41, 50, 49], [44, 42, 48, 47], [41.3, 40.2, 50.9, 49.7]])
    edge_labels = torch.tensor([0, 1, 2, 0, 1, 1, 0, 1, 0, 0])
    xy = torch.rand(30, 2, generator=g) * torch.tensor([110.0, 80.0])
    crowd = torch.cat([xy, xy + 0.5 + torch.rand(30, 2, generator=g) * 30], 1).clamp(max=torch.tensor([128, 96] * 2))
    cells = torch.randint(0, 4, (12, 2), generator=g).float() * 4 + 60  # many boxes on few cells
    shared = torch.cat([cells - torch.rand(12, 2, generator=g) * 6, cells + 1 + torch.rand(12, 2, generator=g) * 6], 1)
    boxes = [edge.float(), torch.zeros(0, 4), crowd, shared]
    labels = [edge_labels, torch.zeros(0, dtype=torch.long), torch.randint(0, NUM_CLASSES, (30,), generator=g),
              torch.randint(0, NUM_CLASSES, (12,), generator=g)]
    return boxes, labels


def padded(boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(b) for b in boxes)
    out_boxes, out_labels = torch.zeros(len(boxes), n, 4), torch.full((len(boxes), n), -1)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        out_boxes[i, : len(b)], out_labels[i, : len(b)] = b, lab
    return out_boxes, out_labels


def check_targets_and_loss(model: torch.nn.Module) -> dict[str, Result]:
    head = model.bbox_head
    boxes, labels = target_cases()
    feat = (len(boxes), NUM_CLASSES, 24, 32)
    want, avg_factor = head.get_targets(boxes, labels, feat, (96, 128))
    got = make_targets(*padded(boxes, labels), NUM_CLASSES, (24, 32), 4)
    weight = want["wh_offset_target_weight"]
    out = {"targets": compare([(got["heatmap"], want["center_heatmap_target"]), (got["wh"], want["wh_target"]),
                               (got["offset"], want["offset_target"])],
                              [(got["reg_weight"].expand_as(weight), weight)])}
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(feat, generator=g) * 2 - 2).requires_grad_()
    wh = (torch.randn(feat[0], 2, 24, 32, generator=g) * 2 + 4).requires_grad_()
    offset = torch.rand(feat[0], 2, 24, 32, generator=g).requires_grad_()
    instances = [InstanceData(bboxes=b, labels=lab) for b, lab in zip(boxes, labels, strict=True)]
    metas = [{"batch_input_shape": (96, 128)}] * feat[0]
    mm = head.loss_by_feat([logits.sigmoid()], [wh], [offset], instances, metas)
    mm_total = mm["loss_center_heatmap"] + mm["loss_wh"] + mm["loss_offset"]
    mm_grads = torch.autograd.grad(mm_total, [logits, wh, offset])
    ours = centernet_loss({"heatmap": logits, "wh": wh, "offset": offset}, got)
    grads = torch.autograd.grad(ours["loss"], [logits, wh, offset])
    out["loss_terms"] = compare([(ours["loss_heatmap"], mm["loss_center_heatmap"]), (ours["loss_wh"], mm["loss_wh"]),
                                 (ours["loss_offset"], mm["loss_offset"])])
    out["loss_terms"]["avg_factor"] = int(avg_factor)
    out["loss_grads_head_outputs"] = compare(list(zip(grads, mm_grads, strict=True)))
    return out


def check_param_grads(model: torch.nn.Module) -> Result:
    """Loss and gradients of every parameter: the whole network in train mode on the edge-case targets."""
    params, buffers, spec = project_state(model)
    train_model = copy.deepcopy(model).train()
    boxes, labels = target_cases()
    x = torch.randn(len(boxes), 3, 96, 128, generator=torch.Generator().manual_seed(5))
    heat, wh, offset = head_outputs(train_model, x)
    instances = [InstanceData(bboxes=b, labels=lab) for b, lab in zip(boxes, labels, strict=True)]
    mm = train_model.bbox_head.loss_by_feat([heat], [wh], [offset], instances,
                                            [{"batch_input_shape": (96, 128)}] * len(boxes))
    sum(mm.values()).backward()
    mm_grads = {k: p.grad for k, p in train_model.named_parameters()}
    leaves = {k: v.requires_grad_() for k, v in params.items()}
    out, _ = build_model(spec).apply(leaves, buffers, x, True)
    targets = make_targets(*padded(boxes, labels), NUM_CLASSES, (24, 32), 4)
    loss = centernet_loss(out, targets)["loss"]
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    result = compare([(loss, sum(mm.values()))] + [(grads[k], mm_grads[k]) for k in grads])
    result["tensors"] = len(grads)
    return result


def check_decode(model: torch.nn.Module) -> Result:
    g = torch.Generator().manual_seed(6)
    heat = torch.sigmoid(torch.randn(3, NUM_CLASSES, 24, 32, generator=g) * 2 - 1)
    wh, offset = torch.rand(3, 2, 24, 32, generator=g) * 12 - 1, torch.rand(3, 2, 24, 32, generator=g)
    want, want_labels = model.bbox_head._decode_heatmap(heat, wh, offset, (96, 128), k=100, kernel=3)
    boxes, scores, labels = decode_heatmap(heat, wh, offset, 4, k=100, kernel=3)
    return compare([(boxes, want[..., :4]), (scores, want[..., 4])], [(labels, want_labels)])


def write_images(root: Path) -> list[Path]:
    """PNG images (lossless, so both decoders see the same pixels) of IMAGE_SIZES with random content."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(7)
    files = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = np.stack([np.sin(xx / (5 + 3 * c) + yy / (7 + c)) for c in range(3)], -1) * 80 + 128
        pixels = np.clip(smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        files.append(root / "img" / f"{i}.png")
        Image.fromarray(pixels).save(files[-1])
    return files


def mmdet_test_pipeline() -> Compose:
    """The config's test pipeline (LoadImageFromFile to float32, RandomCenterCropPad in test mode,
    PackDetInputs) without LoadAnnotations, which predictions do not need."""
    cfg = Config.fromfile(str(CONFIG))
    return Compose([t for t in cfg.test_pipeline if t["type"] != "LoadAnnotations"])


def write_coco(root: Path, files: list[Path], gt: dict[int, list[tuple[list[float], int]]]) -> Path:
    images = [{"id": i + 1, "file_name": f.name, "width": w, "height": h}
              for i, (f, (w, h)) in enumerate(zip(files, IMAGE_SIZES, strict=True))]
    items = [(img, box, cat) for img, boxes in gt.items() for box, cat in boxes]
    anns = [{"id": k + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for k, (img, box, cat) in enumerate(items)]
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def check_test_transform(root: Path, files: list[Path]) -> Result:
    """mmdetection's test pipeline (cv2 decoding, RandomCenterCropPad) against the project's test samples."""
    pipeline = mmdet_test_pipeline()
    write_coco(root, files, {})
    spec = load_spec(None, ["data.dataset=coco", "data.test_mode=pad", f"model.num_classes={NUM_CLASSES}"])
    dataset = DetectionDataset(load_index(root / "ann.json", root / "img", train=False), spec.data, 0, train=False)
    pairs = []
    for i, f in enumerate(files):
        packed = pipeline({"img_path": str(f), "img_id": i + 1})
        want = packed["inputs"].flip(0)  # (3, H, W) BGR float -> RGB
        border = packed["data_samples"].metainfo["border"]  # top, bottom, left, right
        sample = dataset[(0, i)]
        h, w = IMAGE_SIZES[i][1], IMAGE_SIZES[i][0]
        placed = torch.tensor([-sample.to_original[1, 2], -sample.to_original[1, 2] + h,
                               -sample.to_original[0, 2], -sample.to_original[0, 2] + w])
        pairs += [(sample.image, want), (placed, torch.tensor(border)),
                  (torch.tensor(sample.image.shape), torch.tensor(want.shape))]
    return compare([], pairs)


def mmdet_detections(model: torch.nn.Module, files: list[Path]) -> list[InstanceData]:
    """mmdetection's predictions, one image per batch as its test dataloader runs."""
    pipeline = mmdet_test_pipeline()
    model.eval()
    out = []
    with torch.no_grad():
        for i, f in enumerate(files):
            out.append(model.test_step(pseudo_collate([pipeline({"img_path": str(f), "img_id": i + 1})]))[0])
    return out


def ground_truth_from(dets: list) -> dict[int, list[tuple[list[float], int]]]:  # noqa: ANN001
    """Ground truth near mmdetection's best detections inside each image (jittered by ~1.5 px), so that the
    COCO metrics are neither 0 nor 1; its detections outside the image (on the padding) stay false ones."""
    g = torch.Generator().manual_seed(8)
    gt = {}
    for i, d in enumerate(dets):
        w, h = IMAGE_SIZES[i]
        items = []
        for box, label in zip(d.pred_instances.bboxes, d.pred_instances.labels, strict=True):
            x1, y1, x2, y2 = (box + torch.randn(4, generator=g) * 1.5).tolist()
            if 0 <= x1 < x2 - 2 <= w - 2 and 0 <= y1 < y2 - 2 <= h - 2 and len(items) < 4:
                items.append(([x1, y1, x2 - x1, y2 - y1], int(label) + 1))
        gt[i + 1] = items
    return gt


def check_end_to_end(model: torch.nn.Module, root: Path, files: list[Path]) -> dict[str, Result]:
    """mmdetection's test (batch 1) against `centerpoint checkpoint import mmdet` + evaluation (batch 1
    and 4); then mmdetection's CocoMetric against the project's metrics on ground truth near the boxes."""
    dets = mmdet_detections(model, files)
    write_coco(root, files, ground_truth_from(dets))
    torch.save({"state_dict": model.state_dict()}, root / "mmdet_weights.pth")
    out: dict[str, Result] = {}
    for batch in (1, 4):
        spec = load_spec(RECIPE, [
            f"data.root={root}", "data.val_ann=ann.json", "data.val_images=img", f"model.num_classes={NUM_CLASSES}",
            "model.pretrained=null", f"eval.batch_size={batch}", "runtime.device=cpu", "data.workers=0"])
        (root / "spec.yaml").write_text(spec_to_yaml(spec))
        import_mmdet(root / "mmdet_weights.pth", root / "imported.safetensors", root / "spec.yaml")
        metrics, rows = evaluate_checkpoint(spec, load_checkpoint(root / "imported.safetensors"))
        pairs, ints = [], []
        for i, d in enumerate(dets):
            mine = torch.from_numpy(rows[rows[:, 0] == i + 1])
            b = d.pred_instances.bboxes
            want_xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1)
            pairs += [(mine[:, 1:5], want_xywh), (mine[:, 5], d.pred_instances.scores)]
            ints.append((mine[:, 6] - 1, d.pred_instances.labels))
        out[f"end_to_end_batch{batch}"] = compare(pairs, ints)
    metric = CocoMetric(ann_file=str(root / "ann.json"), metric="bbox")
    metric.dataset_meta = {"classes": tuple(f"class{c}" for c in range(NUM_CLASSES))}
    samples = [{"img_id": i + 1, "ori_shape": IMAGE_SIZES[i][::-1],
                "pred_instances": {k: getattr(d.pred_instances, k) for k in ("bboxes", "scores", "labels")}}
               for i, d in enumerate(dets)]
    metric.process({}, samples)
    want = metric.compute_metrics(metric.results)
    keys = ["bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"]
    # CocoMetric rounds to 3 decimals; the project's numbers are rounded the same way to compare.
    got = torch.tensor([round(metrics[k], 3) for k in keys], dtype=torch.float64)
    out["coco_metrics"] = compare([(got, torch.tensor([want[k] for k in keys], dtype=torch.float64))])
    out["coco_metrics"]["bbox_mAP"] = want["bbox_mAP"]
    return out


def info_jpeg_decoding(root: Path) -> dict:
    """PIL (the project) against OpenCV (mmdetection) decoding the same JPEG."""
    import cv2
    from PIL import Image

    files = write_images(root / "jpeg")
    src = np.asarray(Image.open(files[-1]))
    path = root / "q90.jpg"
    Image.fromarray(src).save(path, quality=90)
    pil = np.asarray(read_image(str(path))).astype(np.int16)
    ocv = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].astype(np.int16)
    diff = np.abs(pil - ocv)
    return {"max_abs": int(diff.max()), "mean_abs": round(float(diff.mean()), 4),
            "fraction_differing": round(float((diff > 0).mean()), 4),
            "pil": Image.__version__, "opencv": cv2.__version__}


class FixedDraws:
    """Stands in for both random sources of a training crop so that the two pipelines draw the same window:
    numpy.random as mmdetection's transforms module uses it (`choice`, `randint`), and the Generator the
    project's `center_crop_affine` takes (`choice`, `integers`, `random`)."""

    def __init__(self, ratio: float, cx: int, cy: int) -> None:
        self.ratio, self.centre, self.calls = ratio, (cx, cy), 0

    def choice(self, ratios: object) -> float:
        return self.ratio

    def randint(self, low: int, high: int) -> int:  # mmdetection: x, then y
        self.calls += 1
        return self.centre[(self.calls - 1) % 2]

    def integers(self, low: int, high: int, size: int) -> np.ndarray:  # the project: 50 x, then 50 y
        self.calls += 1
        return np.full(size, self.centre[(self.calls - 1) % 2])

    def random(self) -> float:
        return 1.0  # no flip


def check_train_crop() -> tuple[Result, dict]:
    """mmdetection's training crop (RandomCenterCropPad train mode with its config's ratios and border, then
    Resize to 512 keep-ratio) against the project's `center_crop_affine`, warp and box mapping, on the same
    draws. Checked: the boxes both keep (coordinates) and which they keep, besides the project's drop of boxes
    under 1 pixel. Measured (info): the pixel differences of crop-then-resize against one warp."""
    from mmdet.datasets.transforms import RandomCenterCropPad, Resize, transforms
    from mmdet.structures.bbox import HorizontalBoxes
    from PIL import Image

    from centerpoint.data.transforms import center_crop_affine

    ratios = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
    crop = RandomCenterCropPad(crop_size=(512, 512), ratios=ratios, border=128, mean=[0, 0, 0], std=[1, 1, 1],
                               to_rgb=True, test_pad_mode=None)
    resize = Resize(scale=(512, 512), keep_ratio=True)
    rng = np.random.default_rng(9)
    pairs, ints, diffs, dropped, kept = [], [], [], 0, 0
    for ratio, (w, h) in [(0.6, (640, 427)), (1.3, (500, 375)), (1.0, (480, 640)), (0.8, (333, 500)),
                          (1.1, (200, 150))]:
        yy, xx = np.mgrid[0:h, 0:w]
        img = (np.stack([np.sin(xx / 9 + c) + np.cos(yy / 13 + c) for c in range(3)], -1) * 60 + 128).astype(np.uint8)
        xy = rng.uniform(0, [w - 1, h - 1], (60, 2))
        boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(0.3, 60, (60, 2)), [w, h])], 1).astype(np.float32)
        cx, cy = int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(h // 3, 2 * h // 3))
        transforms.random = FixedDraws(ratio, cx, cy)
        results = {"img": img.astype(np.float32), "img_shape": (h, w), "gt_bboxes": HorizontalBoxes(boxes),
                   "gt_bboxes_labels": np.arange(60), "gt_ignore_flags": np.zeros(60, bool)}
        results = resize.transform(crop.transform(results))
        a, keep = center_crop_affine(FixedDraws(ratio, cx, cy), w, h, boxes, 512, ratios, 128, 0.0)
        mine, keep2 = transform_boxes(boxes[keep], a, (512, 512), 1.0)
        want = results["gt_bboxes"].tensor
        ints.append((torch.from_numpy(np.flatnonzero(keep)), torch.from_numpy(results["gt_bboxes_labels"])))
        pairs.append((torch.from_numpy(mine), want[torch.from_numpy(keep2)]))
        dropped += int((~keep2).sum())
        kept += len(want)
        planes = np.ascontiguousarray(warp(Image.fromarray(img), a, (512, 512)).transpose(2, 0, 1))
        ours = zero_padding_(planes, a, w, h).transpose(1, 2, 0).astype(np.float64)
        diffs.append(np.abs(ours - results["img"]).reshape(-1))
    transforms.random = np.random
    d = np.concatenate(diffs)
    result = compare(pairs, ints)
    result["boxes_kept_by_mmdet"], result["of_them_under_1px_dropped_here"] = kept, dropped
    return result, {"pixel_max_abs": round(float(d.max()), 2), "pixel_mean_abs": round(float(d.mean()), 4),
                    "pixels_over_1": round(float((d > 1).mean()), 5)}


def main() -> None:
    # mmengine logs to the stdout it finds when its logger is made: send that to stderr, keep stdout for JSON.
    with contextlib.redirect_stdout(sys.stderr):
        out = run_checks()
    print(json.dumps(out))
    sys.exit(0 if out["pass"] else 1)


def run_checks() -> dict:
    register_all_modules()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = mmdet_model()
    checks: dict[str, Result] = {"init": check_init(model)}
    perturb(model)
    checks.update(check_forward(model))
    checks.update(check_targets_and_loss(model))
    checks["loss_grads_params"] = check_param_grads(model)
    checks["decode"] = check_decode(model)
    info = {}
    with tempfile.TemporaryDirectory(prefix="mmdet-parity-") as tmp:
        root = Path(tmp)
        files = write_images(root)
        checks["test_transform"] = check_test_transform(root, files)
        checks.update(check_end_to_end(model, root, files))
        info["jpeg_decode_pil_vs_opencv"] = info_jpeg_decoding(root)
    checks["train_crop_boxes"], info["train_crop_pixels_vs_single_warp"] = check_train_crop()
    return {"bench": "mmdet_parity", "mmdet": mmdet.__version__, "torch": torch.__version__, "checks": checks,
            "info": info, "pass": all(c["pass"] for c in checks.values())}


if __name__ == "__main__":
    main()
