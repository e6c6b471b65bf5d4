"""Weight import: mmdetection CenterNet checkpoints and torchvision ResNets, built here with the real key
names and shapes (random values), against a forward pass written directly with torch.nn.functional."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from centerpoint.checkpoint import load_checkpoint
from centerpoint.errors import CenterpointError
from centerpoint.evaluation.predict import load_model
from centerpoint.model import build_network, init, make_apply, normalize
from centerpoint.runtime.devices import select_backend
from centerpoint.spec import MMDET_R18, ModelSpec
from centerpoint.weights import published as weights
from centerpoint.weights.foreign import import_mmdet, load_torchvision_backbone
from tests.helpers import call_cli, run_cli, serve_dir

ROOT = Path(__file__).resolve().parents[1]
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# ------------------------------------------------------------------ key names and shapes, written out


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in BN}


def resnet18_shapes(prefix: str = "") -> dict[str, tuple[int, ...]]:
    """torchvision / mmdetection ResNet-18 trunk names (no classifier)."""
    s = {f"{prefix}conv1.weight": (64, 3, 7, 7), **_bn(f"{prefix}bn1", 64)}
    cin = 64
    for i, c in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            p = f"{prefix}layer{i}.{j}"
            s[f"{p}.conv1.weight"] = (c, cin if j == 0 else c, 3, 3)
            s.update(_bn(f"{p}.bn1", c))
            s[f"{p}.conv2.weight"] = (c, c, 3, 3)
            s.update(_bn(f"{p}.bn2", c))
            if j == 0 and i > 1:
                s[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                s.update(_bn(f"{p}.downsample.1", c))
        cin = c
    return s


def mmdet_shapes(dcn: bool, num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """mmdetection CenterNet: ResNet-18 + CTResNetNeck (256, 128, 64) + CenterNetHead (64 channels)."""
    s = resnet18_shapes("backbone.")
    cin = 512
    for k, c in enumerate((256, 128, 64)):
        p = f"neck.deconv_layers.{2 * k}"
        s[f"{p}.conv.weight"] = (c, cin, 3, 3)
        if dcn:
            s[f"{p}.conv.conv_offset.weight"] = (27, cin, 3, 3)
            s[f"{p}.conv.conv_offset.bias"] = (27,)
        s.update(_bn(f"{p}.bn", c))
        s[f"neck.deconv_layers.{2 * k + 1}.conv.weight"] = (c, c, 4, 4)  # ConvTranspose2d: (in, out, k, k)
        s.update(_bn(f"neck.deconv_layers.{2 * k + 1}.bn", c))
        cin = c
    for head, out in (("heatmap_head", num_classes), ("wh_head", 2), ("offset_head", 2)):
        s[f"bbox_head.{head}.0.weight"], s[f"bbox_head.{head}.0.bias"] = (64, 64, 3, 3), (64,)
        s[f"bbox_head.{head}.2.weight"], s[f"bbox_head.{head}.2.bias"] = (out, 64, 1, 1), (out,)
    return s


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    """Random values with sane scales (He-scaled convs, positive variances), so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = OrderedDict()
    for k, shape in shapes.items():
        if ".conv_offset." in k:  # offsets of about a pixel (the trunk's features are O(10) here)
            scale = 0.5 if k.endswith("bias") else 0.03 * (2.0 / (shape[1] * 9)) ** 0.5
            sd[k] = scale * torch.randn(shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.randint(0, 10_000, (), generator=g)
        elif k.endswith("running_var") or (k.endswith(".weight") and len(shape) == 1):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 4:
            fan_in = shape[0 if "deconv_layers" in k and shape[-1] == 4 else 1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


def save_pth(sd: dict[str, Tensor], directory: Path, stem: str, mmdet: bool = True) -> Path:
    """torch.save as mmdetection does ({'meta', 'state_dict'}; torchvision: bare), named STEM-<sha8>.pth."""
    tmp = directory / f"{stem}.tmp"
    obj = {"meta": {"mmdet_version": "2.14.0", "epoch": 28, "CLASSES": tuple(f"c{i}" for i in range(80))},
           "state_dict": sd} if mmdet else sd
    torch.save(obj, tmp)
    final = directory / f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(final)
    return final


# ---------------------------------------------------------------- forward written from the raw tensors


def _bn_eval(x: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _dcn(x: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    from centerpoint.nn.dcn import modulated_deform_conv2d

    o1, o2, m = F.conv2d(x, sd[p + ".conv_offset.weight"], sd[p + ".conv_offset.bias"], padding=1).chunk(3, 1)
    return modulated_deform_conv2d(x, torch.cat([o1, o2], 1), m.sigmoid(), sd[p + ".weight"], None, 1, 1, 1)


def reference_forward(sd: dict[str, Tensor], x: Tensor, dcn: bool) -> dict[str, Tensor]:
    """mmdetection CenterNet-R18 inference, written out op by op from its state_dict."""
    x = F.max_pool2d(F.relu(_bn_eval(F.conv2d(x, sd["backbone.conv1.weight"], stride=2, padding=3), sd,
                                     "backbone.bn1")), 3, 2, 1)
    for i in range(1, 5):
        for j in range(2):
            p, stride = f"backbone.layer{i}.{j}", 2 if (i > 1 and j == 0) else 1
            short = x if p + ".downsample.0.weight" not in sd else _bn_eval(
                F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), sd, p + ".downsample.1")
            y = F.relu(_bn_eval(F.conv2d(x, sd[p + ".conv1.weight"], stride=stride, padding=1), sd, p + ".bn1"))
            x = F.relu(_bn_eval(F.conv2d(y, sd[p + ".conv2.weight"], padding=1), sd, p + ".bn2") + short)
    for k in range(3):
        p = f"neck.deconv_layers.{2 * k}"
        y = _dcn(x, sd, p + ".conv") if dcn else F.conv2d(x, sd[p + ".conv.weight"], padding=1)
        x = F.relu(_bn_eval(y, sd, p + ".bn"))
        p = f"neck.deconv_layers.{2 * k + 1}"
        x = F.relu(_bn_eval(F.conv_transpose2d(x, sd[p + ".conv.weight"], stride=2, padding=1), sd, p + ".bn"))
    out = {}
    for name in ("heatmap", "wh", "offset"):
        p = f"bbox_head.{name}_head"
        h = F.relu(F.conv2d(x, sd[p + ".0.weight"], sd[p + ".0.bias"], padding=1))
        out[name] = F.conv2d(h, sd[p + ".2.weight"], sd[p + ".2.bias"])
    return out


# ------------------------------------------------------------------------------------------- mmdet


def test_written_out_key_lists_have_the_published_counts():
    assert len(mmdet_shapes(False)) == 168 and len(mmdet_shapes(True)) == 174
    extra = set(mmdet_shapes(True)) - set(mmdet_shapes(False))
    assert extra == {f"neck.deconv_layers.{i}.conv.conv_offset.{t}" for i in (0, 2, 4) for t in ("weight", "bias")}


@pytest.mark.parametrize("dcn", [False, True])
def test_import_then_forward_equals_reference(tmp_path, dcn):
    sd = random_state(mmdet_shapes(dcn), seed=1 + dcn)
    src = save_pth(sd, tmp_path, "centernet")
    result = import_mmdet(src, tmp_path / "ckpt.safetensors")
    assert result.spec_path.name == ("centernet_r18_dcn_coco.yaml" if dcn else "centernet_r18_coco.yaml")
    assert result.spec.model.dcn is dcn and result.num_tensors == len(sd) == 168 + 6 * dcn
    assert result.sha256_prefix == src.stem.rsplit("-", 1)[1]

    ckpt = load_checkpoint(tmp_path / "ckpt.safetensors")
    assert ckpt.step == 0 and ckpt.epoch == 0 and ckpt.spec == result.spec
    params, buffers = ckpt.group("params"), ckpt.group("buffers")
    assert {**params, **buffers}.keys() == sd.keys()
    assert all(torch.equal({**params, **buffers}[k], v) for k, v in sd.items())
    assert "sgd.momentum.backbone.conv1.weight" in ckpt.group("opt")  # SGD momentum, zero
    assert all(float(v.abs().sum()) == 0 for v in ckpt.group("opt").values() if v.is_floating_point())

    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    x = normalize(images, ckpt.spec.data.mean, ckpt.spec.data.std)
    with torch.no_grad():
        got, _ = make_apply(build_network(ckpt.spec.model))(params, buffers, x, False)
        want = reference_forward(sd, x, dcn)
    for name in ("heatmap", "wh", "offset"):
        assert got[name].shape == want[name].shape == (2, 80 if name == "heatmap" else 2, 16, 24)
        scale = float(want[name].abs().max())
        assert scale > 1e-3 and torch.allclose(got[name], want[name], atol=1e-4 * scale, rtol=1e-4), name

    predict, p, b = load_model(ckpt.spec, ckpt, select_backend("cpu"))  # what `eval` / `predict` do
    with torch.no_grad():
        boxes, scores, labels = predict(p, b, images.to(torch.uint8))
    assert boxes.shape == (2, 100, 4) and scores.shape == labels.shape == (2, 100)


@pytest.fixture(scope="module")
def plain_sd() -> dict[str, Tensor]:
    return random_state(mmdet_shapes(False), seed=3)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, plain_sd):
    sd = dict(plain_sd)
    del sd["bbox_head.wh_head.2.bias"]
    sd["neck.extra.weight"] = torch.zeros(3)
    with pytest.raises(CenterpointError, match=r"missing: bbox_head\.wh_head\.2\.bias.*unexpected: neck\.extra"):
        import_mmdet(save_pth(sd, tmp_path, "a"), tmp_path / "a.safetensors")
    sd = dict(plain_sd, **{"bbox_head.heatmap_head.2.weight": torch.zeros(81, 64, 1, 1)})
    with pytest.raises(CenterpointError, match=r"shape mismatch: bbox_head\.heatmap_head\.2\.weight.*\(81, 64"):
        import_mmdet(save_pth(sd, tmp_path, "b"), tmp_path / "b.safetensors")
    dcn_file = save_pth(random_state(mmdet_shapes(True), seed=4), tmp_path, "c")
    with pytest.raises(CenterpointError, match=r"model\.dcn=False.*unexpected: neck\.deconv_layers\.0\.conv\."
                                               r"conv_offset\.bias"):
        import_mmdet(dcn_file, tmp_path / "c.safetensors", ROOT / "experiments" / "centernet_r18_coco.yaml")
    assert not list(tmp_path.glob("*.safetensors"))


def test_sha256_prefix_mismatch_is_refused(tmp_path, plain_sd):
    good = save_pth(plain_sd, tmp_path, "centernet")
    claimed = good.stem.rsplit("-", 1)[1]
    wrong = "0" * 8 if claimed != "0" * 8 else "1" * 8
    bad = good.rename(tmp_path / f"centernet_resnet18_140e_coco_20210705_093630-{wrong}.pth")
    with pytest.raises(CenterpointError, match=f"sha256 is {claimed}.*name says {wrong}"):
        import_mmdet(bad, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


class Touch:
    """Pickles as 'call Path.touch(marker)': loading it would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


class Config:
    """A custom class, as a training framework might leave in a checkpoint's meta."""

    def __init__(self) -> None:
        self.lr = 0.02


def test_pickle_that_needs_code_is_refused_without_running_it(tmp_path, plain_sd):
    marker = tmp_path / "code-ran"
    src = tmp_path / "evil.pth"
    torch.save({"meta": {"hook": Touch(marker)}, "state_dict": plain_sd}, src)
    with pytest.raises(CenterpointError, match=r"evil\.pth: refusing to load, the file needs code to unpickle"):
        import_mmdet(src, tmp_path / "x.safetensors")
    assert not marker.exists()
    torch.save({"meta": {"config": Config()}, "state_dict": plain_sd}, src)
    with pytest.raises(CenterpointError, match=r"needs code to unpickle \(tests\.test_imports\.Config\)"):
        import_mmdet(src, tmp_path / "x.safetensors")
    src.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CenterpointError, match="not a readable PyTorch checkpoint"):
        import_mmdet(src, tmp_path / "x.safetensors")


def tiny_coco(root: Path) -> Path:
    """COCO 2017 layout with 80 categories and two small val images (what the recipe's eval reads)."""
    from PIL import Image

    (root / "val2017").mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 48, "width": 40 + 24 * i} for i in (1, 2)]
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (200, 40, 90)).save(root / "val2017" / im["file_name"])
    # the names the mmdetection file records (CLASSES c0..c79), under COCO's ids 1..80
    ann = {"images": images, "categories": [{"id": c, "name": f"c{c - 1}"} for c in range(1, 81)],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 30], "area": 600,
                            "iscrowd": 0}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    return root


