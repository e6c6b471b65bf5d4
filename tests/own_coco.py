"""A tiny COCO-format dataset of the kind users bring: 4 classes with non-contiguous category ids, the
standard layout (annotations/instances_{train,val}.json, train/, val/), images of a few sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 3, "name": "bolt"}, {"id": 7, "name": "nut"}, {"id": 12, "name": "washer"},
              {"id": 40, "name": "spring"}]
# Another set of 3 classes (for fine-tuning from a model trained on the 4 above).
OTHER_CATEGORIES = [{"id": 2, "name": "disc"}, {"id": 5, "name": "tile"}, {"id": 9, "name": "pin"}]
# category id -> (fill colour, ellipse or rectangle)
STYLE = {3: ((230, 60, 60), True), 7: ((60, 200, 60), False), 12: ((70, 90, 240), True),
         40: ((240, 220, 50), False), 2: ((60, 220, 220), True), 5: ((230, 120, 40), False),
         9: ((220, 220, 220), True)}


def write_own_coco(root: Path, train: int = 8, val: int = 4, seed: int = 0,
                   categories: list[dict] | None = None, scale: float = 1.0) -> Path:
    """Write the dataset under `root` (created); returns `root`. Each image holds 1-3 filled shapes whose
    colour and form tell their class (ellipse, rectangle, ...), on a noisy background."""
    categories = categories or CATEGORIES
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    ann_id = 1
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(count):
            w, h = (round(v * scale) for v in [(160, 120), (128, 160), (200, 150)][i % 3])
            pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
            img = Image.fromarray(pixels)
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(1, 4))):
                cat = categories[int(rng.integers(0, len(categories)))]["id"]
                bw, bh = (round(int(rng.integers(18, 48)) * scale) for _ in range(2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                colour, round_ = STYLE[cat]
                (draw.ellipse if round_ else draw.rectangle)([x, y, x + bw - 1, y + bh - 1], fill=colour)
                anns.append({"id": ann_id, "image_id": 1000 + i, "category_id": cat, "bbox": [x, y, bw, bh],
                             "area": bw * bh, "iscrowd": 0})
                ann_id += 1
            img.save(root / split / f"{split}_{i:03d}.jpg", quality=95)
            images.append({"id": 1000 + i, "file_name": f"{split}_{i:03d}.jpg", "width": w, "height": h})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root
