"""Splits that are a function of the face, not of the file (issue #29, item 1).

A face's split depends on its group key (the ``group``, or its ``image_id``
when it has none) and the seed alone: deleting a row, losing an image or
appending rows never moves another face, and under ``--group-by-face`` only
faces whose group changed may move. All on real UTKFace faces.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from featlab.cli import main
from featlab.data.datasets import prepare_dataset
from featlab.features.facegroups import group_by_face
from featlab.data.manifest import assign_splits, balance_lines, hold_out_groups, read_manifest, split_balance


def faces(utk_manifest, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` real faces (path, age, gender) drawn from the manifest of ``utk_dir``."""
    df = read_manifest(utk_manifest)
    return df.sample(n=n, random_state=seed).reset_index(drop=True)


def write_csv(path, rows: pd.DataFrame, group: bool = False):
    cols = ["path", "age", "gender"] + (["person"] if group else [])
    rows[cols].to_csv(path, index=False)
    return path


def sides(df: pd.DataFrame) -> pd.Series:
    """Split per face, keyed by the image's file (the CSV adapter's image id depends on the CSV's folder)."""
    return df.set_index(df["path"].map(lambda p: p.rsplit("/", 1)[-1]))["split"]


def moved(a: pd.Series, b: pd.Series) -> set:
    common = a.index.intersection(b.index)
    assert len(common) > 0
    return set(common[(a[common] != b[common]).to_numpy()])


@pytest.fixture(scope="module")
def pool(utk_manifest):
    """600 real faces: 500 in the CSV, 100 to append; two thirds with a person id (pairs, a tenth left alone)."""
    df = faces(utk_manifest, 600, seed=3)
    rng = np.random.default_rng(0)
    person = [f"p{i // 3}" if i % 3 else "" for i in range(len(df))]  # pairs of faces, a third ungrouped
    df["person"] = [p if rng.random() < 0.9 else "" for p in person]
    return df


@pytest.mark.parametrize("group", [False, True])
def test_csv_split_does_not_move_when_rows_change(pool, tmp_path, group):
    """Delete any one row, point one path at a missing file, append 100 rows: no other face moves."""
    base, extra = pool.iloc[:500], pool.iloc[500:]
    opts = {"group_col": "person"} if group else {}
    ref, _ = prepare_dataset("csv", write_csv(tmp_path / "a.csv", base, group), **opts)
    ref_side = sides(ref)
    assert len(ref) == 500 and set(ref["split"]) == {"train", "val", "test"}
    for drop in (0, 137, 251, 499):  # first, middle, a grouped row, last
        name = base["path"].iloc[drop].rsplit("/", 1)[-1]
        df, _ = prepare_dataset("csv", write_csv(tmp_path / "b.csv", base.drop(index=drop), group), **opts)
        assert len(df) == 499 and name not in set(sides(df).index)
        assert moved(ref_side, sides(df)) == set(), f"deleting row {drop} moved other faces"
    missing = base.copy()
    missing.loc[200, "path"] = str(tmp_path / "gone.jpg")
    df, res = prepare_dataset("csv", write_csv(tmp_path / "c.csv", missing, group), **opts)
    assert len(df) == 499 and len(res.skipped) == 1
    assert moved(ref_side, sides(df)) == set()
    df, _ = prepare_dataset("csv", write_csv(tmp_path / "d.csv", pd.concat([base, extra]), group), **opts)
    assert len(df) == 600
    assert moved(ref_side, sides(df)) == set()
    # and the appended faces got the split they get on their own
    alone, _ = prepare_dataset("csv", write_csv(tmp_path / "e.csv", extra, group), **opts)
    assert moved(sides(alone), sides(df)) == set()


def test_prepare_cli_names_the_balance_and_keeps_faces(pool, tmp_path, capsys):
    """Through `featlab prepare`: one image gone, every other face keeps its side; the balance table printed."""
    base = pool.iloc[:300].copy()
    write_csv(tmp_path / "a.csv", base)
    assert main(["prepare", "-d", "csv", "--root", str(tmp_path / "a.csv"), "-o", str(tmp_path / "a_m.csv")]) == 0
    out = capsys.readouterr().out
    a = read_manifest(tmp_path / "a_m.csv")
    lines = out.splitlines()
    i = next(k for k, ln in enumerate(lines) if "% gender" in ln)
    table = lines[i + 2:i + 6]
    assert [ln.split()[0] for ln in table] == ["train", "val", "test", "all"]
    n = a["split"].value_counts()
    for ln in table[:3]:
        name, rows, groups, share = ln.split()[:4]
        assert int(rows.replace(",", "")) == n[name] == int(groups.replace(",", ""))
        assert share == f"{100 * n[name] / len(a):.1f}%"
    base.loc[17, "path"] = str(tmp_path / "gone.jpg")
    write_csv(tmp_path / "b.csv", base)
    assert main(["prepare", "-d", "csv", "--root", str(tmp_path / "b.csv"), "-o", str(tmp_path / "b_m.csv")]) == 0
    b = read_manifest(tmp_path / "b_m.csv")
    assert len(b) == 299 and moved(sides(a), sides(b)) == set()


