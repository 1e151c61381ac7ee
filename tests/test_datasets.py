"""Dataset adapters on generated miniature datasets, plus real UTKFace faces (../shared or the shipped sample)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import MALFORMED_UTK_NAMES, UTK_IS_SAMPLE, expected_split, usable_faces
from featlab.data.datasets import ADAPTERS, get_adapter, prepare_dataset
from featlab.errors import FeatlabError
from featlab.data.manifest import COLUMNS, make_image_id


_JPEG = None


def jpeg_bytes() -> bytes:
    global _JPEG
    if _JPEG is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (120, 80, 60)).save(buf, format="JPEG")
        _JPEG = buf.getvalue()
    return _JPEG


def img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes())
    return path


def by_name(df):
    return {Path(p).name: r for p, r in zip(df["path"], df.to_dict("records"))}


# ---------------------------------------------------------------- registry / bad input


def test_every_adapter_resolves():
    for name in ADAPTERS:
        assert callable(get_adapter(name))


def test_missing_root(tmp_path):
    with pytest.raises(FeatlabError, match="does not exist"):
        prepare_dataset("utkface", tmp_path / "nope")


def test_unknown_dataset(tmp_path):
    with pytest.raises(FeatlabError, match="unknown dataset 'nosuch'"):
        prepare_dataset("nosuch", tmp_path)


def test_empty_dataset(tmp_path):
    with pytest.raises(FeatlabError, match="no usable images"):
        prepare_dataset("utkface", tmp_path)
    img(tmp_path / "garbage.jpg")
    with pytest.raises(FeatlabError, match="1 skipped: 1 malformed UTKFace"):
        prepare_dataset("utkface", tmp_path)


# ---------------------------------------------------------------- UTKFace


def test_utkface_fake_tree(tmp_path):
    good = ["24_0_1_20170116220224657.jpg.chip.jpg", "1_1_2_2016122022030766.jpg.chip.jpg",  # 16-digit datetime
            "116_0_0_20170112213001988.jpg.chip.jpg", "30_1_4_20170117193420212.jpg"]
    bad = ["24_0_1_20170116220224657 .jpg.chip.jpg",  # stray space
           "39_1_20170116174525125.jpg.chip.jpg",  # missing field
           "55_0_0_20170116232725357jpg.chip.jpg"]  # missing dot
    for n in good + bad:
        img(tmp_path / "part1" / n)
    img(tmp_path / "part1" / "117_0_0_20170112213001988.jpg.chip.jpg")
    df, res = prepare_dataset("utkface", tmp_path)
    assert list(df.columns) == COLUMNS
    rows = by_name(df)
    assert sorted(rows) == sorted(good)
    r = rows["1_1_2_2016122022030766.jpg.chip.jpg"]
    assert (r["age"], r["gender"], r["race"]) == (1.0, "f", "asian")
    r = rows["24_0_1_20170116220224657.jpg.chip.jpg"]
    assert (r["age"], r["gender"], r["race"]) == (24.0, "m", "black")
    assert r["image_id"] == make_image_id("utkface", "part1/24_0_1_20170116220224657.jpg.chip.jpg")
    assert sorted(Path(w).name for w, _ in res.skipped) == sorted(bad + ["117_0_0_20170112213001988.jpg.chip.jpg"])
    assert sum(v for k, v in res.counts.items() if k.startswith("malformed")) == 3
    assert res.counts["age out of UTKFace's range 0..116"] == 1
    assert set(df["split"]) <= {"train", "val", "test"} and df["fold"].isna().all()


# ---------------------------------------------------------------- IMDB-WIKI

# MATLAB serial dates (datenum): 1980-01-01 = 723181, 1990-12-31 = 727198,
# 1970-07-01 = 719710, 1900-07-01 = 694143, 1800-01-01 = 657438, 2015-01-01 = 735965.
IMDB_RECORDS = [
    # name,        dob,         taken, gender, face,    second,  image?
    ("00/good_m", 723181.0, 2010, 1.0, 4.5, np.nan, True),  # 11139 days -> 30.4969
    ("00/good_f", 727198.75, 2000, 0.0, 2.0, np.nan, True),  # 3470 - 0.75 days -> .days 3469
    ("01/noface", 723181.0, 2010, 1.0, -np.inf, np.nan, True),
    ("01/low", 723181.0, 2010, 0.0, 0.5, np.nan, True),  # kept when face_score_min < 0.5
    ("01/edge", 723181.0, 2010, 0.0, 1.0, np.nan, True),  # 1.0 is not above 1.0
    ("02/second", 723181.0, 2010, 1.0, 3.0, 2.0, True),
    ("02/nogender", 723181.0, 2010, np.nan, 3.0, np.nan, True),
    ("03/old", 657438.0, 2010, 1.0, 3.0, np.nan, True),  # 210 years
    ("03/unborn", 735965.0, 2010, 0.0, 3.0, np.nan, True),  # negative age
    ("03/baddob", 0.0, 2010, 0.0, 3.0, np.nan, True),
    ("04/missing", 723181.0, 2010, 1.0, 3.0, np.nan, False),
    ("04/age0", 719710.0, 1970, 1.0, 3.0, np.nan, True),  # exactly 0
    ("04/age100", 694143.0, 2000, 0.0, 3.0, np.nan, True),  # 36525 days: exactly 100
]


def write_mat(path: Path, struct: str, records=IMDB_RECORDS, drop=()):
    import scipy.io

    n = len(records)
    cell = np.empty((1, n), dtype=object)
    names = np.empty((1, n), dtype=object)
    for i, r in enumerate(records):
        cell[0, i] = r[0] + ".jpg"
        names[0, i] = r[0].split("/")[1].upper()
        if r[6]:
            img(path.parent / (r[0] + ".jpg"))
    fields = {
        "dob": np.array([[r[1] for r in records]]),
        "photo_taken": np.array([[r[2] for r in records]], dtype=np.uint16),
        "full_path": cell,
        "gender": np.array([[r[3] for r in records]]),
        "name": names,
        "face_location": np.zeros((1, n)),
        "face_score": np.array([[r[4] for r in records]]),
        "second_face_score": np.array([[r[5] for r in records]]),
    }
    scipy.io.savemat(str(path), {struct: {k: v for k, v in fields.items() if k not in drop}})
    return path


def test_imdb_filters_and_ages(tmp_path):
    write_mat(tmp_path / "imdb.mat", "imdb")
    df, res = prepare_dataset("imdb", tmp_path)
    rows = by_name(df)
    assert sorted(rows) == ["age0.jpg", "age100.jpg", "good_f.jpg", "good_m.jpg"]
    assert rows["good_m.jpg"]["age"] == 11139 / 365.25
    assert rows["good_f.jpg"]["age"] == 3469 / 365.25
    assert rows["age0.jpg"]["age"] == 0.0 and rows["age100.jpg"]["age"] == 100.0
    assert rows["good_m.jpg"]["gender"] == "m" and rows["good_f.jpg"]["gender"] == "f"
    assert rows["good_m.jpg"]["image_id"] == make_image_id("imdb", "00/good_m.jpg")
    assert res.counts == {
        "no face detected (face_score -inf)": 1,
        "face_score <= 1": 2,
        "second face in the image": 1,
        "gender unknown": 1,
        "age outside 0..100": 2,
        "invalid date of birth or photo year": 1,
        "image file not found": 1,
    }
    skipped = {Path(w).name: why for w, why in res.skipped}
    assert skipped["noface.jpg"].startswith("no face") and skipped["unborn.jpg"] == "age outside 0..100"
    assert skipped["missing.jpg"] == "image file not found" and skipped["edge.jpg"] == "face_score <= 1"
    assert not res.has_splits and set(df["split"]) <= {"train", "val", "test"}


def test_imdb_face_score_option(tmp_path):
    write_mat(tmp_path / "imdb.mat", "imdb")
    _, res = prepare_dataset("imdb", tmp_path, face_score_min=0.4)
    assert sorted(Path(r["path"]).name for r in res.rows) == [
        "age0.jpg", "age100.jpg", "edge.jpg", "good_f.jpg", "good_m.jpg", "low.jpg"]
    assert not any(k.startswith("face_score") for k in res.counts)


def test_wiki_and_layouts(tmp_path):
    crop = tmp_path / "wiki_crop"
    crop.mkdir()
    write_mat(crop / "wiki.mat", "wiki")
    for root in (tmp_path, crop, crop / "wiki.mat"):
        df, _ = prepare_dataset("wiki", root)
        assert len(df) == 4 and set(df["source"]) == {"wiki"}
    with pytest.raises(FeatlabError, match="no struct 'imdb'"):
        prepare_dataset("imdb", crop / "wiki.mat")


def test_imdb_bad_files(tmp_path):
    with pytest.raises(FeatlabError, match="no imdb.mat under"):
        prepare_dataset("imdb", tmp_path)
    (tmp_path / "imdb.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated garbage")
    with pytest.raises(FeatlabError, match="cannot read .*imdb.mat") as e:
        prepare_dataset("imdb", tmp_path)
    assert "\n" not in str(e.value)
    write_mat(tmp_path / "imdb.mat", "imdb", drop=("dob",))
    with pytest.raises(FeatlabError, match="lacks field.*dob"):
        prepare_dataset("imdb", tmp_path)


# ---------------------------------------------------------------- Adience

ADIENCE_HEADER = ("user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\t"
                  "fiducial_yaw_angle\tfiducial_score")


def adience_line(user, image, face, age, gender):
    return f"{user}\t{image}\t{face}\t{age}\t{gender}\t0\t414\t1086\t1383\t-115\t30\t17"


def test_adience(tmp_path):
    lines0 = [
        ("u1", "a.jpg", 1, "(25, 32)", "f"),  # 28.5 f
        ("u1", "b.jpg", 2, "35", "m"),  # bare number: exact age
        ("u2", "c.jpg", 3, "(8, 23)", "m"),  # straddles: kept for gender only
        ("u2", "d.jpg", 4, "None", "u"),  # nothing usable
        ("u2", "e.jpg", 5, "(27, 32)", "u"),  # inside 25-32: 29.5, no gender
        ("u3", "f.jpg", 6, "(60, 100)", ""),  # 80, no gender
        ("u3", "g.jpg", 7, "(25, 32)", "f"),  # no image
        ("u3", "h.jpg", 8, "(38, 48)", ""),  # nothing usable
    ]
    (tmp_path / "fold_0_data.txt").write_text(
        "\n".join([ADIENCE_HEADER] + [adience_line(*r) for r in lines0]) + "\n")
    for u, im, face, *_ in lines0:
        if im != "g.jpg":
            img(tmp_path / "faces" / u / f"coarse_tilt_aligned_face.{face}.{im}")
    (tmp_path / "fold_3_data.txt").write_text(ADIENCE_HEADER + "\n" + adience_line("u9", "z.jpg", 1, "(0, 2)", "M") + "\n")
    img(tmp_path / "aligned" / "u9" / "landmark_aligned_face.1.z.jpg")
    (tmp_path / "fold_frontal_0_data.txt").write_text("ignored")

    df, res = prepare_dataset("adience", tmp_path)
    assert res.has_splits and (df["split"] == "").all()
    rows = {Path(p).name.split(".", 2)[2]: r for p, r in zip(df["path"], df.to_dict("records"))}
    assert sorted(rows) == ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "f.jpg", "z.jpg"]
    assert (rows["a.jpg"]["age"], rows["a.jpg"]["gender"]) == (28.5, "f")
    assert (rows["b.jpg"]["age"], rows["b.jpg"]["gender"]) == (35.0, "m")
    assert math.isnan(rows["c.jpg"]["age"]) and rows["c.jpg"]["gender"] == "m"
    assert (rows["e.jpg"]["age"], rows["e.jpg"]["gender"]) == (29.5, "")
    assert (rows["f.jpg"]["age"], rows["f.jpg"]["gender"]) == (80.0, "")
    assert (rows["z.jpg"]["age"], rows["z.jpg"]["gender"], rows["z.jpg"]["fold"]) == (1.0, "m", 3)
    assert "landmark_aligned_face" in rows["z.jpg"]["path"]
    assert {r["fold"] for k, r in rows.items() if k != "z.jpg"} == {0}
    assert res.counts == {
        "kept without age: unusable age range (straddles Adience groups)": 1,
        "kept without gender: gender unknown": 2,
        "no usable age or gender (no age label; gender unknown)": 1,
        "no usable age or gender (unusable age range (straddles Adience groups); gender unknown)": 1,
        "image file not found": 1,
    }
    assert len(res.skipped) == 3


def test_adience_age_labels():
    from featlab.data.datasets.adience import adience_age

    assert adience_age("(0, 2)") == (1.0, "")
    assert adience_age("(8, 12)") == (10.0, "")
    assert adience_age("(38, 42)") == (40.0, "")
    assert adience_age("13") == (13.0, "")
    assert adience_age("(8, 23)")[0] is None
    assert adience_age("(38, 48)")[0] is None
    assert adience_age("None") == (None, "no age label")
    assert adience_age("(x, y)") == (None, "unparsable age label")


def test_adience_bad_input(tmp_path):
    with pytest.raises(FeatlabError, match="no Adience fold files"):
        prepare_dataset("adience", tmp_path)
    (tmp_path / "fold_0_data.txt").write_text("user_id\tage\n1\t2\n")
    with pytest.raises(FeatlabError, match="no column.*original_image"):
        prepare_dataset("adience", tmp_path)


# ---------------------------------------------------------------- All-Age-Faces


def make_aaf(root: Path, labels=True):
    base = root / "All-Age-Faces Dataset"
    names = ["00000A02.jpg", "00001A25.jpg", "07400A40.jpg", "07401A80.jpg", "07402A81.jpg", "07403A33.jpg"]
    for n in names:
        img(base / "aligned faces" / n)
    for n in names[:2]:
        img(base / "original images" / n)  # same faces, unaligned: the aligned copy wins
    img(base / "aligned faces" / "thumbs.jpg")
    if labels:
        (base / "image sets").mkdir()
        # AAF's README format ("%05dA%02d %d", no extension), and with the extension
        (base / "image sets" / "train.txt").write_text("00000A02 0\n07400A40 1\n09999A30 1\nbroken\n")
        (base / "image sets" / "val.txt").write_text("00001A25.jpg 0\r\n07401A80.jpg 1\r\n")
    return base


def test_aaf(tmp_path):
    make_aaf(tmp_path)
    df, res = prepare_dataset("aaf", tmp_path)
    rows = by_name(df)
    assert sorted(rows) == ["00000A02.jpg", "00001A25.jpg", "07400A40.jpg", "07401A80.jpg", "07403A33.jpg"]
    assert all("aligned faces" in r["path"] for r in rows.values())
    assert (rows["00000A02.jpg"]["age"], rows["00000A02.jpg"]["gender"]) == (2.0, "f")
    assert (rows["07400A40.jpg"]["age"], rows["07400A40.jpg"]["gender"]) == (40.0, "m")
    assert (rows["07401A80.jpg"]["gender"], rows["07401A80.jpg"]["split"]) == ("m", "test")
    assert (rows["00001A25.jpg"]["gender"], rows["00001A25.jpg"]["split"]) == ("f", "test")
    assert rows["07403A33.jpg"]["gender"] == ""
    assert rows["00000A02.jpg"]["split"] in ("train", "val")
    assert res.has_splits
    assert res.counts == {
        "malformed AAF file name (expected NNNNNAkk.jpg)": 1,
        "same image name in another folder": 2,
        "malformed label line (expected '<image> 0|1')": 1,
        "in the label files but image file not found": 1,
        "age outside AAF's range 2..80": 1,
        "kept without gender: not in the label files": 1,
    }


def test_aaf_val_carved_from_train(tmp_path):
    sets = tmp_path / "image sets"
    sets.mkdir()
    lines = []
    for i in range(160):
        name = f"{i:05d}A{20 + i % 40:02d}.jpg"
        img(tmp_path / "aligned faces" / name)
        lines.append(f"{name[:-4]} {i % 2}")
    (sets / "train.txt").write_text("\n".join(lines[:128]) + "\n")
    (sets / "val.txt").write_text("\n".join(lines[128:]) + "\n")
    df, _ = prepare_dataset("aaf", tmp_path, seed=5)
    counts = df["split"].value_counts().to_dict()
    # test is AAF's val.txt; val is the 1/8 of train.txt's images whose id hashes (seed 0) below 1/8
    assert counts["test"] == 32 and counts["train"] + counts["val"] == 128
    assert counts == {"train": 111, "val": 17, "test": 32}
    listed = {ln.split()[0] + ".jpg" for ln in lines[128:]}
    assert (df["split"] == "test").to_numpy().tolist() == [Path(p).name in listed for p in df["path"]]
    df2, _ = prepare_dataset("aaf", tmp_path, seed=6)  # the AAF split does not follow --seed
    assert (df2.set_index("image_id")["split"] == df.set_index("image_id")["split"]).all()


def test_aaf_without_labels(tmp_path):
    make_aaf(tmp_path, labels=False)
    df, res = prepare_dataset("aaf", tmp_path)
    assert not res.has_splits and len(df) == 5 and (df["gender"] == "").all()
    assert res.counts["kept without gender: no label files found"] == 5
    assert set(df["split"]) <= {"train", "val", "test"}


# ---------------------------------------------------------------- facial-age


def test_facial_age(tmp_path):
    root = tmp_path / "face_age"
    img(root / "001" / "1.png")
    img(root / "026" / "2.png")
    img(root / "1" / "3.jpg")
    img(root / "notes" / "4.png")
    img(root / "200" / "5.png")
    img(root / "stray.png")
    df, res = prepare_dataset("facial-age", tmp_path)
    assert sorted(zip(df["path"].map(lambda p: Path(p).name), df["age"])) == [("1.png", 1.0), ("2.png", 26.0), ("3.jpg", 1.0)]
    assert res.counts == {"folder name is not an age": 2, "age outside 0..120": 1}
    assert (df["gender"] == "").all() and not res.has_splits
    assert df.loc[df["path"].str.endswith("2.png"), "image_id"].item() == make_image_id("facial-age", "face_age/026/2.png")


# ---------------------------------------------------------------- ChaLearn


def test_chalearn(tmp_path):
    (tmp_path / "train_gt.csv").write_text("image,mean,stdev\n000001.jpg,25.5,3.1\n000002.jpg,40,2\n000099.jpg,30,1\n")
    img(tmp_path / "train" / "000001.jpg")
    img(tmp_path / "train" / "000002.jpg")
    (tmp_path / "Validation.csv").write_text("image;age;stdev\n000001.jpg;12.25;1.0\n000003.jpg;abc;1\n")
    img(tmp_path / "Validation" / "000001.jpg")  # same name as a train image: the folder decides
    img(tmp_path / "Validation" / "000003.jpg")
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "test_gt.csv").write_text("image,mean,stdev\r\n000004.jpg,70.0,5\r\n000005.jpg,33,1\r\n")
    img(tmp_path / "test" / "000004.jpg")
    img(tmp_path / "a" / "000005.jpg")
    img(tmp_path / "b" / "000005.jpg")  # ambiguous
    (tmp_path / "predictions.csv").write_text("image,mean\n000001.jpg,20\n")
    df, res = prepare_dataset("chalearn", tmp_path)
    assert res.has_splits
    got = sorted((Path(p).parent.name, Path(p).name, a, s) for p, a, s in zip(df["path"], df["age"], df["split"]))
    assert got == [("Validation", "000001.jpg", 12.25, "val"), ("test", "000004.jpg", 70.0, "test"),
                   ("train", "000001.jpg", 25.5, "train"), ("train", "000002.jpg", 40.0, "train")]
    assert (df["gender"] == "").all()
    assert res.counts == {"image file not found": 1, "invalid age (not a number in 0..120)": 1, "image name found in several folders": 1,
                          "csv ignored: name says neither train, valid nor test": 1}


def test_chalearn_partial_and_headerless(tmp_path):
    (tmp_path / "Train.csv").write_text("img_1.jpg;21;2.5\nimg_2.jpg;33.5;4\n")
    img(tmp_path / "Train" / "img_1.jpg")
    img(tmp_path / "Train" / "img_2.jpg")
    df, res = prepare_dataset("chalearn", tmp_path)
    assert not res.has_splits  # only a train list: the registry splits
    assert sorted(df["age"]) == [21.0, 33.5]


def test_chalearn_no_csv(tmp_path):
    img(tmp_path / "x.jpg")
    with pytest.raises(FeatlabError, match="no ChaLearn ground-truth CSV"):
        prepare_dataset("chalearn", tmp_path)


# ---------------------------------------------------------------- generic CSV


def test_csv(tmp_path):
    for n in "abce":
        img(tmp_path / "images" / f"{n}.jpg")
    (tmp_path / "labels.csv").write_text(
        "path,age,gender,race\n"
        "images/a.jpg,30,Male,asian\n"
        "images/b.jpg,,f,\n"
        "images/c.jpg,abc,1,\n"  # unparsable age, numeric gender: nothing usable
        "images/d.jpg,20,m,\n"  # no such file
        "images/e.jpg,7.5,WOMAN,\n"
        "images/a.jpg,31,m,\n"  # repeated
    )
    df, res = prepare_dataset("csv", tmp_path / "labels.csv", race_col="race")
    rows = by_name(df)
    assert sorted(rows) == ["a.jpg", "b.jpg", "e.jpg"]
    assert (rows["a.jpg"]["age"], rows["a.jpg"]["gender"], rows["a.jpg"]["race"]) == (30.0, "m", "asian")
    assert math.isnan(rows["b.jpg"]["age"]) and rows["b.jpg"]["gender"] == "f"
    assert (rows["e.jpg"]["age"], rows["e.jpg"]["gender"]) == (7.5, "f")
    assert rows["a.jpg"]["image_id"] == make_image_id("csv", "images/a.jpg")
    assert res.counts == {"kept without age: empty": 1, "no usable age or gender": 1,
                          "image file not found": 1, "duplicate image path": 1}
    assert not res.has_splits
    df2, _ = prepare_dataset("csv", tmp_path)  # the folder's only CSV; race only when asked for
    assert sorted(df2["image_id"]) == sorted(df["image_id"]) and (df2["race"] == "").all()


def test_csv_options_and_splits(tmp_path):
    img(tmp_path / "x" / "1.jpg")
    img(tmp_path / "x" / "2.jpg")
    img(tmp_path / "x" / "3.jpg")
    (tmp_path / "meta.csv").write_text("File;Years;Part\nx/1.jpg;40;Train\nx/2.jpg;41;valid\nx/3.jpg;42;holdout\n")
    (tmp_path / "other.csv").write_text("path,age\n")
    with pytest.raises(FeatlabError, match="exactly one .csv"):
        prepare_dataset("csv", tmp_path)
    df, res = prepare_dataset("csv", tmp_path, csv="meta.csv", path_col="file", age_col="years", split_col="part")
    assert res.has_splits
    assert sorted(zip(df["age"], df["split"])) == [(40.0, "train"), (41.0, "val")]
    assert res.counts == {"unknown split value (expected train/val/test)": 1,
                          "kept without gender: no gender column 'gender' in meta.csv (name it with --gender-col)": 2}


def test_csv_missing_columns(tmp_path):
    img(tmp_path / "1.jpg")
    (tmp_path / "t.csv").write_text("file,label\n1.jpg,3\n")
    with pytest.raises(FeatlabError, match=r"no path column 'path' \(columns found: file, label\)"):
        prepare_dataset("csv", tmp_path / "t.csv")
    with pytest.raises(FeatlabError, match=r"neither an age column .* \(columns found: file, label\)"):
        prepare_dataset("csv", tmp_path / "t.csv", path_col="file")
    with pytest.raises(FeatlabError, match="no age column 'Years'"):
        prepare_dataset("csv", tmp_path / "t.csv", path_col="file", age_col="Years", gender_col="label")
    with pytest.raises(FeatlabError, match="1 no usable age or gender"):  # "3" is no gender
        prepare_dataset("csv", tmp_path / "t.csv", path_col="file", gender_col="label")


# ---------------------------------------------------------------- the real UTKFace dev subset


def test_utkface_real(utk_dir):
    """On ../shared/data/utkface-dev (8,000 usable, 3 malformed names) or the shipped 600-face sample."""
    df, res = prepare_dataset("utkface", utk_dir)
    present = sorted(n for n in MALFORMED_UTK_NAMES if (utk_dir / n).exists())
    assert len(df) == usable_faces(utk_dir) and len(res.skipped) == len(present)
    assert len(df) == (600 if UTK_IS_SAMPLE else 8000) and len(present) == (0 if UTK_IS_SAMPLE else 3)
    assert sorted(Path(w).name for w, _ in res.skipped) == present
    assert df["image_id"].is_unique
    assert dict(df["split"].value_counts()) == expected_split()
    # shares by a hash of each face: within a point on 8,000 faces, 3 binomial standard errors on 600
    frac = df["split"].value_counts(normalize=True)
    for s, want in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        tol = 3 * math.sqrt(want * (1 - want) / len(df)) if UTK_IS_SAMPLE else 0.01
        assert abs(frac[s] - want) < tol, (s, frac[s])
    for g in ("m", "f"):  # not stratified, but unbiased: each gender's shares are close to the target too
        sub = df.loc[df["gender"] == g, "split"].value_counts(normalize=True)
        assert set(sub.index) == {"train", "val", "test"}
        n = int((df["gender"] == g).sum())
        assert abs(sub["train"] - 0.7) < 3 * math.sqrt(0.21 / n) and abs(sub["test"] - 0.2) < 3 * math.sqrt(0.16 / n)
    df2, _ = prepare_dataset("utkface", utk_dir)
    a, b = df.set_index("image_id")["split"], df2.set_index("image_id")["split"]
    assert (a.sort_index() == b.sort_index()).all()
    df3, _ = prepare_dataset("utkface", utk_dir, seed=1)
    assert (df3.set_index("image_id")["split"].sort_index() != a.sort_index()).any()
