"""Weight files: find them locally or in the cache, fetch published ones, check their sha256 prefix.

Published checkpoints carry the start of their sha256 in their name (torchvision's
`resnet18-f37072fd.pth`, mmdetection's `...-bb5b3bf7.pth`), so a file is verified from its name alone.
Downloads go to `$CENTERPOINT_CACHE/weights/` (default `~/.cache/centerpoint/weights/`) through the
project's one fetcher (`centerpoint.io.http`: resumed, retried, never over a file it did not write).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from pathlib import Path

from centerpoint.errors import CenterpointError
from centerpoint.io.http import Bar, Expected, fetch, hash_file

__all__ = ["KNOWN_WEIGHTS", "fetch_weights", "name_hash", "resolve_weights", "sha256_of", "verify_name_hash",
           "weights_cache_dir"]

_TORCHVISION = "https://download.pytorch.org/models/"
_MMDET = "https://download.openmmlab.com/mmdetection/v2.0/centernet/"

# File name -> where it is published. A bare file name in a spec or on the command line that is not a
# local file resolves to the cache, and is fetched from here when missing.
KNOWN_WEIGHTS: dict[str, str] = {
    "resnet18-f37072fd.pth": _TORCHVISION + "resnet18-f37072fd.pth",
    "resnet34-b627a593.pth": _TORCHVISION + "resnet34-b627a593.pth",
    "resnet50-0676ba61.pth": _TORCHVISION + "resnet50-0676ba61.pth",
    "centernet_resnet18_140e_coco_20210705_093630-bb5b3bf7.pth":
        _MMDET + "centernet_resnet18_140e_coco/centernet_resnet18_140e_coco_20210705_093630-bb5b3bf7.pth",
    "centernet_resnet18_dcnv2_140e_coco_20210702_155131-c8cd631f.pth":
        _MMDET + "centernet_resnet18_dcnv2_140e_coco/"
        "centernet_resnet18_dcnv2_140e_coco_20210702_155131-c8cd631f.pth",
}

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")
_HINT = "download it yourself and pass the local path"


def weights_cache_dir() -> Path:
    """`$CENTERPOINT_CACHE/weights`, default `~/.cache/centerpoint/weights`."""
    from centerpoint.io.cache import default_cache_dir

    return default_cache_dir() / "weights"


def name_hash(path: Path | str) -> str | None:
    """The sha256 prefix a file name claims (the hex digits after its last '-'), or None."""
    m = _HASH_IN_NAME.search(Path(path).name)
    return m.group(1) if m else None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    hash_file(path, digest)
    return digest.hexdigest()


def verify_name_hash(path: Path) -> str | None:
    """Check a file against the sha256 prefix in its name; returns the prefix checked (None: no claim)."""
    want = name_hash(path)
    if want is None:
        return None
    got = sha256_of(path)
    if not got.startswith(want):
        raise CenterpointError(
            f"{path}: sha256 is {got[:len(want)]}..., but the name says {want}: the file is corrupt or "
            "incomplete; download it again (or rename it if the digits after the last '-' are not a hash)")
    return want


def fetch_weights(url: str, dest_dir: Path | None = None) -> Path:
    """Download `url` once into `dest_dir` (default: the weights cache) and return the local file.

    The file name must carry a sha256 prefix, which is checked; a cached file is re-checked and reused.
    The file appears under its final name only when complete and verified; an interrupted download
    resumes from its `.part` on the next call.
    """
    name = urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name)
    if name_hash(name) is None:
        raise CenterpointError(f"{url}: the file name has no sha256 prefix (NAME-<hex>.pth), so a download "
                               "could not be verified; download it yourself and pass the local path")
    dest = Path(dest_dir or weights_cache_dir()) / name
    if dest.exists():
        # Verified, or not ours to replace: only complete, verified downloads are ever renamed to this name,
        # so a file there that fails the check was put there by someone else (or damaged since).
        try:
            verify_name_hash(dest)
        except CenterpointError:
            raise CenterpointError(f"{dest}: sha256 does not match the prefix in its name (corrupt, incomplete or "
                                   "another file); it is left as it is: delete it and rerun to download it "
                                   "again") from None
        return dest
    from centerpoint.io.monitor import make_progress

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CenterpointError(f"cannot write {dest}: {err.strerror or err}") from None
    with make_progress(transfer=True) as bars:
        # Fewer retries than a dataset download: a run waiting on its backbone (offline, say) fails within ~7 s.
        fetch(url, dest, Expected(name, None, name_hash(name), "sha256"), Bar(bars, name, None), hint=_HINT,
              retries=3)
    return dest


def resolve_weights(path_or_url: Path | str, what: str) -> Path:
    """A local weights file for a path, a URL, or the bare name of a published file.

    An http(s) URL is fetched into the cache. An existing file is used as is. A bare file name listed in
    `KNOWN_WEIGHTS` is taken from the cache, fetched there if missing or damaged. Anything else is an
    error naming `what` (e.g. 'model.pretrained').
    """
    text = str(path_or_url)
    if text.startswith(("http://", "https://")):
        return fetch_weights(text)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.name == text and text in KNOWN_WEIGHTS:
        try:
            return fetch_weights(KNOWN_WEIGHTS[text])  # a verified cached copy is reused
        except CenterpointError as err:
            raise CenterpointError(f"{what}: no verified copy of {text} here or in {weights_cache_dir()}, and "
                                   f"fetching it failed: {err}") from None
    raise CenterpointError(f"{what}: file not found: {path} (give a local file, an http(s) URL, or a published "
                           f"name such as {next(iter(KNOWN_WEIGHTS))})")
