
from PIL import Image

from centerpoint.data.coco import load_index
from centerpoint.spec_io import load_spec
from tests.helpers import write_coco


def _dataset(tmp_path):
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i, (w, h) in enumerate([(20, 40), (100, 80), (64, 64)], start=1):
        Image.new("RGB", (w, h)).save(tmp_path / "img" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": w, "height": h})
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [90, 70, 30, 30], "area": 900, "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [5, 5, 0, 8], "area": 0, "iscrowd": 0},  # degenerate
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [1, 1, 50, 50], "area": 2500, "iscrowd": 1},  # crowd
        {"id": 5, "image_id": 3, "category_id": 7, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},  # only crowd
    ]
    cats = [{"id": 3, "name": "b"}, {"id": 7, "name": "a"}]
    return write_coco(tmp_path / "ann.json", images, anns, cats), tmp_path / "img"


def test_labels_clipping_and_filters(tmp_path):
    ann, img = _dataset(tmp_path)
    train = load_index(ann, img, train=True, min_image_size=32)
    # image 1 is too small (20 px side), image 3 has only a crowd box: both left out of training.
    assert train.image_ids == (2,) and train.dropped_images == 2
    assert train.cat_ids == (3, 7) and train.class_names == ("b", "a")
    assert train.labels[0].tolist() == [0]  # category 3 -> contiguous label 0
    assert train.boxes[0].tolist() == [[90.0, 70.0, 100.0, 80.0]]  # clipped to the 100x80 image
    assert train.dropped_boxes == 1  # the zero-width box
    test = load_index(ann, img, train=False, min_image_size=32)
    assert test.image_ids == (1, 2, 3)  # evaluation keeps every image
    assert load_index(ann, img, train=True).image_ids == (1, 2)


def test_recipes_filter_small_images_like_mmdetection():
    assert load_spec("experiments/centernet_r18_coco.yaml").data.min_image_size == 32
    assert load_spec(None).data.min_image_size == 0