def test_each_face_gets_the_split_it_gets_alone(utk_manifest):
    """The split of a face is a function of its own row: the same in the whole table as in a table of one."""
    df = read_manifest(utk_manifest)
    full = assign_splits(df, seed=0)
    for i in np.random.default_rng(1).choice(len(df), 40, replace=False):
        assert assign_splits(df.iloc[[i]], seed=0)["split"].item() == full["split"].iloc[i]
    # reordered rows: the same split per face
    shuf = assign_splits(df.sample(frac=1.0, random_state=2), seed=0)
    assert (shuf.set_index("image_id")["split"].sort_index() == full.set_index("image_id")["split"].sort_index()).all()


def test_shares_and_seed(utk_manifest):
    """Shares within about a point on the 8,000 real faces (3 binomial s.e. on the 600 of the sample);
    another seed gives another, independent split: agreement near 0.7^2 + 0.1^2 + 0.2^2 = 0.54."""
    df = read_manifest(utk_manifest)
    n = len(df)
    a = assign_splits(df, seed=0)["split"]
    share = a.value_counts(normalize=True)
    for s, want in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(share[s] - want) < max(0.01, 3 * math.sqrt(want * (1 - want) / n)), (s, share[s])
    assert (assign_splits(df, seed=0)["split"] == a).all()
    b = assign_splits(df, seed=1)["split"]
    agree = float((a == b).mean())
    assert abs(agree - 0.54) < 4 * math.sqrt(0.54 * 0.46 / n), agree
    # custom fractions, one of them zero
    c = assign_splits(df, seed=0, fractions=(0.5, 0.5, 0.0))["split"]
    assert set(c) == {"train", "val"} and abs((c == "train").mean() - 0.5) < 4 * math.sqrt(0.25 / n)


def test_hold_out_is_stable_when_rows_change(utk_manifest):
    """The validation faces held out of training rows do not move when other rows come or go."""
    df = read_manifest(utk_manifest).iloc[:400].reset_index(drop=True)
    df["group"] = [f"p{i // 4}" if i % 2 else "" for i in range(len(df))]
    _, va = hold_out_groups(df, 0.1, seed=7919)
    held = set(df["image_id"].iloc[va])
    assert abs(len(va) / len(df) - 0.1) < 0.06
    for drop in (0, 1, 200, 399):
        rest = df.drop(index=drop).reset_index(drop=True)
        _, va2 = hold_out_groups(rest, 0.1, seed=7919)
        assert set(rest["image_id"].iloc[va2]) == held - {df["image_id"].iloc[drop]}
    _, va3 = hold_out_groups(df, 0.1, seed=1)
    assert set(df["image_id"].iloc[va3]) != held


