"""Splits that do not leak: groups in the manifest, group-aware splits, face groups; Adience age ranges."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from featlab.data.bins import SCHEMES
from featlab.cli import main
from featlab.data.datasets import prepare_dataset
from featlab.errors import FeatlabError
from featlab.data.manifest import (
    COLUMNS,
    assign_splits,
    hold_out_groups,
    read_manifest,
    to_frame,
    write_manifest,
)

_JPEG: bytes | None = None


def img(path: Path) -> Path:
    global _JPEG
    if _JPEG is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (120, 80, 60)).save(buf, format="JPEG")
        _JPEG = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_JPEG)
    return path


def splits_per_group(df) -> pd.Series:
    return df[df["group"] != ""].groupby("group")["split"].nunique()


# ---------------------------------------------------------------- IMDB: celeb_id
def write_imdb_mat(path: Path, n_celebs: int = 120, seed: int = 0) -> int:
    """An imdb.mat whose celebrities have 1-9 photos each, ages 5-80, both genders; returns the record count."""
    import scipy.io

    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 10, n_celebs)
    n = int(counts.sum())
    celeb = np.repeat(np.arange(1, n_celebs + 1), counts)
    birth_year = np.repeat(rng.integers(1925, 2000, n_celebs), counts)
    taken = np.minimum(birth_year + rng.integers(5, 20, n), 2015)
    gender = np.repeat(rng.integers(0, 2, n_celebs), counts).astype(float)
    cell = np.empty((1, n), dtype=object)
    for i in range(n):
        cell[0, i] = f"{i % 100:02d}/c{celeb[i]}_{i}.jpg"
        img(path.parent / cell[0, i])
    dob = np.array([719529.0 + (y - 1970) * 365.25 for y in birth_year])  # MATLAB datenum of 1 Jan
    fields = {
        "dob": dob[None, :], "photo_taken": taken[None, :].astype(np.uint16), "full_path": cell,
        "gender": gender[None, :], "face_score": np.full((1, n), 3.0), "second_face_score": np.full((1, n), np.nan),
        "celeb_id": celeb[None, :].astype(np.uint16),
    }
    scipy.io.savemat(str(path), {"imdb": fields})
    return n


def test_imdb_split_never_divides_a_celebrity(tmp_path):
    n = write_imdb_mat(tmp_path / "imdb.mat")
    df, _ = prepare_dataset("imdb", tmp_path, seed=3)
    assert len(df) == n and df["group"].str.fullmatch(r"celeb:\d+").all()
    # the group is the celeb_id of the file name's record
    assert all(g == "celeb:" + Path(p).name.split("_")[0][1:] for g, p in zip(df["group"], df["path"]))
    assert df["group"].nunique() == 120
    assert (splits_per_group(df) == 1).all()
    # each celebrity's side is a draw of its own: the count of celebrities per side is binomial (120, share)
    per = df.groupby("group")["split"].first().value_counts()
    for s, want in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert scipy.stats.binomtest(int(per[s]), 120, want).pvalue > 0.01, (s, per[s])
    df2, _ = prepare_dataset("imdb", tmp_path, seed=3)
    assert (df2["split"].to_numpy() == df["split"].to_numpy()).all()
    df4, _ = prepare_dataset("imdb", tmp_path, seed=4)
    assert (df4["split"].to_numpy() != df["split"].to_numpy()).any() and (splits_per_group(df4) == 1).all()


def test_assign_splits_is_order_independent_and_keeps_groups_on_many_rows():
    rng = np.random.default_rng(0)
    n = 6000  # 4,000 ungrouped rows and 200 groups of up to 10 rows
    rows = [{"image_id": f"{i:08x}", "path": f"/x/{i}.jpg", "age": float(rng.integers(0, 90)),
             "gender": "fm"[i % 2], "group": "" if i % 3 else f"p{i // 30}"} for i in range(n)]
    df = to_frame(rows)
    a = assign_splits(df, seed=1)
    assert (splits_per_group(a) == 1).all()
    share = a["split"].value_counts(normalize=True)
    assert abs(share["train"] - 0.7) < 0.02 and abs(share["test"] - 0.2) < 0.02
    b = assign_splits(df.sample(frac=1.0, random_state=5), seed=1)
    assert (a.set_index("image_id")["split"].sort_index() == b.set_index("image_id")["split"].sort_index()).all()


# ---------------------------------------------------------------- CSV: --group-col
def test_csv_group_col_via_cli(tmp_path, capsys):
    lines = ["file,age,sex,subject"]
    for i in range(200):
        img(tmp_path / "img" / f"{i}.jpg")
        subject = "" if i % 10 == 9 else f"s{i // 5}"  # 40 subjects of 4-5 images, 20 images without one
        lines.append(f"img/{i}.jpg,{20 + i % 50},{'mf'[i % 2]},{subject}")
    (tmp_path / "faces.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.csv"
    args = ["prepare", "-d", "csv", "--root", str(tmp_path / "faces.csv"), "--path-col", "file", "--gender-col", "sex",
            "--group-col", "subject", "--out", str(out)]
    assert main(args) == 0
    assert "groups: 40 " in capsys.readouterr().out
    df = read_manifest(out)
    assert len(df) == 200 and (df["group"] == "").sum() == 20
    assert df.loc[df["group"] != "", "group"].value_counts().max() == 5
    assert (splits_per_group(df) == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    # a named group column that is not there: one line, status 2
    assert main(args[:-4] + ["--group-col", "person", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no group column 'person'" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- Adience: user_id, ranges, hold_out_groups
ADIENCE_HEADER = ("user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\t"
                  "fiducial_yaw_angle\tfiducial_score")
ADIENCE_AGES = ["(0, 2)", "(4, 6)", "(8, 13)", "(15, 20)", "(25, 32)", "(38, 43)", "(48, 53)", "(60, 100)", "35"]


def make_adience(root: Path) -> None:
    """5 folds; each fold holds its own users (as Adience does), 6 users x 4-8 images per fold."""
    k = 0
    for fold in range(5):
        lines = [ADIENCE_HEADER]
        for u in range(6):
            user = f"{fold}{u}@N0{u}"
            for j in range(4 + (u + fold) % 5):
                name = f"{k}.jpg"
                age = ADIENCE_AGES[(u + j) % len(ADIENCE_AGES)]
                lines.append(f"{user}\t{name}\t{k}\t{age}\t{'fm'[u % 2]}\t0\t0\t10\t10\t0\t0\t1")
                img(root / "faces" / user / f"coarse_tilt_aligned_face.{k}.{name}")
                k += 1
        (root / f"fold_{fold}_data.txt").write_text("\n".join(lines) + "\n")


def test_adience_groups_ranges_and_group_held_out_validation(tmp_path):
    make_adience(tmp_path)
    df, res = prepare_dataset("adience", tmp_path)
    assert res.has_splits and (df["split"] == "").all()
    assert (df["group"] == [Path(p).parent.name for p in df["path"]]).all()  # user_id
    r = df.set_index(df["path"].map(lambda p: Path(p).name.split(".", 2)[2]))
    label = {}
    for fold in range(5):
        for line in (tmp_path / f"fold_{fold}_data.txt").read_text().splitlines()[1:]:
            f = line.split("\t")
            label[f[1]] = f[3]
    for name, lab in label.items():
        row = r.loc[name]
        if lab.startswith("("):
            lo, hi = (float(x) for x in lab.strip("()").split(","))
            assert (row["age_low"], row["age_high"], row["age"]) == (lo, hi, (lo + hi) / 2)
        else:
            assert row["age_low"] == row["age_high"] == row["age"] == float(lab)
    # the 8 groups take each range directly (its position in ADIENCE_AGES), the bare 35 goes to 38-43
    got = SCHEMES["8"].assign_range(df["age_low"], df["age_high"])
    idx = [ADIENCE_AGES.index(label[Path(p).name.split(".", 2)[2]]) for p in df["path"]]
    want = [5 if i == 8 else i for i in idx]
    assert list(got) == want
    # fold protocol: test fold 0, validation = whole users of the training folds
    train_rows = df[df["fold"] != 0].reset_index(drop=True)
    tr, va = hold_out_groups(train_rows, 0.25, seed=7)
    assert len(tr) + len(va) == len(train_rows) and not set(tr) & set(va)
    users_tr, users_va = set(train_rows["group"].iloc[tr]), set(train_rows["group"].iloc[va])
    assert users_va and not users_tr & users_va
    assert len(users_va) == 7  # about 25 % of the 24 training users (a draw per user)
    _, va2 = hold_out_groups(list(train_rows["group"]), 0.25, seed=7, image_ids=train_rows["image_id"])
    assert (va2 == va).all()
    # a user's side is its own: without one training user, every other user stays where it was
    for gone in sorted(users_tr)[:2] + sorted(users_va)[:2]:
        rest = train_rows[train_rows["group"] != gone].reset_index(drop=True)
        _, va4 = hold_out_groups(rest, 0.25, seed=7)
        assert set(rest["group"].iloc[va4]) == users_va - {gone}
    _, va3 = hold_out_groups(train_rows, 0.25, seed=8)
    assert set(va3) != set(va)


def test_hold_out_groups_empty_group_is_a_singleton_and_bad_share():
    groups = ["a", "a", "a", "", "", "", "b", "b"]
    ids = [f"id{i}" for i in range(len(groups))]
    with pytest.raises(FeatlabError, match="no group and no image id"):  # never keyed by row position
        hold_out_groups(groups, 0.4)
    seen = set()
    for seed in range(30):
        _, va = hold_out_groups(groups, 0.4, seed, image_ids=ids)
        for g in ("a", "b"):
            sides = {i in set(va) for i, x in enumerate(groups) if x == g}
            assert len(sides) == 1
        seen |= {i for i in va if groups[i] == ""}
    assert seen == {3, 4, 5}  # every ungrouped row can be held out alone
    with pytest.raises(FeatlabError, match="between 0 and 1"):
        hold_out_groups(groups, 1.0, image_ids=ids)
    with pytest.raises(FeatlabError, match="1 group"):
        hold_out_groups(["x", "x"], 0.5)


# ---------------------------------------------------------------- manifest columns
def test_old_manifest_reads_with_defaults_and_new_columns_round_trip(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("image_id,path,age,gender,race,split,fold,source\n"
                   "a1,x.jpg,31,m,,train,,utkface\nb2,y.jpg,,f,,test,,utkface\n")
    df = read_manifest(old)
    assert list(df.columns) == COLUMNS and (df["group"] == "").all()
    assert df["age_low"].iloc[0] == df["age_high"].iloc[0] == 31.0
    assert math.isnan(df["age_low"].iloc[1]) and math.isnan(df["age_high"].iloc[1])
    df.loc[0, ["group", "age_low", "age_high", "age"]] = ["u7", 25.0, 32.0, 28.5]
    back = read_manifest(write_manifest(df, tmp_path / "new.csv"))
    assert (back["group"].iloc[0], back["age_low"].iloc[0], back["age_high"].iloc[0]) == ("u7", 25.0, 32.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,path,age,gender,race,split,fold,source,group,age_low,age_high\n"
                   "a1,x.jpg,40,m,,train,,csv,,25,32\n")
    with pytest.raises(FeatlabError, match="outside its range"):
        read_manifest(bad)


# ---------------------------------------------------------------- bins: ranges
def test_assign_range_adience_ranges_and_edges():
    s8, s7, s5 = SCHEMES["8"], SCHEMES["7"], SCHEMES["5"]
    lo = [0, 4, 8, 15, 25, 38, 48, 60, 27, 8, 38]
    hi = [2, 6, 13, 20, 32, 43, 53, 100, 32, 23, 48]
    names = lambda s, idx: [s.names[i] if i >= 0 else None for i in idx]
    assert names(s8, s8.assign_range(lo, hi)) == [
        "0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60+", "25-32", None, None]
    # 5 groups (edges 18, 30, 45, 60): (15, 20) and (25, 32) straddle; (38, 43) is inside 30-44
    assert names(s5, s5.assign_range(lo, hi)) == [
        "0-17", "0-17", "0-17", None, None, "30-44", "45-59", "60+", None, None, None]
    # 7 groups (edges 13, 20, 30, 40, 50, 65): 20 belongs to 20-29, so (15, 20) straddles; so does (13, 20) -> no
    assert list(s7.assign_range([13, 15, 20, 60, 65, 40], [19, 20, 29, 64, 100, 49])) == [1, -1, 2, 5, 6, 4]
    # exact ages behave like assign, NaN -> -1, reversed ranges are an error
    ages = np.array([0, 3, 14, 22, 23, 35, 57, 99.5])
    for s in (s5, s7, s8):
        assert (s.assign_range(ages, ages) == s.assign(ages)).all()
    assert list(s8.assign_range([np.nan, 20], [2, np.nan])) == [-1, -1]
    with pytest.raises(ValueError):
        s8.assign_range(30, 20)


# ---------------------------------------------------------------- face groups
def test_complete_linkage_does_not_chain():
    from featlab.features.facegroups import LINK_DISTANCE, cluster_faces

    step = LINK_DISTANCE * 0.8  # neighbours are linked, their neighbours are not (2 x step > LINK_DISTANCE)
    line = np.zeros((6, 128), dtype=np.float32)
    line[:, 0] = np.arange(6) * step
    far = np.zeros((2, 128), dtype=np.float32)
    far[:, 1] = [5.0, 5.0 + step / 4]  # a tight pair far away
    emb = np.vstack([line, far, np.full((1, 128), np.nan, np.float32)])
    lab = cluster_faces(emb)
    sizes = np.bincount(lab)
    assert sizes[lab[:6]].max() == 2  # single linkage would make one group of 6
    assert lab[6] == lab[7] and lab[8] not in lab[:8]
    single = cluster_faces(emb, method="single")
    assert len(set(single[:6])) == 1


def test_group_by_face_report_and_existing_groups():
    from featlab.features.facegroups import group_by_face

    rows = [{"image_id": f"id{i}", "path": f"/x/{i}.jpg", "age": 30.0, "gender": "f", "split": s, "group": g}
            for i, (s, g) in enumerate([("train", ""), ("test", ""), ("train", ""), ("val", "p"), ("test", "p"),
                                        ("train", ""), ("test", "")])]
    df = to_frame(rows)
    emb = np.zeros((7, 128), dtype=np.float32)
    emb[:, 0] = [0.0, 0.1, 3.0, 6.0, 9.0, 9.25, 12.0]  # 0~1 near-duplicates; 4~5 same person; 3,4 share group p
    emb[6] = np.nan
    out, rep = group_by_face(df, seed=0, resplit=False, embeddings=emb)
    g = list(out["group"])
    assert g[0] == g[1] == "face:id0" and g[2] == "face:id2"
    assert g[3] == g[4] == g[5] == "face:id3"  # p joined with 5 by the face link: one face group
    assert g[6] == ""  # no embedding: its own group
    assert (rep.groups, rep.grouped_faces, rep.largest) == (2, 5, 3)
    assert (rep.near_duplicate_pairs, rep.near_duplicates_across) == (1, 1)
    assert (rep.same_group_pairs, rep.same_group_across) == (4, 4)  # (0,1), (3,4), (3,5), (4,5): all across
    assert rep.test_faces_leaking == 2 and rep.failed == {"non-finite embedding": 1}


def mirrored_recrop(image: np.ndarray) -> np.ndarray:
    import cv2

    crop = image[:, ::-1][8:194, 4:190]  # mirrored, 93 % of the side, off-centre
    return np.ascontiguousarray(cv2.resize(crop, image.shape[1::-1], interpolation=cv2.INTER_LINEAR))


def test_group_by_face_keeps_a_real_face_and_its_mirrored_recrop_together(utk_dir, tmp_path, capsys):
    import shutil

    from PIL import Image

    from featlab.data.images import load_rgb

    names = sorted(p.name for p in utk_dir.glob("*.chip.jpg"))
    adults = [n for n in names if n.split("_")[0].isdigit() and 25 <= int(n.split("_")[0]) <= 60]
    picked = adults[:: max(1, len(adults) // 7)][:7]  # 7 people spread over the folder (8,000 or the 600 sample)
    root = tmp_path / "utk"
    root.mkdir()
    for n in picked:
        shutil.copy(utk_dir / n, root / n)
    original = picked[0]
    copy_name = "_".join(original.split("_")[:3]) + "_20990101000000000.jpg.chip.jpg"
    Image.fromarray(mirrored_recrop(load_rgb(utk_dir / original))).save(root / copy_name, quality=90)
    out = tmp_path / "m.csv"
    assert main(["prepare", "-d", "utkface", "--root", str(root), "--out", str(out), "--group-by-face"]) == 0
    text = capsys.readouterr().out
    assert "face groups (dlib-rec embedding" in text and "re-split by group" in text
    df = read_manifest(out).set_index(read_manifest(out)["path"].map(lambda p: Path(p).name))
    assert len(df) == 8
    a, b = df.loc[original], df.loc[copy_name]
    assert a["group"] == b["group"] != "" and a["split"] == b["split"]
    assert a["group"] == "face:" + min(a["image_id"], b["image_id"])
    assert (df["group"] == a["group"]).sum() == 2  # different people stay apart
    assert df["group"].str.startswith("face:").all()


def _clustered_embeddings(seed: int, n: int = 1200) -> np.ndarray:
    """Low-rank 128-d points in tight clusters that touch: components of hundreds of faces at 0.35."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(8, 128)) / np.sqrt(128)
    centres = rng.normal(size=(60, 8)) * 0.1
    x = (centres[rng.integers(0, 60, n)] + rng.normal(size=(n, 8)) * 0.03) @ basis * 3
    x[::97] = np.nan  # faces without an embedding
    return x.astype(np.float32)


