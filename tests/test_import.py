"""`featlab import`: taps extracted elsewhere become an ordinary features file.

Real faces: a small dlib-age extraction is exported the way other pipelines store taps (.npy, one
PyTables array per file, NHWC maps, shuffled rows with an ids array), imported back, and compared
value for value and head for head with the original. Bad inputs give one line and leave no file.
The seed example of docs/extract.md (three seed-named tap files, then train-head --cats 7) runs through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tables

import featlab
from featlab.cli import main
from featlab.errors import FeatlabError
from featlab.data.manifest import file_sha256, read_manifest, write_manifest
from featlab.features.store import FeatureStore

TAPS = ["res4", "logits"]  # a (256, 3, 3) map and an (81,) vector
FAST = dict(epochs=3, patience=2, batch_size=64, verbose=0)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def original(utk_small, tmp_path_factory):
    """A real featlab extraction (dlib-age, 240 UTKFace faces, float16)."""
    from featlab.features.extract import extract

    out = tmp_path_factory.mktemp("orig") / "utksmall.h5"
    extract(utk_small, TAPS, backbone="dlib-age", out=out, batch_size=32, progress=False)
    return out


@pytest.fixture(scope="module")
def exported(original, tmp_path_factory):
    """The original's taps exported: .npy per tap, and a PyTables file per tap named like the tap, no
    extension (the seed pipeline's style: create_array('/', 'data', x) for one, an EArray for the other)."""
    d = tmp_path_factory.mktemp("exported")
    values = {}
    with FeatureStore.open_read(original) as s:
        for k in TAPS:
            values[k] = s.read(k)
    for k, x in values.items():
        np.save(d / f"{k}.npy", x)
        (d / "tables").mkdir(exist_ok=True)
        with tables.open_file(str(d / "tables" / k), "w") as h5:
            if k == "res4":
                h5.create_array("/", "data", x)
            else:
                arr = h5.create_earray("/", "data", tables.Float32Atom(), (0, *x.shape[1:]))
                for lo in range(0, len(x), 100):
                    arr.append(x[lo : lo + 100])
    return d, values


def _import(*args) -> None:
    assert main(["import", *map(str, args)]) == 0


def _sample_manifest(tmp_path: Path, n: int = 200) -> Path:
    """The first ``n`` faces of the UTKFace sample shipped inside featlab, as a manifest."""
    from featlab.data.datasets import prepare_dataset

    df, _ = prepare_dataset("utkface", Path(featlab.__file__).parent / "data" / "utkface-sample")
    return write_manifest(df.iloc[:n], tmp_path / "utkface.csv")


# ------------------------------------------------------------------------------------ round trips on real faces
def test_npy_import_equals_the_original_row_for_row(original, exported, utk_small, tmp_path):
    d, values = exported
    out = tmp_path / "imported.h5"
    _import(d / "res4.npy", d / "logits.npy", "--labels", utk_small, "--backbone", "dlib-age", "--out", out,
            "--rows-in-manifest-order")
    with FeatureStore.open_read(original) as o, FeatureStore.open_read(out) as s:
        a, b = o.attrs, s.attrs
        assert sorted(s.keys()) == sorted(TAPS)
        for k in TAPS:
            x = s.read(k)
            assert s.array(k).atom.dtype == np.float32 and x.shape == o.array(k).shape
            np.testing.assert_array_equal(x, o.read(k))
        assert s.labels().equals(o.labels())
        assert b["imported"] is True and b["backbone"] == "dlib-age"
        assert b["dataset"] == a["dataset"] == "utksmall" and b["manifest_sha256"] == a["manifest_sha256"]
        src = {e["tap"]: e for e in b["imported_from"]}
        assert src["res4"]["sha256"] == file_sha256(d / "res4.npy") and src["res4"]["shape"] == [240, 256, 3, 3]
        assert src["logits"]["shape"] == [240, 81] and src["logits"]["dtype"] == "float32"
        assert b["model_sha256"].startswith("imported:") and b["model_sha256"] != a["model_sha256"]
        assert b["taps"]["res4"]["shape"] == [256, 3, 3] and b["taps"]["res4"]["dtype"] == "float32"
        assert len(s.skipped()) == 0 and b["featlab_version"] == featlab.__version__


def test_pytables_import_trains_the_same_head_and_is_never_mixed(original, exported, utk_small, tmp_path, capsys):
    """Seed-style PyTables files, stored float16 like the original: same bits, so a head with the same
    seed reaches the same metrics; evaluating it on the featlab extraction is refused."""
    from featlab.report.evaluate import evaluate_head
    from featlab.study.workflow import train_head

    d, _ = exported
    out = tmp_path / "imported16.h5"
    _import(d / "tables" / "res4", d / "tables" / "logits", "--labels", utk_small, "--backbone", "dlib-age",
            "--dtype", "float16", "--out", out, "--rows-in-manifest-order")
    with FeatureStore.open_read(original) as o, FeatureStore.open_read(out) as s:
        for k in TAPS:
            assert s.array(k).atom.dtype == np.float16
            np.testing.assert_array_equal(s.array(k).read().view(np.uint16), o.array(k).read().view(np.uint16))
        assert [e["key"] for e in s.attrs["imported_from"]] == ["/data", "/data"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "imported (not extracted by featlab) from 2 file(s)" in text and "res4 <- " in text and "model sha256 imported:" in text

    h_orig = train_head(original, "res4", "bins", 7, out_root=tmp_path / "r-orig", seed=3, **FAST)
    h_imp = train_head(out, "res4", "bins", 7, out_root=tmp_path / "r-imp", seed=3, **FAST)
    assert h_imp.parts[-4:] == ("dlib-age", "utksmall-imported", "res4", "bins7")  # never beside extracted heads
    m_orig = json.loads((h_orig / "metrics.json").read_text())["test"]["metrics"]
    m_imp = json.loads((h_imp / "metrics.json").read_text())["test"]["metrics"]
    assert m_imp == m_orig
    cfg = json.loads((h_imp / "config.json").read_text())
    assert cfg["features_model_sha256"].startswith("imported:")
    with pytest.raises(FeatlabError, match="another model file"):
        evaluate_head(h_imp, features=original)


def test_nhwc_layout_equals_the_chw_original(original, exported, utk_small, tmp_path):
    """NHWC maps in a compressed .npz, rows reversed, their image ids stored beside them (``image_id``): the
    import finds the ids itself and writes the rows back in the labels' order, equal to the original."""
    d, values = exported
    nhwc = tmp_path / "res4_nhwc.npz"
    ids = read_manifest(utk_small)["image_id"].to_numpy().astype(str)
    np.savez_compressed(nhwc, res4=values["res4"].transpose(0, 2, 3, 1)[::-1], other=np.zeros(3), image_id=ids[::-1])
    out = tmp_path / "nhwc.h5"
    _import(f"{nhwc}:res4", "--name", "res4", "--layout", "nhwc", "--labels", utk_small, "--backbone", "x",
            "--out", out)
    with FeatureStore.open_read(original) as o, FeatureStore.open_read(out) as s:
        assert s.array("res4").shape == (240, 256, 3, 3)
        np.testing.assert_array_equal(s.read("res4"), o.read("res4"))
        assert s.attrs["imported_from"][0]["shape"] == [240, 3, 3, 256]
        assert s.labels().equals(o.labels()) and s.attrs["config"]["ids_from"] == f"{nhwc}:image_id"
    assert not list(tmp_path.glob(".import-*"))  # the temporary copy made to read the .npz in any order is gone


def test_ids_match_shuffled_rows_to_the_manifest(original, exported, utk_small, tmp_path):
    """Rows in another order, a subset of the manifest: --ids (an array of image ids, or a CSV column of
    file names) puts each row's own labels beside it, the rows written in the manifest's order."""
    d, values = exported
    df = read_manifest(utk_small)
    rng = np.random.default_rng(1)
    pick = rng.permutation(len(df))[:150]
    np.save(tmp_path / "res4.npy", values["res4"][pick])
    np.save(tmp_path / "ids.npy", df["image_id"].to_numpy()[pick].astype("S16"))
    with open(tmp_path / "order.csv", "w") as f:
        f.write("n,file\n" + "".join(f"{i},{Path(p).name}\n" for i, p in enumerate(df["path"].to_numpy()[pick])))
    kept = np.sort(pick)  # the manifest's order
    with FeatureStore.open_read(original) as o:
        want = o.read("res4", kept)
    for ids in (tmp_path / "ids.npy", f"{tmp_path / 'order.csv'}:file"):
        out = tmp_path / f"ids-{Path(str(ids)).suffix[1:4]}.h5"
        _import(tmp_path / "res4.npy", "--ids", ids, "--labels", utk_small, "--backbone", "x", "--out", out)
        with FeatureStore.open_read(out) as s:
            lab = s.labels()
            assert list(lab["image_id"]) == list(df["image_id"].to_numpy()[kept])
            np.testing.assert_allclose(lab["age"].to_numpy(), df["age"].to_numpy()[kept])
            np.testing.assert_array_equal(s.read("res4"), want)


def test_reversed_rows_without_ids_are_refused_and_with_ids_train_the_original_head(original, exported, utk_small,
                                                                                    tmp_path, capsys):
    """The seed-study trap: tap rows in reversed order. Without ids the import refuses (one line, no file);
    --rows-in-manifest-order is the user's own word. With --ids the rows are put back in the labels' order:
    the file equals the original bit for bit and a head with the same seed reaches the same figures."""
    from featlab.study.workflow import train_head

    d, values = exported
    df = read_manifest(utk_small)
    np.save(tmp_path / "logits.npy", values["logits"][::-1])
    np.save(tmp_path / "ids.npy", df["image_id"].to_numpy()[::-1].astype("S16"))
    out = tmp_path / "rev.h5"
    capsys.readouterr()
    rc = main(["import", str(tmp_path / "logits.npy"), "--labels", str(utk_small), "--backbone", "dlib-age",
               "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no ids for the 240 tap rows" in err[0] and "--rows-in-manifest-order" in err[0]
    assert not out.exists()
    _import(tmp_path / "logits.npy", "--ids", tmp_path / "ids.npy", "--labels", utk_small, "--backbone", "dlib-age",
            "--dtype", "float16", "--out", out)
    with FeatureStore.open_read(original) as o, FeatureStore.open_read(out) as s:
        assert s.labels().equals(o.labels())
        np.testing.assert_array_equal(s.array("logits").read().view(np.uint16), o.array("logits").read().view(np.uint16))
        assert "matched to the labels by the ids" in s.attrs["config"]["row_order"]
    h_orig = train_head(original, "logits", "gender", out_root=tmp_path / "r-orig", seed=5, **FAST)
    h_imp = train_head(out, "logits", "gender", out_root=tmp_path / "r-imp", seed=5, **FAST)
    a, b = (json.loads((h / "metrics.json").read_text())["test"]["metrics"] for h in (h_orig, h_imp))
    assert a["accuracy"] == b["accuracy"] and a["accuracy_ci95"] == b["accuracy_ci95"]


def test_ids_and_rows_in_manifest_order_do_not_go_together(tmp_path, capsys):
    labels = _sample_manifest(tmp_path, 10)
    np.save(tmp_path / "t.npy", np.ones((10, 3), np.float32))
    ids = read_manifest(labels)["image_id"].to_numpy().astype("S16")
    np.save(tmp_path / "ids.npy", ids)
    rc = main(["import", str(tmp_path / "t.npy"), "--labels", str(labels), "--backbone", "b", "--out",
               str(tmp_path / "o.h5"), "--ids", str(tmp_path / "ids.npy"), "--rows-in-manifest-order"])
    assert rc == 2 and "leave out --rows-in-manifest-order" in capsys.readouterr().err


def test_two_ids_landing_on_one_face_are_refused(tmp_path, capsys):
    """Ids matched by file name: ``/a/NAME`` and ``/b/NAME`` would both be the one labels row named NAME; one
    line names them and the row, nothing is written. The same ids made distinct import each face's own row."""
    labels = _sample_manifest(tmp_path, 10)
    df = read_manifest(labels)
    names = [Path(p).name for p in df["path"]]
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    np.save(tmp_path / "t.npy", x)
    ids = [f"/elsewhere/{n}" for n in names[::-1]]  # reversed: matched by file name, written in the labels' order
    ids[4] = f"/other/{names[0]}"  # row 5 of the taps: another copy of the labels' first face
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    out = tmp_path / "o.h5"
    args = ["import", str(tmp_path / "t.npy"), "--labels", str(labels), "--backbone", "b", "--out", str(out)]
    capsys.readouterr()
    assert main([*args, "--ids", str(tmp_path / "ids.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 ids land on 1 row(s)" in err[0] and "matched by file name" in err[0], err
    assert f"'/other/{names[0]}' and '/elsewhere/{names[0]}' -> image_id {df['image_id'][0]}" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".o.h5*"))

    ids[4] = f"/other/{names[5]}"  # each face once again
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    _import(*args[1:], "--ids", tmp_path / "ids.txt")
    with FeatureStore.open_read(out) as s:
        np.testing.assert_array_equal(s.read("t"), x[::-1])
        assert s.labels()["image_id"].tolist() == df["image_id"].tolist()


# ------------------------------------------------------------------------------------ bad input
def _bad_case(case: str, d: Path, labels: Path) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4, 3, 3)).astype(np.float32)
    np.save(d / "good.npy", x)
    if case == "rows-vs-labels":
        np.save(d / "t.npy", x[:199])
        return [d / "t.npy"]
    if case == "non-finite":  # far past the first block: blocks already written must not survive
        x[170, 2, 1, 0] = np.nan
        np.save(d / "t.npy", x)
        return [d / "t.npy"]
    if case == "infinite-hdf5":
        x[3, 0, 0, 0] = -np.inf
        with tables.open_file(str(d / "t.h5"), "w") as h5:
            h5.create_array("/", "data", x)
        return [d / "t.h5"]
    if case == "not-numbers":
        np.save(d / "t.npy", np.array([f"face{i}" for i in range(200)]))
        return [d / "t.npy"]
    if case == "taps-disagree":
        np.save(d / "t.npy", x[:150])
        return [d / "good.npy", d / "t.npy"]
    if case == "float16-range":
        x[120, 0, 0, 0] = 70000.0
        np.save(d / "t.npy", x)
        return [d / "t.npy", "--dtype", "float16"]
    if case == "npz-needs-a-key":
        np.savez(d / "t.npz", a=x, b=x)
        return [d / "t.npz"]
    if case == "unknown-ids":
        np.save(d / "ids.npy", np.array([f"nope{i}" for i in range(200)]))
        return [d / "good.npy", "--ids", d / "ids.npy"]
    if case == "missing-file":
        return [d / "absent.npy"]
    raise AssertionError(case)


BAD = {"rows-vs-labels": "199 rows but", "non-finite": "non-finite value nan at row 170",
       "infinite-hdf5": "non-finite value -inf at row 3", "not-numbers": "not numbers",
       "taps-disagree": "disagree on the number of rows", "float16-range": "beyond float16's range (65,504)",
       "npz-needs-a-key": "holds 2 arrays", "unknown-ids": "match no row", "missing-file": "file not found"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_leaves_no_file(case, tmp_path, capsys, monkeypatch):
    import featlab.features.tapimport

    monkeypatch.setattr(featlab.features.tapimport, "BLOCK_BYTES", 32 * 4 * 36)  # 32-row blocks
    labels = _sample_manifest(tmp_path)
    d = tmp_path / "in"
    d.mkdir()
    args = _bad_case(case, d, labels)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.h5"
    capsys.readouterr()
    order = [] if "--ids" in map(str, args) else ["--rows-in-manifest-order"]
    rc = main(["import", *map(str, args), "--labels", str(labels), "--backbone", "seed", "--out", str(out), *order])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and BAD[case] in err[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_existing_output_is_kept(tmp_path, capsys):
    labels = _sample_manifest(tmp_path, 10)
    np.save(tmp_path / "t.npy", np.ones((10, 3), np.float32))
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    assert main(["import", str(tmp_path / "t.npy"), "--labels", str(labels), "--backbone", "b", "--out", str(out),
                 "--rows-in-manifest-order"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    _import(tmp_path / "t.npy", "--labels", labels, "--backbone", "b", "--out", out, "--force", "--rows-in-manifest-order")
    with FeatureStore.open_read(out) as s:
        assert s.read("t").shape == (10, 3) and s.nrows == 10


# ------------------------------------------------------------------------------- the docs' seed example
def test_readme_seed_example_through_the_cli(tmp_path, monkeypatch, capsys):
    """Three seed-named tap files (TensorFlow NHWC maps in PyTables, one array each), imported with the
    sample's manifest, then `featlab train-head --cats 7 --layer stage4_unit1_conv1`. The age bin is
    planted in stage4_unit1_conv1, so the head must find it."""
    from featlab.data.bins import get_scheme

    monkeypatch.chdir(tmp_path)
    labels = _sample_manifest(tmp_path)
    df = read_manifest(labels)
    n = len(df)
    rng = np.random.default_rng(0)
    shapes = {"add_98": (7, 7, 32), "stage3_unit15_conv1": (14, 14, 16), "stage4_unit1_conv1": (14, 14, 32)}
    (tmp_path / "seed").mkdir()
    for name, shape in shapes.items():
        x = rng.normal(size=(n, *shape)).astype(np.float32)
        if name == "stage4_unit1_conv1":
            k = get_scheme(7).assign(df["age"].to_numpy())
            x[np.arange(n), :, :, k] += 1.5
        with tables.open_file(str(tmp_path / "seed" / name), "w") as h5:
            h5.create_array("/", "data", x)
    args = ["import", "seed/add_98", "seed/stage3_unit15_conv1", "seed/stage4_unit1_conv1",
            "--labels", "utkface.csv", "--backbone", "r100", "--layout", "nhwc", "--out", "features/r100-seed/utkface.h5",
            "--rows-in-manifest-order"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "200 faces" in text and "32x14x14" in text and "32x7x7" in text and "16x14x14" in text
    rc = main(["train-head", "--cats", "7", "--layer", "stage4_unit1_conv1", "--features", "features/r100-seed/utkface.h5",
               "--epochs", "8", "--quiet"])
    assert rc == 0
    d = tmp_path / "results" / "r100" / "utkface-imported" / "stage4_unit1_conv1.f32" / "bins7"
    m = json.loads((d / "metrics.json").read_text())
    with FeatureStore.open_read(tmp_path / "features/r100-seed/utkface.h5") as s:
        lab = s.labels()
    test = lab[lab.split == "test"]
    majority = np.bincount(get_scheme(7).assign(test.age.to_numpy())).max() / len(test)
    t = m["test"]
    # at least halfway from the test faces' majority share to every face right (the planted bin is easy to read;
    # a head that learned nothing scores about the majority share)
    assert t["n"] == len(test) and t["metrics"]["accuracy"] >= majority + 0.5 * (1 - majority), (t["metrics"], majority)


# ------------------------------------------------------------------------------------ large inputs, identity
@pytest.mark.parametrize("kind", ["npy", "npz", "hdf5"])
def test_large_inputs_are_copied_in_blocks(kind, tmp_path, monkeypatch):
    """A 34 MB source imported with 1 MiB blocks: Python-side allocations stay far below the source size
    (loading it whole would take 34 MB at once)."""
    import tracemalloc

    import featlab.features.tapimport

    monkeypatch.setattr(featlab.features.tapimport, "BLOCK_BYTES", 1 << 20)
    labels = _sample_manifest(tmp_path, 600)
    x = np.random.default_rng(0).normal(size=(600, 7, 2000)).astype(np.float32)  # 33.6 MB
    src = tmp_path / f"big.{kind}"
    if kind == "npy":
        np.save(src, x)
    elif kind == "npz":
        np.savez(src, big=x)
    else:
        with tables.open_file(str(src), "w") as h5:
            h5.create_earray("/", "data", obj=x, chunkshape=(8, 7, 2000))
    del x
    out = tmp_path / "big.h5"
    tracemalloc.start()
    try:
        _import(src, "--labels", labels, "--backbone", "b", "--out", out, "--rows-in-manifest-order")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"peak {peak / 2**20:.1f} MiB"
    with FeatureStore.open_read(out) as s:
        y = s.read("big")
    np.testing.assert_array_equal(y, np.random.default_rng(0).normal(size=(600, 7, 2000)).astype(np.float32))


def test_model_sha256_never_looks_like_a_model_file_and_source_id_joins_imports(tmp_path):
    from featlab.features.tapimport import import_taps

    labels = _sample_manifest(tmp_path, 10)
    rng = np.random.default_rng(0)
    for i in (1, 2):
        np.save(tmp_path / f"t{i}.npy", rng.normal(size=(10, 5)).astype(np.float32))
    r1 = import_taps([tmp_path / "t1.npy"], labels, "b", tmp_path / "1.h5", names=["t"], rows_in_manifest_order=True)
    r2 = import_taps([tmp_path / "t2.npy"], labels, "b", tmp_path / "2.h5", names=["t"], rows_in_manifest_order=True)
    r3 = import_taps([tmp_path / "t1.npy"], labels, "b", tmp_path / "3.h5", names=["t"], source_id="seed r100 run 1",
                     rows_in_manifest_order=True)
    r4 = import_taps([tmp_path / "t2.npy"], labels, "b", tmp_path / "4.h5", names=["t"], source_id="seed r100 run 1",
                     rows_in_manifest_order=True)
    assert r1.model_sha256 != r2.model_sha256 and r3.model_sha256 == r4.model_sha256 != r1.model_sha256
    for r in (r1, r3):
        assert r.model_sha256.startswith("imported:") and len(r.model_sha256) == 9 + 64
    with FeatureStore.open_read(tmp_path / "4.h5") as s:
        assert s.attrs["model_sha256"] == r4.model_sha256 and s.attrs["config"]["source_id"] == "seed r100 run 1"


def test_an_array_inside_an_hdf5_group_is_named_by_its_file(tmp_path, capsys):
    labels = _sample_manifest(tmp_path, 30)
    x = np.arange(30 * 6, dtype=np.float64).reshape(30, 6) / 7
    with tables.open_file(str(tmp_path / "run7.h5"), "w") as h5:
        g = h5.create_group("/", "feats")
        h5.create_carray(g, "pooled", obj=x, chunkshape=(4, 6))
        h5.create_array(g, "ids", np.arange(30))
    out = tmp_path / "o.h5"
    assert main(["import", str(tmp_path / "run7.h5"), "--labels", str(labels), "--backbone", "b", "--out", str(out)]) == 2
    assert "holds 2 arrays (/feats/ids, /feats/pooled)" in capsys.readouterr().err
    _import(f"{tmp_path / 'run7.h5'}:/feats/pooled", "--labels", labels, "--backbone", "b", "--out", out,
            "--rows-in-manifest-order")
    with FeatureStore.open_read(out) as s:
        assert s.keys() == ["run7"] and s.attrs["imported_from"][0]["key"] == "/feats/pooled"
        np.testing.assert_array_equal(s.read("run7"), x.astype(np.float32))


def test_import_keeps_the_source_dtype_unless_told(tmp_path, capsys):
    """float16 taps stay float16 (half the bytes of float32, bit for bit); float64 becomes float32; --dtype
    float32 widens a float16 source exactly."""
    labels = _sample_manifest(tmp_path, 30)
    rng = np.random.default_rng(3)
    h = (rng.standard_normal((30, 8, 2, 2)) * 100).astype(np.float16)
    d = rng.standard_normal((30, 5))
    np.save(tmp_path / "half.npy", h)
    np.save(tmp_path / "double.npy", d)
    _import(tmp_path / "half.npy", tmp_path / "double.npy", "--labels", labels, "--backbone", "b", "--out",
            tmp_path / "src.h5", "--rows-in-manifest-order")
    assert "float16" in capsys.readouterr().out
    with FeatureStore.open_read(tmp_path / "src.h5") as s:
        assert s.array("half").atom.dtype == np.float16 and s.tap_info()["half"]["dtype"] == "float16"
        np.testing.assert_array_equal(s.array("half").read().view(np.uint16), h.view(np.uint16))
        assert s.array("double").atom.dtype == np.float32
        np.testing.assert_array_equal(s.read("double"), d.astype(np.float32))
    _import(tmp_path / "half.npy", "--labels", labels, "--backbone", "b", "--out", tmp_path / "f32.h5",
            "--rows-in-manifest-order", "--dtype", "float32")
    with FeatureStore.open_read(tmp_path / "f32.h5") as s:
        assert s.array("half").atom.dtype == np.float32
        np.testing.assert_array_equal(s.array("half").read(), h.astype(np.float32))
