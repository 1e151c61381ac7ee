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
from featlab.extract import extract
from featlab.store import FeatureStore


def test_extract_every_real_face_with_dlib_age(utk_manifest, tmp_path):
    n = usable_faces()  # 8,000, or 600 on the shipped sample
    out = tmp_path / "utkface.h5"
    rep = extract(utk_manifest, ["res4", "res5"], backbone="dlib-age", out=out, progress=False)
    assert rep.rows_total == n and rep.skipped_added == 0
    with FeatureStore.open_read(out) as s:
        assert s.array("res4").shape == (n, 256, 3, 3) and s.array("res5").shape == (n, 256, 3, 3)
        lab = s.labels()
        assert lab["image_id"].is_unique and len(lab) == n
        assert dict(lab["split"].value_counts()) == expected_split()
        x = s.read("res5", slice(0, 500))
        assert np.isfinite(x).all() and x.std() > 0.01


@pytest.mark.slow
def test_heads_beat_the_zero_shot_dlib_nets(utk_full_manifest, tmp_path, monkeypatch):
    """On UTKFace, dlib-age's own output scores MAE ~6.2 and ~60 % on the 8 Adience groups, dlib-gender ~92 %."""
    from featlab.heads import train_head

    monkeypatch.chdir(tmp_path)
    rep = extract(utk_full_manifest, ["res14"], backbone="dlib-rec", out=tmp_path / "rec.h5", progress=False)
    got = {}
    for target, cats in (("age", None), ("bins", 8), ("gender", None)):
        d = train_head(rep.out, "res14", target, cats, verbose=0)
        got[target] = json.loads((d / "metrics.json").read_text())["metrics"]
    assert got["age"]["mae"] < 6.2
    assert got["bins"]["accuracy"] > 0.60
    assert got["gender"]["accuracy"] > 0.92
