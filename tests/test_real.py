"""Real-data runs over every real UTKFace face: the 8,000 of ../shared/data/utkface-dev, or the
600 shipped in featlab when ../shared is absent (see tests/conftest.py).

The extraction test runs by default (about a minute on 2 cores for 8,000
faces); the study that checks featlab's heads against the zero-shot dlib nets
is marked slow and needs the 8,000 faces: run it with `pytest -m slow`
(several minutes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import expected_split, usable_faces
from featlab.features.extract import extract
from featlab.features.store import FeatureStore


@pytest.fixture(scope="module")
def all_faces(utk_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "utkface.h5"
    rep = extract(utk_manifest, ["res4", "res5"], backbone="dlib-age", out=out, progress=False)
    return out, rep


def test_extract_every_real_face_with_dlib_age(all_faces):
    n = usable_faces()  # 8,000, or 600 on the shipped sample
    out, rep = all_faces
    assert rep.rows_total == n and rep.skipped_added == 0
    with FeatureStore.open_read(out) as s:
        assert s.array("res4").shape == (n, 256, 3, 3) and s.array("res5").shape == (n, 256, 3, 3)
        lab = s.labels()
        assert lab["image_id"].is_unique and len(lab) == n
        assert dict(lab["split"].value_counts()) == expected_split()
        x = s.read("res5", slice(0, 500))
        assert np.isfinite(x).all() and x.std() > 0.01


def test_streamed_training_matches_in_memory_on_an_age_sorted_file(all_faces, utk_full_manifest, tmp_path):
    """UTKFace's manifest is sorted by file name, i.e. by age: a stream that only shuffled within file chunks
    would see one age range after another. Streamed with a tiny budget, the head must score like in memory
    (within 1.5 points: needs the 1,638 test faces of the 8,000; 110 sample faces cannot resolve that)."""
    from featlab.study.workflow import train_head

    out, _ = all_faces
    with FeatureStore.open_read(out) as s:
        age = s.labels()["age"].to_numpy()
    assert np.corrcoef(np.arange(len(age))[:4000], age[:4000])[0, 1] > 0.3  # the file really is age-sorted
    kw = dict(epochs=25, patience=5, verbose=0, baselines=False, seed=1)
    mem = train_head(out, "res5", "bins", 5, out_root=tmp_path / "mem", **kw)
    st = train_head(out, "res5", "bins", 5, out_root=tmp_path / "stream", memory_mb=4, **kw)
    cfg = json.loads((st / "config.json").read_text())
    assert cfg["data_loading"].startswith("streamed")
    a = json.loads((mem / "metrics.json").read_text())["test"]["metrics"]["accuracy"]
    b = json.loads((st / "metrics.json").read_text())["test"]["metrics"]["accuracy"]
    assert abs(a - b) < 0.015, (a, b)


@pytest.mark.slow
def test_heads_beat_the_zero_shot_dlib_nets(utk_full_manifest, tmp_path, monkeypatch):
    """On UTKFace, dlib-age's own output scores MAE ~6.2 and ~60 % on the 8 Adience groups, dlib-gender ~92 %."""
    from featlab.study.workflow import train_head

    monkeypatch.chdir(tmp_path)
    rep = extract(utk_full_manifest, ["res14"], backbone="dlib-rec", out=tmp_path / "rec.h5", progress=False)
    got = {}
    for target, cats in (("age", None), ("bins", 8), ("gender", None)):
        d = train_head(rep.out, "res14", target, cats, verbose=0)
        got[target] = json.loads((d / "metrics.json").read_text())["test"]["metrics"]
    assert got["age"]["mae"] < 6.2
    assert got["bins"]["accuracy"] > 0.60
    assert got["gender"]["accuracy"] > 0.92