def planted_embeddings(n: int, clusters: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random 128-d descriptors far apart (~1.4), with ``clusters`` planted triples within 0.1 of a centre."""
    emb = rng.normal(size=(n, 128))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cluster = np.full(n, -1)
    for c in range(clusters):
        idx = np.arange(3 * c, 3 * c + 3)
        noise = rng.normal(size=(3, 128))
        emb[idx] = emb[3 * c] + 0.03 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        cluster[idx] = c
    return emb.astype(np.float32), cluster


def grouped(df, emb):
    out, rep = group_by_face(df, seed=0, resplit=True, embeddings=emb)
    return out.set_index("image_id"), rep


def test_group_by_face_moves_only_faces_whose_group_changed(utk_manifest):
    """300 real faces with planted descriptors (30 triples): removing a face, adding 100, shuffling the rows or
    adding a face to a group moves no face whose group key stayed the same."""
    df = assign_splits(read_manifest(utk_manifest).iloc[:400].reset_index(drop=True), seed=0)
    rng = np.random.default_rng(4)
    emb_all, cluster_all = planted_embeddings(400, 30, rng)
    base, emb = df.iloc[:300].reset_index(drop=True), emb_all[:300]
    ref, rep = grouped(base, emb)
    assert rep.groups == 30 and rep.grouped_faces == 90
    assert (ref.groupby("group")["split"].nunique() == 1).all()

    def only_changed_moved(new):
        common = ref.index.intersection(new.index)
        key_changed = ref.loc[common, "group"] != new.loc[common, "group"]
        side_changed = ref.loc[common, "split"] != new.loc[common, "split"]
        assert not (side_changed & ~key_changed).any(), "a face whose group did not change moved"
        return int(key_changed.sum()), int(side_changed.sum())

    # shuffled rows: same groups, same split
    perm = np.random.default_rng(5).permutation(300)
    new, _ = grouped(base.iloc[perm].reset_index(drop=True), emb[perm])
    assert only_changed_moved(new) == (0, 0)
    # remove a face alone, and the face that names a triple (its smallest image id)
    lone = 200
    trip = base.index[cluster_all[:300] == 5]
    first = int(trip[np.argmin(base["image_id"].iloc[trip].to_numpy())])
    for drop in (lone, first):
        keep = np.setdiff1d(np.arange(300), [drop])
        new, _ = grouped(base.iloc[keep].reset_index(drop=True), emb[keep])
        changed, _ = only_changed_moved(new)
        assert changed == (0 if drop == lone else 2)  # the other two faces of the triple get a new name
    # append 100 faces (one joins triple 7 as a fourth member)
    more = emb_all.copy()
    tri7 = np.flatnonzero(cluster_all == 7)
    more[399] = more[tri7[0]] + 0.01
    new, _ = grouped(df, more)
    changed, _ = only_changed_moved(new)
    joined = df["image_id"].iloc[399]
    assert new.loc[joined, "group"] == new.loc[df["image_id"].iloc[tri7[0]], "group"]
    smallest = min(df["image_id"].iloc[list(tri7) + [399]])
    assert changed == (3 if smallest == joined else 0)


def test_split_balance_equals_a_crosstab(utk_manifest):
    """split_balance against an independent pandas crosstab (Adience's 8 groups cut by pd.cut on their edges)."""
    df = assign_splits(read_manifest(utk_manifest), seed=0)
    df.loc[df.index[:5], "gender"] = ""  # unknown gender
    df.loc[df.index[5:9], ["age", "age_low", "age_high"]] = np.nan  # unknown age
    df.loc[df.index[9], ["age", "age_low", "age_high"]] = [30.0, 25.0, 35.0]  # a range across two groups
    df.loc[df.index[10:40], "group"] = [f"g{i // 3}" for i in range(30)]
    df = assign_splits(df, seed=0)
    b = split_balance(df)
    assert list(b.index) == ["train", "val", "test", "all"]
    rows = df["split"].value_counts()
    assert b.loc[["train", "val", "test"], "rows"].tolist() == [rows[s] for s in ("train", "val", "test")]
    assert b.loc["all", "rows"] == len(df) and b["share"].iloc[:3].sum() == pytest.approx(1.0)
    key = df["group"].where(df["group"] != "", "id:" + df["image_id"])
    assert b.loc["train", "groups"] == key[df["split"] == "train"].nunique()
    assert b.loc["all", "groups"] == key.nunique() == len(df) - 20
    g = df["gender"].replace("", "gender ?")
    want = pd.crosstab(df["split"], g, normalize="index")
    for s in ("train", "val", "test"):
        for c in ("f", "m", "gender ?"):
            assert b.loc[s, c] == pytest.approx(want.loc[s, c])
    edges = [0, 3, 7, 14, 22.5, 35, 45.5, 56.5, np.inf]
    names = ["0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60+"]
    lo = pd.cut(df["age_low"], edges, right=False, labels=names)
    hi = pd.cut(df["age_high"], edges, right=False, labels=names)
    age = lo.astype(object).where((lo == hi) & lo.notna(), "age ?")
    want = pd.crosstab(df["split"], age, normalize="index")
    for s in ("train", "val", "test"):
        for c in names + ["age ?"]:
            assert b.loc[s, c] == pytest.approx(want.loc[s, c]), (s, c)
    whole = age.value_counts(normalize=True)
    for c in names:
        assert b.loc["all", c] == pytest.approx(whole[c])
    lines = balance_lines(df)
    assert len(lines) == 6 and lines[2].split()[:3] == ["train", f"{rows['train']:,}", f"{b.loc['train', 'groups']:,}"]


def test_split_balance_by_fold():
    """A dataset with folds (Adience) is balanced per fold."""
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(10)], "path": "", "gender": list("fmfmfmffmm"),
                       "split": "", "fold": pd.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2], dtype="Int64"),
                       "group": ["u1", "u1", "u2", "u3", "u3", "u3", "u4", "u5", "u6", "u6"],
                       "age": 30.0, "age_low": 25.0, "age_high": 32.0})
    b = split_balance(df)
    assert list(b.index) == ["fold 0", "fold 1", "fold 2", "all"]
    assert b["rows"].tolist() == [3, 4, 3, 10] and b["groups"].tolist() == [2, 2, 2, 6]
    assert b.loc["fold 1", "f"] == pytest.approx(0.5) and b.loc["all", "25-32"] == 1.0
