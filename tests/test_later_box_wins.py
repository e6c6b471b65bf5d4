"""Two objects whose centres share a heatmap cell: the later box (annotation order) gives the cell's size
and offset, on both training paths (targets in the loader workers, or batched on the device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from centerpoint.data.coco import load_index
from centerpoint.data.device_augment import augment_batch
from centerpoint.data.loader import DetectionDataset, collate_source, collate_train
from centerpoint.spec import DataSpec
from tests.helpers import write_coco

# A 64x64 image trained at scale 1 without flips (pad mode, scale range 1..1): input pixels = original
# pixels. Both boxes are centred on (30, 30) px = cell (7.5, 7.5) at stride 4; sizes in cells by hand.
BIG = [16, 18, 28, 24]  # x, y, w, h -> (7.0, 6.0) cells
SMALL = [26, 27, 8, 6]  # -> (2.0, 1.5) cells


def write_pair(root: Path, first: list[int], second: list[int]) -> tuple[Path, Path]:
    (root / "img").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "img" / "0.png")
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for k, box in enumerate((first, second))]
    images = [{"id": 1, "file_name": "0.png", "width": 64, "height": 64}]
    return write_coco(root / "ann.json", images, anns, [{"id": 1, "name": "a"}]), root / "img"


@pytest.mark.parametrize(("first", "second"), [(BIG, SMALL), (SMALL, BIG)])
def test_later_box_wins_on_both_paths(tmp_path: Path, first: list[int], second: list[int]) -> None:
    index = load_index(*write_pair(tmp_path, first, second), train=True)
    spec = DataSpec(dataset="coco", input_size=64, test_mode="pad", scale_range=(1.0, 1.0), flip_prob=0.0)
    key = (0, 0)
    workers = collate_train([DetectionDataset(index, spec, 0, train=True)[key]], 1, 4, 0.3)
    source = collate_source([DetectionDataset(index, spec, 0, train=True, on_device=True)[key]], 1, 4, 0.3, 64)
    radius = int(source.pop("max_radius"))
    source.pop("bad_images")
    device = augment_batch(source, radius, 64, 1, 4, 0.3)
    want = [second[2] / 4, second[3] / 4]
    for targets in (workers, device):
        assert targets["wh"][0, :, 7, 7].tolist() == want
        assert targets["offset"][0, :, 7, 7].tolist() == [0.5, 0.5]
        assert targets["reg_weight"].sum().item() == 1.0
        assert targets["heatmap"][0, 0, 7, 7].item() == 1.0
    assert all(torch.equal(workers[k], device[k]) for k in ("heatmap", "wh", "offset", "reg_weight"))