def _full_linkage(emb: np.ndarray, threshold: float) -> np.ndarray:
    """Independent reference: scipy's complete linkage over every finite face at once, cut at the threshold."""
    from scipy.cluster.hierarchy import fcluster, linkage

    ok = np.flatnonzero(np.isfinite(emb).all(axis=1))
    sub = fcluster(linkage(emb[ok].astype(np.float64), method="complete"), threshold, criterion="distance")
    lab = np.arange(len(emb))
    for k in np.unique(sub):
        lab[ok[sub == k]] = ok[sub == k].min()
    return lab


@pytest.mark.parametrize("seed", [0, 1])
def test_scalable_grouping_gives_the_groups_of_full_complete_linkage(seed):
    from scipy.spatial.distance import cdist, pdist

    from featlab.features.facegroups import LINK_DISTANCE, close_pairs, cluster_faces, components

    emb = _clustered_embeddings(seed)
    i, j, d = close_pairs(emb, LINK_DISTANCE)
    assert np.bincount(components(len(emb), i, j)).max() > 100  # large components: the sparse path has work
    # the ball-tree pairs are exactly the brute-force ones
    ok = np.flatnonzero(np.isfinite(emb).all(axis=1))
    dist = cdist(emb[ok].astype(np.float64), emb[ok].astype(np.float64))
    bi, bj = np.nonzero(np.triu(dist <= LINK_DISTANCE, k=1))
    assert np.array_equal(i, ok[bi]) and np.array_equal(j, ok[bj])
    want = _full_linkage(emb, LINK_DISTANCE)
    sparse = cluster_faces(emb, dense_max=2)  # every component of 3+ through the sparse complete linkage
    dense = cluster_faces(emb, dense_max=10**9)  # every component through scipy (the code before this change)
    assert np.array_equal(sparse, want) and np.array_equal(dense, want)
    assert np.bincount(want).max() >= 5
    for g in np.unique(want[np.bincount(want)[want] > 1]):  # complete linkage: every pair in a group is close
        assert pdist(emb[want == g].astype(np.float64)).max() <= LINK_DISTANCE
    # single linkage through the sparse path: the connected components
    assert np.array_equal(cluster_faces(emb, method="single", dense_max=2),
                          cluster_faces(emb, method="single", dense_max=10**9))


