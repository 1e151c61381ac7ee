"""Labels that follow the manifest: a features file whose manifest was re-prepared is refused until
`featlab extract` re-syncs its labels (by image id, without running the backbone again)."""

from __future__ import annotations

import shlex
import shutil

import numpy as np
import pytest

from featlab.errors import FeatlabError
from featlab.features.extract import extract
from featlab.data.manifest import assign_splits, read_manifest, write_manifest
from featlab.features.store import FeatureStore

TAP = "res5@avg"


@pytest.fixture(scope="module")
def extracted(utk_small, tmp_path_factory):
    """A features file of the 240 real faces (one small pooled dlib-age tap) and a copy of its manifest."""
    d = tmp_path_factory.mktemp("sync")
    m = d / "utk.csv"
    shutil.copy(utk_small, m)
    out = d / "utk.h5"
    rep = extract(m, [TAP], backbone="dlib-age", out=out, batch_size=64, progress=False)
    assert rep.rows_total == 240
    return m, out


@pytest.fixture
def work(extracted, tmp_path):
    """A fresh copy of the file and its manifest for each test (the file records the manifest's path)."""
    m0, out0 = extracted
    m, out = tmp_path / "utk.csv", tmp_path / "utk.h5"
    shutil.copy(m0, m)
    shutil.copy(out0, out)
    with FeatureStore.open_for_append(out, {}) as s:
        s.set_attr("manifest", str(m.resolve()))
    return m, out


def _no_backbone(monkeypatch):
    """Make any backbone run fail the test."""
    import featlab.features.extract as ex

    def boom(*a, **k):
        raise AssertionError("the backbone ran")

    monkeypatch.setattr(ex, "stored_features", boom)


def test_reprepared_manifest_is_refused_then_resynced_without_the_backbone(work, monkeypatch, capsys):
    m, out = work
    with FeatureStore.open_read(out) as s:
        s.check_labels_current()  # just extracted: current
        before = s.read(TAP)
        old = s.labels()
    df = read_manifest(m)
    new = assign_splits(df, seed=7)
    new.loc[new.index[3], ["age", "age_low", "age_high"]] = 61.0  # an age corrected too
    moved = int((new["split"].to_numpy() != df["split"].to_numpy()).sum())
    assert moved > 50  # another seed moves many faces to another split
    changed = moved + int(new["split"].iloc[3] == df["split"].iloc[3])  # and row 3's age, unless it moved too
    write_manifest(new, m)

    with FeatureStore.open_read(out) as s, pytest.raises(FeatlabError) as e:
        s.check_labels_current()
    msg = str(e.value)
    assert "\n" not in msg and "labels are stale (manifest" in msg and "changed since extraction" in msg
    cmd = msg.split("run `", 1)[1].split("`", 1)[0]
    assert cmd.startswith("featlab extract ") and f"-l {TAP}" in cmd

    from featlab.cli import main

    assert main(["info", str(out)]) == 0
    assert "(labels STALE: re-sync with `featlab extract" in " ".join(capsys.readouterr().out.split())

    # the command the message gives does it, and runs no backbone
    _no_backbone(monkeypatch)
    assert main(shlex.split(cmd)[1:] + ["--quiet"]) == 0
    said = capsys.readouterr().out
    assert f"labels of {changed:,} stored rows re-synced" in said  # the moved rows and the corrected age

    with FeatureStore.open_read(out) as s:
        s.check_labels_current()
        lab = s.labels()
        np.testing.assert_array_equal(s.read(TAP), before)  # taps untouched
        assert s.nrows == 240 and set(s.keys()) == {TAP}
    assert list(lab["image_id"]) == list(old["image_id"])  # rows stay where they are
    want = new.set_index("image_id")
    assert (lab["split"].to_numpy() == want.loc[lab["image_id"], "split"].to_numpy()).all()
    np.testing.assert_array_equal(lab["age"].to_numpy(), want.loc[lab["image_id"], "age"].to_numpy())
    assert lab.loc[lab["image_id"] == new["image_id"].iloc[3], "age"].item() == 61.0

    assert main(["info", str(out)]) == 0
    assert "(labels current)" in capsys.readouterr().out
    rep = extract(m, [TAP], backbone="dlib-age", out=out, progress=False)  # nothing left to do
    assert rep.rows_added == 0 and rep.labels_resynced == 0 and rep.rows_not_in_manifest == 0