@pytest.mark.e2e
def test_cli_import_then_eval_and_errors_are_one_line(tmp_path, plain_sd):
    src = save_pth(plain_sd, tmp_path, "centernet")
    cmd = ["checkpoint", "import", "mmdet"]
    res = run_cli(*cmd, str(src), str(tmp_path / "c.safetensors"), timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"imported 168 tensors from {src} (sha256 {src.stem[-8:]} verified)" in res.stdout
    assert load_checkpoint(tmp_path / "c.safetensors").spec.name == "centernet_r18_coco"
    coco = tiny_coco(tmp_path / "coco")
    res = run_cli("eval", "--checkpoint", str(tmp_path / "c.safetensors"), "--data-dir", str(coco), "--set",
                  "data.workers=0", "--out", str(tmp_path / "m.json"), timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 2
    res = call_cli(*cmd, str(tmp_path / "nope.pth"), str(tmp_path / "d.safetensors"))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "file not found" in res.stderr


# ------------------------------------------------------------------------------------- torchvision


def torchvision_resnet18(seed: int) -> dict[str, Tensor]:
    sd = random_state(resnet18_shapes(), seed)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return sd


def test_torchvision_backbone_fills_backbone_only(tmp_path):
    tv = torchvision_resnet18(seed=5)
    path = save_pth(tv, tmp_path, "resnet18", mmdet=False)
    params, buffers = init(ModelSpec(**MMDET_R18, num_classes=80), 0)
    new_p, new_b = load_torchvision_backbone(path, params, buffers)
    assert new_p.keys() == params.keys() and new_b.keys() == buffers.keys()
    merged = {**new_p, **new_b}
    for k, v in tv.items():
        if k.startswith("fc."):
            assert "backbone." + k not in merged
        else:
            assert torch.equal(merged["backbone." + k], v), k
    untouched = [k for k in params if not k.startswith("backbone.")]
    assert untouched and all(new_p[k] is params[k] for k in untouched)
    assert sum(k.startswith("backbone.") for k in merged) == len(tv) - 2 == 120


def test_torchvision_without_bn_counters_is_accepted_but_a_wrong_depth_is_not(tmp_path):
    tv = {k: v for k, v in torchvision_resnet18(seed=6).items() if not k.endswith("num_batches_tracked")}
    params, buffers = init(ModelSpec(**MMDET_R18), 0)
    _, new_b = load_torchvision_backbone(save_pth(tv, tmp_path, "resnet18", mmdet=False), params, buffers)
    assert torch.equal(new_b["backbone.bn1.running_var"], tv["bn1.running_var"])
    assert new_b["backbone.bn1.num_batches_tracked"] is buffers["backbone.bn1.num_batches_tracked"]
    deeper = dict(tv, **{"layer1.2.conv1.weight": torch.zeros(64, 64, 3, 3)})
    with pytest.raises(CenterpointError, match=r"torchvision ResNet.*unexpected: backbone\.layer1\.2\.conv1"):
        load_torchvision_backbone(save_pth(deeper, tmp_path, "resnet34", mmdet=False), params, buffers)
    wide = dict(tv, **{"conv1.weight": torch.zeros(64, 4, 7, 7)})
    with pytest.raises(CenterpointError, match=r"backbone\.conv1\.weight is \(64, 4, 7, 7\), expected \(64, 3"):
        load_torchvision_backbone(save_pth(wide, tmp_path, "resnet18w", mmdet=False), params, buffers)


@pytest.fixture
def http_dir(tmp_path) -> Iterator[tuple[str, Path, list[str]]]:
    served = tmp_path / "served"
    served.mkdir()
    with serve_dir(served) as (url, hits):
        yield url, served, hits


def test_published_name_is_fetched_into_the_cache_once_and_verified(tmp_path, http_dir, monkeypatch):
    url, served, hits = http_dir
    name = save_pth(torchvision_resnet18(seed=7), served, "resnet18", mmdet=False).name
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, name, f"{url}/{name}")
    monkeypatch.setenv("CENTERPOINT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the bare name is not a file here
    params, buffers = init(ModelSpec(**MMDET_R18), 0)
    new_p, _ = load_torchvision_backbone(name, params, buffers)
    cached = tmp_path / "cache" / "weights" / name
    assert cached.read_bytes() == (served / name).read_bytes() and hits == [f"/{name}"]
    again, _ = load_torchvision_backbone(name, params, buffers)
    assert hits == [f"/{name}"] and torch.equal(again["backbone.conv1.weight"], new_p["backbone.conv1.weight"])

    cached.unlink()
    (served / name).write_bytes((served / name).read_bytes()[:-10])  # truncated on the server
    with pytest.raises(CenterpointError, match=f"no verified copy of {name} here or in .*sha256"):
        load_torchvision_backbone(name, params, buffers)
    assert list((tmp_path / "cache" / "weights").iterdir()) == []  # nothing half-written is left
    with pytest.raises(CenterpointError, match="no sha256 prefix"):
        weights.fetch_weights(f"{url}/resnet18.pth")
    with pytest.raises(CenterpointError, match="HTTP 404"):
        weights.fetch_weights(f"{url}/missing-0123abcd.pth")


def test_import_from_url(tmp_path, http_dir, plain_sd, monkeypatch):
    url, served, _ = http_dir
    src = save_pth(plain_sd, served, "centernet_resnet18")
    monkeypatch.setenv("CENTERPOINT_CACHE", str(tmp_path / "cache"))
    result = import_mmdet(f"{url}/{src.name}", tmp_path / "u.safetensors")
    assert result.source == tmp_path / "cache" / "weights" / src.name and result.num_tensors == 168


def test_a_cached_weights_file_that_fails_its_hash_is_refused_not_replaced(tmp_path, http_dir, monkeypatch):
    url, served, hits = http_dir
    name = save_pth(torchvision_resnet18(seed=7), served, "resnet18", mmdet=False).name
    monkeypatch.setenv("CENTERPOINT_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "weights" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"a file someone put here")
    with pytest.raises(CenterpointError, match=f"{name}: sha256 does not match .* left as it is: delete it"):
        weights.fetch_weights(f"{url}/{name}")
    assert cached.read_bytes() == b"a file someone put here" and hits == []


def test_weights_come_through_the_resumable_fetcher_and_a_foreign_part_file_is_refused(tmp_path, http_dir,
                                                                                      monkeypatch):
    from centerpoint.io import http as fetcher

    url, served, hits = http_dir
    name = save_pth(torchvision_resnet18(seed=7), served, "resnet18", mmdet=False).name
    monkeypatch.setenv("CENTERPOINT_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "weights"
    cache.mkdir(parents=True)
    part = cache / (name + ".part")
    part.write_bytes(b"someone's half file")
    with pytest.raises(CenterpointError, match=f"{name}.part exists but was not started by this downloader"):
        weights.fetch_weights(f"{url}/{name}")
    assert part.read_bytes() == b"someone's half file" and hits == []

    # A .part of the fetcher's own (its marker names it) is taken up again, and the result is verified.
    part.unlink()
    fetcher._create_part(part, fetcher.Expected(name, None, weights.name_hash(name), "sha256"))
    part.write_bytes((served / name).read_bytes()[:1000])
    assert weights.fetch_weights(f"{url}/{name}") == cache / name
    assert (cache / name).read_bytes() == (served / name).read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [name]  # no .part or marker left
