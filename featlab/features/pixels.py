"""Chips kept as pixels, for networks trained from pixels (:mod:`featlab.heads.cnn`): cut once, read every epoch.

Takes a manifest, the backbone whose chips to cut (its geometry and named preprocessing, as extraction cuts
them) and a side in pixels; gives :class:`Chips`: uint8 RGB chips (N, side, side, 3) in manifest order, the
manifest rows they belong to, and the rows that gave no chip with the reason (as the extractor's /skipped).

The cache is one folder per (manifest sha256, backbone, preprocessing, side) under
``{features}/pixels/{dataset}/``: ``chips.npy`` (read memory-mapped), ``rows.json`` (image ids, skipped rows and
reasons, what made them). It is written beside and renamed into place when whole, so an interrupted cut leaves
no cache and the next run cuts again; a manifest that changed gets another folder (its sha256 is in the name).
Decoding and cutting run in worker processes where dlib holds the GIL, as in extraction.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import config
from ..errors import FeatlabError

#: Levi & Hassner resize every face to 256 x 256 and train on 227 x 227 crops of it
FULL_OVER_CROP = 256 / 227


def full_side(size: int) -> int:
    """The side of the chips that ``size`` x ``size`` crops are cut from (256 for the paper's 227)."""
    return int(round(int(size) * FULL_OVER_CROP))


@dataclass
class Chips:
    """Chips of a manifest's rows: ``chips[i]`` is the face of manifest row ``rows[i]``."""

    path: Path
    chips: np.ndarray          # uint8 (N, side, side, 3), memory-mapped
    rows: np.ndarray           # manifest row index of each chip
    image_ids: list
    skipped: dict              # image id -> why it gave no chip
    meta: dict                 # what made them: manifest sha256, backbone, preprocessing, side


def cache_dir(dataset: str, manifest_sha: str, backbone: str, preprocessing: str, side: int, root=None) -> Path:
    base = Path(root) if root is not None else config.features_dir()
    return base / "pixels" / dataset / f"{backbone}-{preprocessing}-{int(side)}px-manifest-{manifest_sha[:12]}"


def chip_geometry(backbone: str, preprocessing: str | None, side: int):
    """(Geometry at ``side`` pixels, the preprocessing's name, its record): the backbone's own way of cutting
    chips (template, padding, named preprocessing) at another size. No model file is needed."""
    from ..backbones.registry import get_spec
    from ..data.faces import Geometry

    spec = get_spec(backbone)
    kind, _, pad = spec.geometry
    g = Geometry(kind, int(side), pad, preprocessing)
    return g, g.preprocessing, {"name": g.preprocessing, "geometry": g.describe(), "from_backbone": backbone,
                                "color": "RGB", "layout": "NHWC"}


def load_chips(manifest, backbone: str = "dlib-rec", preprocessing: str | None = None, side: int = 256,
               align: bool = False, root=None, workers: int | None = None, verbose: bool = True) -> Chips:
    """The chips of every row of ``manifest`` (cut now, or read from the cache); see the module doc."""
    from ..data.manifest import dataset_name, file_sha256, read_manifest

    manifest = Path(manifest)
    if not manifest.is_file():
        raise FeatlabError(f"manifest not found: {manifest} (write one with `featlab prepare`)")
    sha = file_sha256(manifest)
    geometry, prep, record = chip_geometry(backbone, preprocessing, side)
    d = cache_dir(dataset_name(manifest), sha, backbone, prep + ("-align" if align else ""), side, root)
    if not (d / "rows.json").is_file():
        df = read_manifest(manifest)
        _cut(df, geometry, align, d, {"manifest": str(manifest.resolve()), "manifest_sha256": sha,
                                      "backbone": backbone, "preprocessing": record, "align": bool(align),
                                      "side": int(side)}, workers, verbose)
    meta = json.loads((d / "rows.json").read_text())
    chips = np.load(d / "chips.npy", mmap_mode="r")
    return Chips(d, chips, np.asarray(meta["rows"], dtype=np.int64), meta["image_ids"], meta["skipped"],
                 meta["made_by"])


def _cut(df, geometry, align: bool, out: Path, made_by: dict, workers, verbose) -> None:
    from ..data.faces import uses_dlib
    from ..progress import Bar
    from .extract import _batches

    paths = df["path"].astype(str).tolist()
    ids = df["image_id"].astype(str).tolist()
    side = geometry.size
    tmp = out.parent / f".{out.name}.part-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    try:
        arr = np.lib.format.open_memmap(tmp / "chips.npy", mode="w+", dtype=np.uint8, shape=(len(paths), side, side, 3))
        ok = np.zeros(len(paths), dtype=bool)
        skipped = {}
        workers = workers or max(1, min(8, os.cpu_count() or 1))
        t0 = time.perf_counter()
        with Bar(len(paths), f"cutting {side}px chips for training from pixels", "face", enabled=verbose) as bar:
            for start, results in _batches(paths, 64, geometry, align, workers,
                                           prep="process" if uses_dlib(geometry, align) else "thread"):
                for j, (chip, why) in enumerate(results):
                    i = start + j
                    if chip is None:
                        skipped[ids[i]] = why
                    else:
                        arr[i] = chip
                        ok[i] = True
                bar(len(results))
        rows = np.flatnonzero(ok)
        if not len(rows):
            raise FeatlabError(f"no image of the manifest gave a chip (first reason: {next(iter(skipped.values()), '?')})")
        if len(rows) < len(paths):  # keep only the chips: the array is rewritten without the skipped rows
            kept = np.lib.format.open_memmap(tmp / "kept.npy", mode="w+", dtype=np.uint8, shape=(len(rows), side, side, 3))
            for a in range(0, len(rows), 1024):
                kept[a : a + 1024] = arr[rows[a : a + 1024]]
            kept.flush()
            del arr, kept
            os.replace(tmp / "kept.npy", tmp / "chips.npy")
        else:
            arr.flush()
            del arr
        (tmp / "rows.json").write_text(json.dumps({
            "rows": rows.tolist(), "image_ids": [ids[i] for i in rows], "skipped": skipped,
            "made_by": {**made_by, "seconds": round(time.perf_counter() - t0, 1), "n": int(len(rows))}}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FeatlabError(f"cannot write the chip cache {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
