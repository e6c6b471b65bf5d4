"""centerpoint: CenterNet ("Objects as Points") object detection on torch.func."""

__version__ = "0.1.0"
