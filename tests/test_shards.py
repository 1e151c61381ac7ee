"""Sharded extraction (featlab.features.shards): 2 writers over 400 real UTKFace faces with planted bad images read back
as one store, row for row a single-process run's; a SIGKILLed worker resumes with exactly its missing rows;
a shard of another identity, count or slicing is refused in one line. Backbone: the embedded dlib-age (cheap)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featlab.errors import FeatlabError
from featlab.features.extract import extract
from featlab.data.manifest import read_manifest, write_manifest
from featlab.features.shards import extract_sharded
from featlab.features.store import FeatureStore, ShardedStore, shard_bounds, shard_path

TAPS = ["res4", "res5"]
BAD_AT = {37: "garbage", 201: "truncated", 355: "empty"}  # manifest rows replaced by unusable files


@pytest.fixture(scope="module")
def manifest(utk_manifest, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    df = read_manifest(utk_manifest).sort_values("image_id").iloc[:400].reset_index(drop=True)
    face = Path(df["path"].iloc[0]).read_bytes()
    for row, kind in BAD_AT.items():
        p = d / f"{kind}.jpg"
        p.write_bytes({"garbage": os.urandom(5000), "truncated": face[:300], "empty": b""}[kind])
        df.loc[row, "path"] = str(p)
    return write_manifest(df, d / "utk400.csv")


@pytest.fixture(scope="module")
def single(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "one.h5"
    rep = extract(manifest, TAPS, backbone="dlib-age", out=out, batch_size=32, progress=False)
    assert rep.rows_total == 397 and rep.skipped_added == 3
    return out


def _same_as(sharded: Path, single: Path) -> None:
    with FeatureStore.open_read(sharded) as a, FeatureStore.open_read(single) as b:
        assert isinstance(a, ShardedStore) and not isinstance(b, ShardedStore)
        assert a.nrows == b.nrows == 397
        pd.testing.assert_frame_equal(a.labels(), b.labels())
        pd.testing.assert_frame_equal(a.skipped(), b.skipped())
        assert sorted(a.skipped()["path"].map(lambda p: Path(p).stem)) == sorted(BAD_AT.values())
        assert a.keys() == b.keys()
        for k in TAPS:
            assert a.array(k).shape == b.array(k).shape and a.array(k).atom.dtype == np.float16
            np.testing.assert_array_equal(a.read(k), b.read(k))  # every value, bit for bit
            rows = np.random.default_rng(0).permutation(a.nrows)[:150]  # across both shards, any order
            np.testing.assert_array_equal(a.read(k, rows), b.read(k, rows))
            np.testing.assert_array_equal(a.array(k)[190:210], b.array(k)[190:210])  # a slice over the seam
            a.check_finite(k)
            assert a.tap_info()[k]["checked_rows"] == a.nrows and a.tap_info()[k]["nonfinite"] == 0
        a.check_labels_current()
        assert {x: v for x, v in a.attrs.items() if x not in ("taps", "config", "shards", "featlab_shards")} == \
            {x: v for x, v in b.attrs.items() if x not in ("taps", "config")}


def test_two_shards_read_back_as_the_single_process_run(manifest, single, tmp_path):
    out = tmp_path / "set.h5"
    rep = extract_sharded(manifest, TAPS, 2, backbone="dlib-age", out=out, batch_size=32)
    assert (rep.rows_total, rep.rows_added, rep.skipped_added) == (397, 397, 3)
    assert shard_path(out, 0, 2).is_file() and shard_path(out, 1, 2).is_file()
    with FeatureStore.open_read(shard_path(out, 0, 2)) as s0:  # the deterministic slice: rows 0-199 of the manifest
        assert s0.nrows + len(s0.skipped()) == shard_bounds(400, 2)[0][1] == 200
    _same_as(out, single)
    # the driver moved no tap bytes: a few KB of arguments and reports, while the workers wrote every tap row
    with FeatureStore.open_read(single) as b:
        row_bytes = sum(int(np.prod(b.array(k).shape[1:])) * 2 for k in TAPS)
    assert rep.plan["tap_bytes"] == 397 * row_bytes
    assert rep.plan["driver_bytes"] < 20_000 < rep.plan["tap_bytes"]
    # merging is optional, and gives the single file's rows (small blocks: several per shard)
    from featlab.features.shards import merge_shards

    assert merge_shards(out, tmp_path / "merged.h5", block_bytes=100_000) == 397
    with FeatureStore.open_read(tmp_path / "merged.h5") as m, FeatureStore.open_read(single) as b:
        assert not isinstance(m, ShardedStore)
        pd.testing.assert_frame_equal(m.labels(), b.labels())
        pd.testing.assert_frame_equal(m.skipped(), b.skipped())
        for k in TAPS:
            np.testing.assert_array_equal(m.read(k), b.read(k))
        assert {x: m.attrs[x] for x in ("model_sha256", "preprocessing", "manifest_sha256", "dataset")} == \
            {x: b.attrs[x] for x in ("model_sha256", "preprocessing", "manifest_sha256", "dataset")}
        assert m.tap_info()["res4"]["checked_rows"] == 397
    with pytest.raises(FeatlabError, match="exists"):
        merge_shards(out, single)


def test_sigkilled_worker_resumes_with_exactly_its_missing_rows(manifest, single, tmp_path, monkeypatch):
    out = tmp_path / "killed.h5"
    monkeypatch.setenv("FEATLAB_TEST_KILL_AFTER_ROWS", "64")
    monkeypatch.setenv("FEATLAB_TEST_KILL_SHARD", "1")
    with pytest.raises(FeatlabError, match=r"shard 1 of 2 .* was killed by SIGKILL.*rerun the same command"):
        extract_sharded(manifest, TAPS, 2, backbone="dlib-age", out=out, batch_size=32)
    assert not out.exists()  # no index of an unfinished set: it cannot be read as if whole
    with FeatureStore.open_read(shard_path(out, 0, 2)) as s0, FeatureStore.open_read(shard_path(out, 1, 2)) as s1:
        done0, done1 = s0.nrows, s1.nrows
    assert done0 == 199 and 64 <= done1 < 198  # shard 0 finished (one bad image), shard 1 stopped at a batch
    monkeypatch.delenv("FEATLAB_TEST_KILL_AFTER_ROWS")
    rep = extract_sharded(manifest, TAPS, 2, backbone="dlib-age", out=out, batch_size=32)
    assert rep.rows_before == done0 + done1 and rep.rows_added == 397 - done0 - done1
    _same_as(out, single)


def test_refusals_are_one_line(manifest, single, tmp_path):
    out = tmp_path / "set.h5"
    extract_sharded(manifest, ["res4"], 2, backbone="dlib-age", out=out, batch_size=64, limit=120)
    with pytest.raises(FeatlabError, match="set of 2 shards, not 3"):
        extract_sharded(manifest, ["res4"], 3, backbone="dlib-age", out=out, limit=120)
    with pytest.raises(FeatlabError, match="now falls in shard 0"):  # another --limit moves rows between shards
        extract_sharded(manifest, ["res4"], 2, backbone="dlib-age", out=out, limit=200)
    with pytest.raises(FeatlabError, match="single-file features store"):
        extract_sharded(manifest, ["res4"], 2, backbone="dlib-age", out=single)
    with pytest.raises(FeatlabError, match="index of a sharded set of 2 shards"):
        extract(manifest, ["res4"], backbone="dlib-age", out=out, progress=False)
    # a shard of another identity (here: another model's hash) is refused by the reader and by a rerun
    import tables

    with tables.open_file(str(shard_path(out, 1, 2)), mode="a") as h5:
        h5.root._v_attrs["model_sha256"] = "0" * 64
    with pytest.raises(FeatlabError, match=r"shard shard-001-of-002.h5 was extracted with a different model file") as e:
        FeatureStore.open_read(out)
    assert "\n" not in str(e.value)
    with pytest.raises(FeatlabError, match=r"shard 1 of 2 .* failed: .* a different model file") as e:
        extract_sharded(manifest, ["res4"], 2, backbone="dlib-age", out=out, limit=120)
    assert "\n" not in str(e.value)
    # a shard that went missing (or changed) after the set was indexed
    shutil.move(shard_path(out, 1, 2), tmp_path / "aside.h5")
    with pytest.raises(FeatlabError, match="shard-001-of-002.h5 is missing"):
        FeatureStore.open_read(out)


def test_heads_read_a_sharded_set_as_the_single_file(manifest, single, tmp_path, capsys):
    """What heads and `featlab info` read (featureio: statistics, shuffled batches) is the single file's."""
    from featlab.cli import main
    from featlab.features.featureio import ShuffledBatches, feature_stats

    out = tmp_path / "cli.h5"
    assert main(["extract", "-m", str(manifest), "-b", "dlib-age", "-l", "res5", "-o", str(out), "--limit", "150",
                 "--shards", "2", "--batch-size", "64", "--quiet"]) == 0
    assert "the driver handled" in capsys.readouterr().out
    # extracting into the set again goes on as 2 shards by itself: a new tap for the rows already there
    assert main(["extract", "-m", str(manifest), "-b", "dlib-age", "-l", "res4", "-o", str(out), "--limit", "150",
                 "--batch-size", "64", "--quiet"]) == 0
    assert "added tap res4 for 149 existing rows" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "149 faces" in text and "rows 149  nonfinite 0" in text and "skipped 1:" in text
    with FeatureStore.open_read(out) as a, FeatureStore.open_read(single) as b:
        assert sorted(a.keys()) == ["res4", "res5"]
        rows = np.arange(149)
        for x, y in zip(feature_stats(a, "res5", rows), feature_stats(b, "res5", rows)):
            np.testing.assert_array_equal(x, y)
        y = np.zeros(149, np.float32)
        sa = ShuffledBatches(a, "res4", rows, y, batch_size=32)
        sb = ShuffledBatches(b, "res4", rows, y, batch_size=32)
        for i in range(len(sa)):
            np.testing.assert_array_equal(sa.batch(i)[0], sb.batch(i)[0])


def test_ray_tasks_write_the_shards(manifest, single, tmp_path):
    """--ray --shards: each Ray task writes its own shard; the driver gets only reports."""
    pytest.importorskip("ray", reason="Ray is optional (featlab[ray]): pip install 'featlab[ray]'")
    pytest.importorskip("pyarrow", reason="Ray is optional (featlab[ray]): pip install 'featlab[ray]'")
    from featlab.features.cluster import RayPlan

    out = tmp_path / "ray.h5"
    rep = extract_sharded(manifest, TAPS, 2, backbone="dlib-age", out=out, batch_size=32, ray=RayPlan(workers=2))
    assert rep.rows_added == 397 and rep.plan["where"] == "Ray local"
    assert rep.plan["driver_bytes"] < 20_000 < rep.plan["tap_bytes"]
    _same_as(out, single)
