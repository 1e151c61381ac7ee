"""Shared fixtures: real UTKFace faces, and small manifests made from them.

The real faces come from ``../shared/data/utkface-dev`` (8,003 files, 8,000
usable) when that folder is beside the repository, else from the 600-face
sample shipped in ``featlab/data/utkface-sample/``: the same code paths run
either way, and tests whose figures depend on the source compute them from it
(``UTK_IS_SAMPLE``, ``expected_split``). Set ``FEATLAB_NO_SHARED=1`` to use the
shipped sample even when ``../shared`` is there (what a fresh clone sees).
Only what truly needs the 8,000 faces asks for ``utk_full_manifest``, which
skips, saying why, on the sample.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# progress bars off in the suite (and in the CLI processes it starts); tests/test_progress.py turns them on
os.environ["FEATLAB_QUIET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
SHARED_UTK = ROOT.parent / "shared" / "data" / "utkface-dev"
SAMPLE_UTK = ROOT / "featlab" / "data" / "utkface-sample"


def _real_faces_dir() -> Path:
    if os.environ.get("FEATLAB_NO_SHARED", "").strip() not in ("", "0") or not SHARED_UTK.is_dir():
        return SAMPLE_UTK
    return SHARED_UTK


UTK = _real_faces_dir()
UTK_IS_SAMPLE = UTK == SAMPLE_UTK

#: The three UTKFace files of ../shared whose names do not parse (the sample has none of them).
MALFORMED_UTK_NAMES = ("24_0_1_20170116220224657 .jpg.chip.jpg", "39_1_20170116174525125.jpg.chip.jpg",
                       "55_0_0_20170116232725357jpg.chip.jpg")

#: The seeded split (seed 0) of every usable face, per source: a regression check of the split itself.
EXPECTED_SPLIT = {
    "utkface-dev": {"train": 5562, "val": 800, "test": 1638},
    "utkface-sample": {"train": 435, "val": 55, "test": 110},
}


def expected_split() -> dict[str, int]:
    return EXPECTED_SPLIT[UTK.name]


def usable_faces(folder: Path = UTK) -> int:
    """Usable images of a UTKFace folder, counted without featlab: every .jpg but the known malformed names."""
    files = [p.name for p in folder.iterdir() if p.name.endswith(".jpg")]
    return len(files) - sum(n in MALFORMED_UTK_NAMES for n in files)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # converted models are cached per test session, never in the user's home
    monkeypatch.setenv("FEATLAB_CACHE", str(tmp_path_factory.getbasetemp() / "featlab-cache"))


@pytest.fixture(scope="session")
def utk_dir() -> Path:
    """Real UTKFace crops: ../shared/data/utkface-dev, or the shipped 600-face sample (see the module doc)."""
    return UTK


@pytest.fixture(scope="session")
def utk_manifest(utk_dir, tmp_path_factory) -> Path:
    """Manifest of every usable real face of ``utk_dir`` (8,000, or 600 on the sample)."""
    from featlab.data.datasets import prepare_dataset
    from featlab.data.manifest import write_manifest

    df, _ = prepare_dataset("utkface", utk_dir)
    return write_manifest(df, tmp_path_factory.mktemp("manifests") / "utkface.csv")


@pytest.fixture(scope="session")
def utk_full_manifest(request) -> Path:
    """The 8,000-face manifest, for checks calibrated on all of them; skips on the shipped sample."""
    if UTK_IS_SAMPLE:
        pytest.skip(f"needs the 8,000 faces of {SHARED_UTK} (its thresholds are calibrated on them); "
                    "the shipped 600-face sample is too small for them")
    return request.getfixturevalue("utk_manifest")


@pytest.fixture(scope="session")
def utk_small(utk_manifest, tmp_path_factory) -> Path:
    """A 240-image manifest (every split present), for fast end-to-end runs."""
    from featlab.data.manifest import read_manifest, write_manifest

    df = read_manifest(utk_manifest)
    small = df.sample(n=240, random_state=0).sort_values("image_id")
    return write_manifest(small, tmp_path_factory.mktemp("manifests") / "utksmall.csv")
