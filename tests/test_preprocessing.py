"""Issue #22 item 5: preprocessing is a named, recorded part of every feature set.

The chip a network sees is cut by a named choice (``template-5pt``: 5-point landmark warp onto the network's
template; ``resize``: the whole crop resized, no landmarks; ``center-crop``). It is recorded by name in the
features file, shown by ``featlab info``, checked on resume, and part of the default features and result
paths when it is not the network's default.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from featlab.cli import main
from featlab.data.manifest import read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def face(utk_manifest):
    from featlab.data.images import load_rgb

    return load_rgb(read_manifest(utk_manifest)["path"].iloc[0])


def _dlib5(img):
    """dlib's 5 landmarks inside the whole image, computed here with dlib itself (not featlab.data.faces)."""
    import dlib

    from featlab.data.faces import shape_predictor_path

    h, w = img.shape[:2]
    shape = dlib.shape_predictor(str(shape_predictor_path()))(img, dlib.rectangle(0, 0, w - 1, h - 1))
    return shape, np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)


def test_the_choices_cut_different_chips_and_template_5pt_is_the_landmark_warp(face):
    import cv2
    import dlib

    from featlab.data.faces import Geometry, warp_arcface

    shape, pts = _dlib5(face)
    warp = Geometry("arcface", 112).chip(face)  # default: template-5pt
    assert Geometry("arcface", 112).preprocessing == "template-5pt"
    np.testing.assert_array_equal(warp, warp_arcface(face, pts, 112))
    resized = Geometry("arcface", 112, preprocessing="resize").chip(face)
    np.testing.assert_array_equal(resized, cv2.resize(face, (112, 112), interpolation=cv2.INTER_AREA))
    assert np.abs(warp.astype(int) - resized.astype(int)).mean() > 10  # a different picture, not rounding
    # the dlib chip: dlib's own get_face_chip of those landmarks, as before (padding 0.25, 150 px)
    chip = Geometry("dlib-chip", 150, 0.25).chip(face)
    np.testing.assert_array_equal(chip, dlib.get_face_chip(face, shape, size=150, padding=0.25))
    assert np.abs(chip.astype(int) - Geometry("dlib-chip", 150, 0.25, "resize").chip(face).astype(int)).mean() > 10
    # center-crop: the centred square, resized (a wide image loses its sides)
    wide = np.ascontiguousarray(np.concatenate([face[:, :50] * 0, face, face[:, :50] * 0], axis=1))
    cc = Geometry("arcface", 112, preprocessing="center-crop").chip(wide)
    np.testing.assert_array_equal(cc, Geometry("arcface", 112, preprocessing="resize").chip(face))


def test_unusable_landmarks_are_a_recorded_skip_not_a_crash(utk_small, tmp_path):
    """A crop where the 5 landmarks cannot drive a warp (an 8x8 thumbnail of a face: dlib puts its eye
    centres 2.5 px apart) is skipped with its reason, counted in the extraction report; with resize, the same
    image is used."""
    import cv2
    from PIL import Image

    from featlab.features.extract import extract
    from featlab.data.faces import NO_LANDMARKS, Geometry, prepare
    from featlab.data.images import BadImage
    from featlab.features.store import FeatureStore

    df = read_manifest(utk_small).iloc[:5]
    thumb = cv2.resize(np.asarray(Image.open(df["path"].iloc[0]).convert("RGB")), (8, 8), interpolation=cv2.INTER_AREA)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(thumb).save(tiny)
    with pytest.raises(BadImage, match="landmarks"):
        Geometry("arcface", 112).chip(thumb)
    assert prepare(str(tiny), Geometry("dlib-chip", 32, 0.2), False) == (None, NO_LANDMARKS)
    assert prepare(str(tiny), Geometry("dlib-chip", 32, 0.2, "resize"), False)[0].shape == (32, 32, 3)
    extra = df.iloc[:1].assign(image_id="0123456789abcdef", path=str(tiny))
    man = write_manifest(__import__("pandas").concat([df, extra]), tmp_path / "m.csv")
    rep = extract(man, ["layer_10_relu"], backbone="dlib-gender", out=tmp_path / "t.h5", progress=False, workers=1)
    assert (rep.rows_total, rep.skipped_added, rep.skip_reasons) == (5, 1, {NO_LANDMARKS: 1})
    with FeatureStore.open_read(tmp_path / "t.h5") as s:
        sk = s.skipped()
        assert sk["path"].tolist() == [str(tiny)] and sk["reason"].tolist() == [NO_LANDMARKS]
    rep = extract(man, ["layer_10_relu"], backbone="dlib-gender", out=tmp_path / "r.h5", progress=False, workers=1,
                  preprocessing="resize")
    assert (rep.rows_total, rep.skipped_added) == (6, 0)


