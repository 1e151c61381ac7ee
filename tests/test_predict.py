"""predict never scores something that is not a face crop as one: every image is searched for faces, an
image that is a crop like the heads' training chips is read whole (the stored features' prediction, bit for
bit), a group photo or a small face is cut per face the way the training chips were made, and an image
without a face or a file that is not an image is a named skip with exit status 1."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featlab.cli import main
from featlab.features.extract import extract
from featlab.features.store import FeatureStore

T1 = Path(str(resources.files("insightface") / "data" / "images" / "t1.jpg"))  # the six friends
SAMPLE = Path(str(resources.files("featlab") / "data" / "utkface-sample"))
FAST = dict(epochs=3, patience=2, verbose=0, baselines=False)


# ------------------------------------------------------------------ geometry (dlib only, no TensorFlow)
def test_group_photo_gives_one_training_like_crop_per_face():
    from featlab.data.faces import UTKFACE_TEMPLATE, training_crops
    from featlab.data.images import load_rgb

    crops = training_crops(load_rgb(T1), UTKFACE_TEMPLATE)
    assert len(crops) == 6 and not any(c.whole for c in crops)
    assert all(c.crop.shape == (200, 200, 3) and c.iou < 0.05 for c in crops)
    assert len({c.box for c in crops}) == 6  # six different faces, none found twice


def test_a_training_chip_is_read_whole_and_a_small_copy_of_it_is_cut_back_out():
    """A chip pasted at half size into a grey 640x480 canvas is no longer a crop: the face is cut out at the
    training chips' scale and place, which gives the chip back (up to the resampling)."""
    import cv2

    from featlab.data.faces import UTKFACE_TEMPLATE, training_crops
    from featlab.data.images import load_rgb

    chip = load_rgb(SAMPLE / "26_0_0_20170113182141220.jpg.chip.jpg")
    (c,) = training_crops(chip, UTKFACE_TEMPLATE)
    assert c.whole and c.crop is chip
    canvas = np.full((480, 640, 3), 128, np.uint8)
    canvas[200:300, 400:500] = cv2.resize(chip, (100, 100), interpolation=cv2.INTER_AREA)
    (small,) = training_crops(canvas, UTKFACE_TEMPLATE)
    assert not small.whole and small.iou < 0.1
    l, t, r, b = small.box
    assert 390 <= l and r <= 510 and 190 <= t and b <= 310  # the face, not the canvas
    # the cut face is the chip again: its centre region matches far better than a shifted copy would
    err = np.abs(small.crop[40:160, 40:160].astype(float) - chip[40:160, 40:160]).mean()
    shifted = np.abs(np.roll(chip, 12, axis=1)[40:160, 40:160].astype(float) - chip[40:160, 40:160]).mean()
    assert err < 12 and err < shifted / 2, (err, shifted)


def test_the_utkface_template_is_what_the_sample_chips_measure():
    from featlab.data.faces import UTKFACE_TEMPLATE, crop_template

    tpl = crop_template(sorted(SAMPLE.glob("*.jpg")), limit=48)
    assert tpl.size == UTKFACE_TEMPLATE.size and tpl.n >= 46
    np.testing.assert_allclose(tpl.points, UTKFACE_TEMPLATE.points, atol=0.015)


# ------------------------------------------------------------------ end to end with trained heads
@pytest.fixture(scope="module")
def heads(utk_small, tmp_path_factory):
    from featlab.study.workflow import train_head

    root = tmp_path_factory.mktemp("predict")
    feats = extract(utk_small, ["res5@avg"], backbone="dlib-age", out=root / "f.h5", progress=False).out
    gender = train_head(feats, "res5@avg", "gender", out_root=root, **FAST)
    age = train_head(feats, "res5@avg", "age", out_root=root, **FAST)
    return feats, gender, age


def test_predict_on_a_group_photo_gives_one_line_per_face_without_detect(heads, capsys):
    _, gender, age = heads
    rc = main(["predict", str(T1), "--head", str(gender), "--head", str(age)])
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if " face " in x]
    assert rc == 0 and len(lines) == 6, out
    assert not any("whole image" in x or "(0, 0, 1279, 885)" in x for x in lines)
    assert all("gender " in x and "age " in x for x in lines)


def test_predict_on_training_chips_reproduces_the_stored_features_prediction(heads):
    from featlab.report.predict import predict_paths

    feats, gender, age = heads
    with FeatureStore.open_read(feats) as s:
        lab = s.labels()
        rows = list(np.flatnonzero(lab.split.to_numpy() == "test")[:8])
        stored = s.read("res5@avg", rows)
    recs = predict_paths([lab.path[r] for r in rows], [gender, age], keep_features=True, echo=lambda *_: None)
    assert [r["face"] for r in recs] == [1] * len(rows)
    # a chip is read whole when the crop its face implies is (nearly) the chip; a tilted, zoomed-in chip (one
    # of these 8 in ../shared) is cut again like a photo, and its features then differ by design
    whole = [i for i, r in enumerate(recs) if r["whole"]]
    assert len(whole) >= 6, [r["path"] for r in recs if not r["whole"]]
    recs, rows, stored = [recs[i] for i in whole], [rows[i] for i in whole], stored[whole]
    np.testing.assert_array_equal(np.stack([r["features"]["res5@avg"] for r in recs]), stored)
    g = pd.read_csv(gender / "predictions.csv").set_index("image_id")
    a = pd.read_csv(age / "predictions.csv").set_index("image_id")
    for r, row in zip(recs, rows):
        iid = lab.image_id[row]
        gender_text, age_text = r["labels"]  # "gender F (0.73)", "age 31.4 y"
        assert gender_text.split()[1] == g.loc[iid, "predicted"].upper()
        assert float(gender_text.split()[2].strip("()")) == pytest.approx(g.loc[iid, "confidence"], abs=0.0051)
        assert float(age_text.split()[1]) == pytest.approx(a.loc[iid, "predicted_age"], abs=0.051)


def test_predict_skips_by_name_and_says_so_in_its_exit_status(heads, tmp_path, capsys):
    from PIL import Image

    _, gender, _ = heads
    Image.new("RGB", (300, 300), (30, 200, 90)).save(tmp_path / "lawn.jpg")
    readme = Path(__file__).resolve().parents[1] / "README.md"
    chip = SAMPLE / "26_0_0_20170113182141220.jpg.chip.jpg"
    rc = main(["predict", str(chip), str(tmp_path / "lawn.jpg"), str(readme), "--head", str(gender)])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"{tmp_path / 'lawn.jpg'}: skipped (no face found)" in out
    assert f"{readme}: skipped (not an image (.md))" in out
    assert "2 of 3 images skipped" in out
    assert sum(" face 1 " in x for x in out.splitlines()) == 1
    # nothing but a text file: one line, exit 2, before the heads load
    rc = main(["predict", str(readme), "--head", str(gender)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "README.md is not an image" in err
    # and the help says exactly these codes
    import re

    from featlab.cli import app
    from typer.main import get_command

    doc = " ".join(get_command(app).commands["predict"].help.split())
    assert re.search(r"0 when every image gave at least one face; 1 when any was skipped beside images that were "
                     r"read; 2 on bad input .*files none of which is an image", doc), doc
