"""centerpoint: CenterNet ("Objects as Points") object detection on torch.func."""

__version__ = "0.1.0"
__all__ = ["Detections", "Detector"]


def __getattr__(name: str) -> object:
    # The API imports torch: load it on first use, so `import centerpoint` (and the CLI's --help) stays light.
    if name in __all__:
        from centerpoint import api

        return getattr(api, name)
    raise AttributeError(f"module 'centerpoint' has no attribute {name!r}")