def test_rows_that_left_the_manifest_are_kept_out_of_every_split(work, monkeypatch):
    m, out = work
    df = read_manifest(m)
    gone = df["image_id"].iloc[::24].tolist()  # 10 faces
    write_manifest(df[~df["image_id"].isin(gone)], m)
    _no_backbone(monkeypatch)
    rep = extract(m, [TAP], backbone="dlib-age", out=out, progress=False)
    assert rep.rows_added == 0 and rep.rows_not_in_manifest == 10 and rep.labels_resynced == 10
    with FeatureStore.open_read(out) as s:
        s.check_labels_current()
        lab = s.labels().set_index("image_id")
        assert s.nrows == 240
    assert (lab.loc[gone, "split"] == "").all() and (lab.loc[gone, "fold"] == -1).all()
    kept = df[~df["image_id"].isin(gone)].set_index("image_id")
    assert (lab.loc[kept.index, "split"] == kept["split"]).all()
    # back in the manifest: back in its split
    write_manifest(df, m)
    rep = extract(m, [TAP], backbone="dlib-age", out=out, progress=False)
    assert rep.labels_resynced == 10 and rep.rows_not_in_manifest == 0
    with FeatureStore.open_read(out) as s:
        assert (s.labels().set_index("image_id").loc[gone, "split"] == df.set_index("image_id").loc[gone, "split"]).all()


def test_a_manifest_that_is_gone_is_not_refused(work):
    m, out = work
    write_manifest(assign_splits(read_manifest(m), seed=3), m)
    m.unlink()
    with FeatureStore.open_read(out) as s:
        s.check_labels_current()


def test_group_and_age_range_columns_follow_the_manifest(work, monkeypatch):
    """The manifest's ``group``/``age_low``/``age_high`` reach the labels; without them they are '' and the age."""
    m, out = work
    with FeatureStore.open_read(out) as s:
        lab = s.labels()
    assert (lab["group"] == "").all()
    np.testing.assert_array_equal(lab["age_low"], lab["age"])
    np.testing.assert_array_equal(lab["age_high"], lab["age"])

    df = read_manifest(m)
    df["group"] = [f"person{i % 37}" for i in range(len(df))]
    df["age_low"] = df["age"] - 2
    df["age_high"] = df["age"] + 3
    df.loc[df.index[:5], "age_low"] = np.nan  # a row without a range: its age
    write_manifest(df, m)
    _no_backbone(monkeypatch)
    rep = extract(m, [TAP], backbone="dlib-age", out=out, progress=False)
    assert rep.labels_resynced == 240
    with FeatureStore.open_read(out) as s:
        lab = s.labels().set_index("image_id").loc[df["image_id"]]
    assert list(lab["group"]) == list(df["group"])
    np.testing.assert_allclose(lab["age_high"], df["age"] + 3)
    np.testing.assert_allclose(lab["age_low"].iloc[5:], df["age"].iloc[5:] - 2)
    np.testing.assert_allclose(lab["age_low"].iloc[:5], df["age"].iloc[:5])


def test_a_file_from_before_the_new_columns_reads_and_resumes(work, utk_small):
    """An old labels table (7 columns) reads with defaults; extract upgrades it in place and goes on."""
    import tables

    m, out = work
    old_cols = ["image_id", "path", "age", "gender", "race", "split", "fold"]
    with tables.open_file(str(out), "a") as h5:
        t = h5.root.labels.read()
        keep = t[:200]  # as if killed after 200 rows
        desc = {c: h5.root.labels.coldescrs[c] for c in old_cols}
        h5.remove_node("/labels")
        lt = h5.create_table("/", "labels", desc)
        lt.append(np.array([tuple(r[c] for c in old_cols) for r in keep], dtype=lt.dtype))
    with FeatureStore.open_read(out) as s:
        assert s.h5.root.labels.colnames == old_cols
        lab = s.labels()
        assert len(lab) == 200 and (lab["group"] == "").all()
        np.testing.assert_array_equal(lab["age_low"], lab["age"])
    rep = extract(m, [TAP], backbone="dlib-age", out=out, batch_size=64, progress=False)
    assert rep.rows_before == 200 and rep.rows_added == 40 and rep.rows_total == 240
    with FeatureStore.open_read(out) as s:
        assert s.h5.root.labels.colnames[:7] == old_cols and "group" in s.h5.root.labels.colnames
        lab = s.labels()
        assert list(lab["image_id"][:200]) == [x.decode() for x in keep["image_id"]]
        np.testing.assert_array_equal(lab["age_high"], lab["age"])
        assert s.array(TAP).nrows == 240
        s.check_labels_current()