def test_group_report_counts_age_bands_warns_on_infants_and_measures_the_written_split(tmp_path):
    from featlab.features.facegroups import group_by_face

    ages = [1, 1, 2, 30, 5, 30, 31, 70, 1, 40, 40, np.nan]
    # groups: {0,1,2} infants; {3,4}: one 30 + one 5 (tie -> younger band); {5,6} adults; {8,9,10}: one infant
    # among two adults; 7 and 11 alone
    pos = [0.0, 0.1, 0.25, 3.0, 3.1, 6.0, 6.1, 9.0, 12.0, 12.1, 12.25, 15.0]
    rows = [{"image_id": f"id{k:02d}", "path": f"/x/{k}.jpg", "age": a, "gender": "f", "split": "train"}
            for k, a in enumerate(ages)]
    emb = np.zeros((len(ages), 128), dtype=np.float32)
    emb[:, 0] = pos
    out, rep = group_by_face(to_frame(rows), seed=0, resplit=True, embeddings=emb)
    bands = {b["band"]: (b["grouped_faces"], b["faces"], b["groups"]) for b in rep.bands}
    assert bands["0-2"] == (4, 4, 1) and bands["3-12"] == (1, 1, 1) and bands["20-39"] == (3, 3, 1)
    assert bands["40-59"] == (2, 2, 1) and bands["60+"] == (0, 1, 0) and bands["unknown"] == (0, 1, 0)
    assert (rep.infant_groups, rep.infant_group_faces) == (1, 3)
    assert any("mostly infants" in line for line in rep.lines())
    assert rep.same_group_across_after is None and "not read back" in " ".join(rep.lines())
    path = write_manifest(out, tmp_path / "m.csv")
    rep.measure_written(path)
    assert (rep.same_group_across_after, rep.near_duplicates_across_after, rep.test_faces_leaking_after) == (0, 0, 0)
    # the count is read from the file: move one face of the infant group to test, and it shows
    df = read_manifest(path)
    g = df.loc[df["image_id"] == "id00", "group"].iloc[0]
    members = df.index[df["group"] == g]
    df.loc[members, "split"] = "train"
    df.loc[members[0], "split"] = "test"
    rep.measure_written(write_manifest(df, tmp_path / "m2.csv"))
    assert rep.same_group_across_after == 2 and rep.test_faces_leaking_after == 1
    # near-duplicates (within 0.2): (0,1), (1,2), (3,4), (5,6), (8,9), (9,10); only (0,1) now lies across
    assert rep.near_duplicate_pairs == 6 and rep.near_duplicates_across_after == 1
    assert "counted on the written manifest" in " ".join(rep.lines())
