"""Shared fixtures: the real UTKFace sample beside the repo, and small manifests made from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UTK = ROOT.parent / "shared" / "data" / "utkface-dev"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # converted models are cached per test session, never in the user's home
    monkeypatch.setenv("FEATLAB_CACHE", str(tmp_path_factory.getbasetemp() / "featlab-cache"))


@pytest.fixture(scope="session")
def utk_dir() -> Path:
    if not UTK.is_dir():
        pytest.skip(f"real UTKFace sample not found at {UTK}")
    return UTK


@pytest.fixture(scope="session")
def utk_manifest(utk_dir, tmp_path_factory) -> Path:
    """Manifest of all 8,000 usable real UTKFace images."""
    from featlab.datasets import prepare_dataset
    from featlab.manifest import write_manifest

    df, _ = prepare_dataset("utkface", utk_dir)
    return write_manifest(df, tmp_path_factory.mktemp("manifests") / "utkface.csv")


@pytest.fixture(scope="session")
def utk_small(utk_manifest, tmp_path_factory) -> Path:
    """A 240-image manifest (every split present), for fast end-to-end runs."""
    from featlab.manifest import read_manifest, write_manifest

    df = read_manifest(utk_manifest)
    small = df.sample(n=240, random_state=0).sort_values("image_id")
    return write_manifest(small, tmp_path_factory.mktemp("manifests") / "utksmall.csv")