def test_choice_checked_per_geometry_in_one_line(utk_small, capsys):
    from featlab.errors import FeatlabError
    from featlab.data.faces import check_preprocessing
    from featlab.paths import default_preprocessing

    assert default_preprocessing("arcface") == default_preprocessing("dlib-chip") == "template-5pt"
    assert default_preprocessing("resize") == "resize"
    with pytest.raises(FeatlabError, match="needs a face template"):
        check_preprocessing("resize", "template-5pt")
    rc = main(["extract", "-m", str(utk_small), "-b", "dlib-gender", "--preprocessing", "warp", "-o", "x.h5"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown preprocessing 'warp'" in err and "template-5pt, resize, center-crop" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture
def tiny_manifest(utk_small, tmp_path):
    df = read_manifest(utk_small)
    return write_manifest(df.iloc[:6], tmp_path / "tiny.csv")


def test_recorded_shown_refused_on_resume_and_part_of_the_paths(tiny_manifest, tmp_path, capsys, monkeypatch):
    from featlab.paths import dataset_key, feature_set, head_dir
    from featlab.features.store import FeatureStore

    monkeypatch.chdir(tmp_path)
    base = ["extract", "-m", str(tiny_manifest), "-b", "dlib-gender", "-l", "layer_10_relu", "-q"]
    assert main(base + ["--preprocessing", "resize"]) == 0
    assert "preprocessing resize" in capsys.readouterr().out  # the extraction report names it
    assert main(base) == 0
    capsys.readouterr()
    resized = tmp_path / "features" / "dlib-gender" / "tiny-resize.h5"
    warped = tmp_path / "features" / "dlib-gender" / "tiny.h5"  # the default's path is as before
    with FeatureStore.open_read(resized) as a, FeatureStore.open_read(warped) as b:
        ra, rb = a.attrs, b.attrs
        xa, xb = a.read("layer_10_relu"), b.read("layer_10_relu")
    assert ra["preprocessing"]["name"] == "resize" and rb["preprocessing"]["name"] == "template-5pt"
    assert ra["preprocessing"]["geometry"] == rb["preprocessing"]["geometry"] == {"kind": "dlib-chip", "size": 32,
                                                                                    "padding": 0.2}
    assert xa.shape == xb.shape and not np.allclose(xa, xb)  # other chips, other features
    # result paths: the default keeps its folder, the other choice gets its own
    ka, kb = dataset_key(feature_set(ra)), dataset_key(feature_set(rb))
    assert (ka, kb) == ("tiny-resize", "tiny")
    assert head_dir("dlib-gender", ka, "layer_10_relu", "gender") != head_dir("dlib-gender", kb, "layer_10_relu", "gender")
    # info shows it
    assert main(["info", str(resized)]) == 0
    out = capsys.readouterr().out
    assert "preprocessing resize (not the network's default; dlib-chip 32x32, padding 0.2)" in out
    # resuming the file with another choice: one line, nothing written
    size = resized.stat().st_size
    rc = main(base + ["--out", str(resized)])
    err = capsys.readouterr().err
    assert rc == 2 and "different preprocessing (resize, now template-5pt)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert resized.stat().st_size == size
    # the same choice resumes (nothing left to do)
    assert main(base + ["--out", str(resized), "--preprocessing", "resize"]) == 0


def test_a_file_from_before_names_were_recorded_reads_as_the_choice_used_then(tmp_path):
    from featlab.paths import canonical_preprocessing, dataset_key, differences, feature_set
    from featlab.features.store import FeatureStore

    old_dlib = {"geometry": {"kind": "dlib-chip", "size": 150, "padding": 0.25}, "color": "RGB"}
    old_arc = {"geometry": {"kind": "arcface", "size": 112, "padding": 0.0}, "color": "RGB"}
    assert canonical_preprocessing(old_dlib)["name"] == "template-5pt"
    assert canonical_preprocessing(old_arc, align=False)["name"] == "resize"  # featlab resized ArcFace crops then
    assert canonical_preprocessing(old_arc, align=True)["name"] == "template-5pt"
    assert dataset_key({"dataset": "utk", "preprocessing": old_arc}) == "utk-resize"
    assert dataset_key({"dataset": "utk", "preprocessing": old_dlib}) == "utk"
    assert dataset_key({"dataset": "utk", "preprocessing": {"size": 4}, "imported": True}) == "utk-imported"
    new_dlib = {"name": "template-5pt", **old_dlib}
    assert differences({"preprocessing": old_dlib}, {"preprocessing": new_dlib}) == []
    assert differences({"preprocessing": old_arc}, {"preprocessing": {**old_arc, "name": "template-5pt"}}) == [
        "preprocessing (resize vs template-5pt)"]
    # a store written before names resumes under the new identity (same choice) and then names it
    ident = {"backbone": "x", "model_sha256": "ab" * 32, "preprocessing": old_dlib, "flip": False, "align": False}
    FeatureStore.open_for_append(tmp_path / "f.h5", ident).close()
    with FeatureStore.open_for_append(tmp_path / "f.h5", {**ident, "preprocessing": new_dlib}) as s:
        assert feature_set(s.attrs)["preprocessing"]["name"] == "template-5pt"
    from featlab.errors import FeatlabError

    with pytest.raises(FeatlabError, match=r"different preprocessing \(template-5pt, now resize\)"):
        FeatureStore.open_for_append(tmp_path / "f.h5", {**ident, "preprocessing": {**old_dlib, "name": "resize"}})


STUDY_ROWS = Path(__file__).parent / "data" / "dlib-rec-study-embeddings.npz"
SAMPLE = ROOT / "featlab" / "data" / "utkface-sample"


def test_dlib_rec_default_still_cuts_the_study_chips(utk_small, tmp_path):
    """The default preprocessing of dlib-rec gives the embeddings the UTKFace study stored before preprocessing
    became a named choice: 5 rows of its features file (made at 866ce5f), kept in tests/data, whose images
    are in the shipped sample."""
    from featlab.features.extract import extract
    from featlab.features.store import FeatureStore

    ref = np.load(STUDY_ROWS)
    template = read_manifest(utk_small).iloc[[0] * len(ref["files"])].reset_index(drop=True)
    df = template.assign(path=[str(SAMPLE / f) for f in ref["files"]], image_id=list(ref["image_id"]),
                         source="utkface")
    rep = extract(write_manifest(df, tmp_path / "five.csv"), ["embedding"], backbone="dlib-rec",
                  out=tmp_path / "five.h5", progress=False, workers=1)
    assert rep.preprocessing == "template-5pt" and rep.rows_total == 5
    with FeatureStore.open_read(tmp_path / "five.h5") as s:
        got = s.read("embedding").astype(np.float32)
        ids = s.labels()["image_id"].tolist()
    order = [ids.index(i) for i in ref["image_id"]]
    np.testing.assert_allclose(got[order], ref["embedding"].astype(np.float32), atol=2e-3)  # float16 storage


def test_spec_schema_names_every_preprocessing():
    from featlab.data.faces import PREPROCESSINGS
    from featlab.study.schema import PREPROCESSING_NAMES

    assert tuple(PREPROCESSINGS) == PREPROCESSING_NAMES
