"""Feature sets never mix: heads of a plain and a --flip extraction land apart, compare refuses to put them
together, evaluate refuses the other, and predict prepares chips exactly as the head's features were made."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featlab.errors import FeatlabError
from featlab.features.extract import extract
from featlab.features.store import FeatureStore

FAST = dict(epochs=3, patience=2, verbose=0, baselines=False)


@pytest.fixture(scope="module")
def two_sets(utk_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    plain = extract(utk_small, ["res5@avg"], backbone="dlib-age", out=root / "plain.h5", progress=False).out
    flip = extract(utk_small, ["res5@avg"], backbone="dlib-age", out=root / "flip.h5", flip=True, progress=False).out
    return root, plain, flip


def test_plain_and_flip_heads_land_apart_and_never_mix(two_sets, tmp_path):
    from featlab.report.compare import compare
    from featlab.report.evaluate import evaluate_head
    from featlab.study.workflow import train_head

    _, plain, flip = two_sets
    a = train_head(plain, "res5@avg", "gender", out_root=tmp_path, **FAST)
    b = train_head(flip, "res5@avg", "gender", out_root=tmp_path, **FAST)
    assert a.parts[-4:] == ("dlib-age", "utksmall", "res5@avg", "gender")
    assert b.parts[-4:] == ("dlib-age", "utksmall-flip", "res5@avg", "gender")
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["feature_set"]["flip"] is True and cfg["feature_set"]["pool"] == "avg"
    # each comparison holds its own feature set only
    assert compare("dlib-age", "utksmall", "gender", results_root=tmp_path)["taps"] == ["res5@avg"]
    assert compare("dlib-age", "utksmall-flip", "gender", results_root=tmp_path)["taps"] == ["res5@avg"]
    with pytest.raises(FeatlabError, match="made differently.*flip"):
        evaluate_head(b, features=plain)


def test_predict_with_a_flip_head_reproduces_the_stored_features(two_sets, tmp_path):
    from featlab.report.predict import predict_paths
    from featlab.study.workflow import train_head

    _, _, flip = two_sets
    head = train_head(flip, "res5@avg", "gender", out_root=tmp_path, **FAST)
    with FeatureStore.open_read(flip) as s:
        lab = s.labels()
        rows = [0, 7, 42]
        stored = s.read("res5@avg", rows)
    recs = predict_paths([lab["path"][r] for r in rows], [head], keep_features=True, echo=lambda *_: None)
    got = np.stack([r["features"]["res5@avg"] for r in recs])
    np.testing.assert_array_equal(got, stored)  # the same chips, mirrored and averaged, cast as stored
