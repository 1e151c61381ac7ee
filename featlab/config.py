"""featlab.toml: per-project defaults, read from the working directory.

Example::

    [paths]
    features = "features"      # where extract writes
    results = "results"        # where heads and reports go
    manifest = "features/manifests/utkface.csv"   # default --manifest

    [data]
    utkface = "/data/UTKFace"  # dataset roots, by adapter name

    [models]
    r100 = "/models/glintr100.onnx"   # model files, by backbone name

    [extract]
    backbone = "r100"
    batch_size = 32
    preprocessing = "template-5pt"   # or resize, center-crop (default: the backbone's own)

    [head]
    layer = "stage4_unit1_conv1"
    features = "features/r100/utkface.h5"

Every key is optional; command-line options win over the file.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path

from .errors import FeatlabError

FILE_NAME = "featlab.toml"


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FeatlabError(f"{p}: not valid TOML ({e})") from None


def load(cwd: Path | None = None) -> dict:
    return _load(str((cwd or Path.cwd()) / FILE_NAME))


def get(section: str, key: str, default=None, cwd: Path | None = None):
    return load(cwd).get(section, {}).get(key, default)


def features_dir() -> Path:
    return Path(get("paths", "features", "features"))


def results_dir() -> Path:
    return Path(get("paths", "results", "results"))


def cache_dir() -> Path:
    """Where featlab keeps converted models: $FEATLAB_CACHE, else ~/.cache/featlab."""
    import os

    return Path(os.environ.get("FEATLAB_CACHE") or Path.home() / ".cache" / "featlab")
