"""Networks side by side: cross-file fusion by image id, the cross-network comparison, specs with several networks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from featlab.errors import FeatlabError
from featlab.features.store import FeatureStore, label_row

N = 360


def _planted(seed: int = 0):
    """Two 'networks' on the same N faces: netA's tap a1 carries gender strongly, netB's tap b1 weakly,
    b2 not at all; ages carried by both."""
    rng = np.random.default_rng(seed)
    gender = np.array(["f", "m"])[rng.integers(0, 2, N)]
    age = rng.uniform(5, 80, N).round()
    g = (gender == "m").astype(np.float32)[:, None]
    a = ((age - 40) / 20).astype(np.float32)[:, None]
    a1 = np.concatenate([3 * g + rng.normal(size=(N, 1)), a + 0.3 * rng.normal(size=(N, 1)),
                         rng.normal(size=(N, 6))], axis=1).astype(np.float32)
    b1 = np.concatenate([0.7 * g + rng.normal(size=(N, 1)), a + rng.normal(size=(N, 1)),
                         rng.normal(size=(N, 6))], axis=1).astype(np.float32)
    b2 = rng.normal(size=(N, 8)).astype(np.float32)
    splits = np.array(["train"] * 240 + ["val"] * 60 + ["test"] * 60)
    ids = [f"img{i:05d}" for i in range(N)]
    return ids, gender, age, splits, {"a1": a1}, {"b1": b1, "b2": b2}


def _write(path: Path, data, taps: dict, backbone: str, order=None, manifest_sha: str = "m" * 64, drop=()) -> Path:
    ids, gender, age, splits, _, _ = data
    order = np.arange(N) if order is None else np.asarray(order)
    order = np.array([i for i in order if i not in set(drop)])
    ident = {"backbone": backbone, "model_sha256": backbone[0] * 64, "preprocessing": "default", "flip": False,
             "align": False, "manifest_sha256": manifest_sha}
    with FeatureStore.open_for_append(path, ident) as st:
        st.set_attr("dataset", "synth")
        for k, x in taps.items():
            st.ensure_array(k, x.shape[1:], dtype="float32", expected_rows=N)
        labels = [label_row({"image_id": ids[i], "path": f"/x/{i}.jpg", "age": float(age[i]), "gender": gender[i],
                             "race": "", "split": splits[i], "fold": -1, "group": f"p{i // 2}"}) for i in order]
        st.append({k: x[order] for k, x in taps.items()}, labels)
    return path


@pytest.fixture(scope="module")
def data():
    return _planted()


@pytest.fixture(scope="module")
def files(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("xnet")
    rng = np.random.default_rng(5)
    return {"a": _write(d / "a.h5", data, data[4], "netA"),
            "b": _write(d / "b.h5", data, data[5], "netB"),
            "b_shuffled": _write(d / "b_shuffled.h5", data, data[5], "netB", order=rng.permutation(N)),
            "b_dropped": _write(d / "b_dropped.h5", data, data[5], "netB", drop=(3, 100, 250, 301)),
            "b_other": _write(d / "b_other.h5", data, data[5], "netB", manifest_sha="z" * 64),
            "b_split": None}


def test_join_lines_up_by_image_id(files, data, tmp_path):
    """The joined file holds each face's own rows of both files, whatever the second file's row order."""
    from featlab.features.join import join_features

    path, key = join_features([files["a"], files["b_shuffled"]], "netA:a1+netB:b1", root=tmp_path)
    assert key == "netA:a1+netB:b1"
    with FeatureStore.open_read(path) as s:
        ids = s.labels()["image_id"].tolist()
        idx = [int(i[3:]) for i in ids]
        np.testing.assert_array_equal(s.read("netA:a1"), data[4]["a1"][idx])
        np.testing.assert_array_equal(s.read("netB:b1"), data[5]["b1"][idx])
        assert s.attrs["backbone"] == "netA+netB"
        assert s.attrs["join"]["rows"] == N and s.attrs["join"]["dropped"] == {"netA": 0, "netB": 0}
    assert ids == [f"img{i:05d}" for i in range(N)]  # the first file's order


def test_join_drops_missing_faces_from_both(files, tmp_path):
    from featlab.features.join import join_features

    path, _ = join_features([files["a"], files["b_dropped"]], "netA:a1+netB:b1", root=tmp_path)
    with FeatureStore.open_read(path) as s:
        ids = set(s.labels()["image_id"])
        assert s.nrows == N - 4 and "img00100" not in ids and "img00101" in ids
        assert s.attrs["join"]["dropped"] == {"netA": 4, "netB": 0}


def test_refusals_are_one_line(files, tmp_path):
    from featlab.features.join import join_features

    with pytest.raises(FeatlabError, match="one manifest"):
        join_features([files["a"], files["b_other"]], "netA:a1+netB:b1", root=tmp_path)
    with pytest.raises(FeatlabError, match="no features file of network 'netC'"):
        join_features([files["a"], files["b"]], "netA:a1+netC:b1", root=tmp_path)
    with pytest.raises(FeatlabError, match="NETWORK:TAP"):
        join_features([files["a"], files["b"]], "a1+netB:b1", root=tmp_path)
    with pytest.raises(FeatlabError, match="has no tap 'zz'"):
        join_features([files["a"], files["b"]], "netA:zz+netB:b1", root=tmp_path)


def test_different_splits_refused(data, tmp_path):
    from featlab.features.join import join_features

    ids, gender, age, splits, ta, tb = data
    moved = (ids, gender, age, np.where(np.arange(N) == 7, "test", splits), ta, tb)
    a = _write(tmp_path / "a.h5", data, ta, "netA")
    b = _write(tmp_path / "b.h5", moved, tb, "netB")
    with pytest.raises(FeatlabError, match="different splits"):
        join_features([a, b], "netA:a1+netB:b1", root=tmp_path / "j")


def _cli(args, cwd: Path) -> int:
    from featlab.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main(args)
    finally:
        os.chdir(old)


def test_train_head_cross_fusion_shuffle_gives_same_figures(files, tmp_path):
    """`train-head --features A --features B --layer netA:a1+netB:b1`: results under netA+netB/, each part's
    feature set in config.json, and a second file with its rows shuffled gives the same figures."""
    figs = []
    for name, b in (("one", files["b"]), ("two", files["b_shuffled"])):
        cwd = tmp_path / name
        cwd.mkdir()
        rc = _cli(["train-head", "-f", str(files["a"]), "-f", str(b), "-l", "netA:a1+netB:b1", "--target", "gender",
                   "--epochs", "3", "-q"], cwd)
        assert rc == 0
        d = cwd / "results" / "netA+netB" / "synth" / "netA:a1.f32+netB:b1.f32" / "gender"
        cfg = json.loads((d / "config.json").read_text())
        assert [p["feature_set"]["backbone"] for p in cfg["join"]["parts"]] == ["netA", "netB"]
        assert [p["tap"] for p in cfg["join"]["parts"]] == ["a1", "b1"]
        m = json.loads((d / "metrics.json").read_text())
        figs.append((m["val"]["metrics"]["accuracy"], m["test"]["metrics"]["accuracy"], cfg["counts"]))
    assert figs[0] == figs[1]


def test_train_head_cli_refusals(files, tmp_path, capsys):
    assert _cli(["train-head", "-f", str(files["a"]), "-f", str(files["b_other"]), "-l", "netA:a1+netB:b1",
                 "--target", "gender"], tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one manifest" in err[0]
    assert _cli(["train-head", "-f", str(files["a"]), "-f", str(files["b"]), "-l", "a1", "--target", "gender"],
                tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NET:TAP" in err[0]


@pytest.fixture(scope="module")
def trained(files, data, tmp_path_factory):
    """Gender heads of netA (a1, depth 0.75 recorded in its file), netB (b1, b2; no depth recorded), the cross
    fusion netA:a1+netB:b1, and netC (another manifest)."""
    cwd = tmp_path_factory.mktemp("xnet-runs")
    a = cwd / "a.h5"
    a.write_bytes(Path(files["a"]).read_bytes())
    with FeatureStore.open_for_append(a, {}) as s:
        info = s.tap_info()
        info["a1"]["depth"] = 0.75
        s.set_attr("taps", info)
    c = _write(cwd / "c.h5", data, data[5], "netC", manifest_sha="z" * 64)
    for args in (["-f", str(a), "-l", "a1"], ["-f", str(files["b"]), "-l", "b1", "-l", "b2"],
                 ["-f", str(a), "-f", str(files["b"]), "-l", "netA:a1+netB:b1"], ["-f", str(c), "-l", "b1"]):
        assert _cli(["train-head", *args, "--target", "gender", "--epochs", "4", "-q"], cwd) == 0
    return cwd


def test_compare_networks(trained):
    """Each network's input chosen on validation, depths from the file or by rank, the cross fusion listed, and
    the paired test between the choices equal to the difference of their per-face values."""
    import pandas as pd

    from featlab.report.crossnet import compare_networks

    res = compare_networks(["netA", "netB"], target="gender", cats=None, results_root=trained / "results")
    assert {n: c["tap"] for n, c in res["choices"].items()} == {"netA": "a1.f32", "netB": "b1.f32"}
    depth = {(r["network"], r["tap"]): (r["depth"], r["depth_source"]) for r in res["rows"]}
    assert depth[("netA", "a1.f32")] == (0.75, "features file")
    assert depth[("netB", "b1.f32")] == (0.0, "rank") and depth[("netB", "b2.f32")] == (1.0, "rank")
    assert res["best_fusion"]["tap"] == "netA:a1.f32+netB:b1.f32"
    t = next(t for t in res["tests"] if t["first"] == "netA:a1.f32" and t["second"] == "netB:b1.f32")
    fa = pd.read_csv(trained / "results/netA/synth/a1.f32/gender/faces.csv", dtype={"image_id": str})
    fb = pd.read_csv(trained / "results/netB/synth/b1.f32/gender/faces.csv", dtype={"image_id": str})
    fa, fb = fa[fa["split"] == "test"], fb[fb["split"] == "test"]
    j = fa.merge(fb, on="image_id", suffixes=("_a", "_b"))
    assert t["n_paired"] == len(j) == 60
    assert t["accuracy_diff"] == pytest.approx(j["accuracy_b"].mean() - j["accuracy_a"].mean())
    assert t["unit"] == "person" and t["n_units"] == 30
    assert t["accuracy_verdict"] in ("better", "worse", "equivalent", "inconclusive")
    assert len(res["tests"]) == 3  # netA, netB and the best fusion, pairwise
    out = trained / "results/compare/netA+netB/synth/gender"
    saved = json.loads((out / "network_comparison.json").read_text())
    assert saved["choices"]["netB"]["tap"] == "b1.f32" and saved["unit"] == "person"
    assert len(pd.read_csv(out / "network_comparison.csv")) == 4  # a1, b1, b2, the cross fusion


def test_compare_networks_refuses_other_manifest(trained, capsys):
    assert _cli(["compare", "--backbone", "netA", "--backbone", "netC", "--target", "gender"], trained) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one manifest" in err[0]
    assert _cli(["compare", "--backbone", "netA", "--backbone", "netB", "--target", "gender"], trained) == 0


TWO_NETS = """
name = "two-nets"
cross_fusion = "best"
similarity = true
fusion = ["dlib-age:pool+dlib-gender:layer_3_relu"]
[dataset]
adapter = "utkface"
manifest = "{manifest}"
[[networks]]
name = "dlib-age"
taps = ["pool"]
[[networks]]
name = "dlib-gender"
taps = ["layer_10_relu@avg", "layer_3_relu"]
[extract]
batch_size = 64
[[heads]]
target = "gender"
epochs = 3
"""


def test_spec_with_two_networks(utk_small, tmp_path, monkeypatch):
    """A spec with [[networks]] on real faces: per-network heads and comparisons, the spec's cross fusion and the
    best cross fusion of the networks' choices per target, the side-by-side comparison, the CKA map, one report;
    a rerun trains nothing."""
    import pandas as pd

    from featlab.study.runner import run_study

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "two.toml"
    spec.write_text(TWO_NETS.format(manifest=utk_small))
    log: list[str] = []
    report = run_study(spec, echo=log.append)
    assert report == Path("results/compare/dlib-age+dlib-gender/utksmall/report.md")
    text = report.read_text()
    for tname in ("gender",):
        res = json.loads((report.parent / tname / "network_comparison.json").read_text())
        choice = {n: c["tap"] for n, c in res["choices"].items()}
        for net in ("dlib-age", "dlib-gender"):  # each network's own choice, as its own compare made it
            own = pd.read_csv(f"results/{net}/utksmall/compare/{tname}/layer_comparison.csv")
            assert choice[net] == own[own.chosen.astype(bool)]["tap"].item()
        # the best cross fusion: chosen on validation among the fusions trained for this target
        assert res["best_fusion"]["network"] == "dlib-age+dlib-gender"
        rows = pd.read_csv(report.parent / tname / "network_comparison.csv")
        fus = rows[rows.network == "dlib-age+dlib-gender"]
        sel = "val_mae" if tname == "age" else "val_accuracy"
        best = fus[sel].min() if tname == "age" else fus[sel].max()
        assert fus[fus.tap == res["best_fusion"]["tap"]][sel].item() == best
        assert "dlib-age:pool+dlib-gender:layer_3_relu" in set(fus.tap)  # the spec's own fusion, listed beside
        assert f"## {tname}" in text
    cka = pd.read_csv(report.parent / "similarity" / "dlib-age+dlib-gender" / "cka.csv", index_col=0)
    assert cka.shape == (1, 2) and ((cka.values >= -0.05) & (cka.values <= 1.05)).all()
    assert "Representation similarity" in text
    log.clear()
    run_study(spec, echo=log.append)
    assert not any(line.startswith("[head]") and "skipped" not in line and "(kept)" not in line
                   and "current" not in line for line in log if "->" in line and ": val" not in line)
    assert sum("current, skipped" in line for line in log) == 5  # 3 single taps, 2 cross fusions


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + '[backbone]\nname = "dlib-age"\n', "either [backbone] (one network) or [[networks]] (several), not both"),
    (lambda t: t.replace('name = "dlib-gender"', 'name = "dlib-age"'), "lists dlib-age twice"),
    (lambda t: t.replace('[[networks]]\nname = "dlib-gender"\ntaps = ["layer_10_relu@avg", "layer_3_relu"]\n', ""),
     "lists 1 network; give two or more"),
    (lambda t: t.replace("[extract]\n", '[extract]\nout = "x.h5"\n'), "each network gets its own"),
    (lambda t: t.replace('name = "dlib-gender"', 'name = "dlib-gender"\npreprocessing = 3'), "preprocessing"),
])
def test_networks_spec_refusals_are_one_line(tmp_path, edit, message):
    from featlab.study.experiment import load_spec

    spec = tmp_path / "s.toml"
    spec.write_text(edit(TWO_NETS.format(manifest=tmp_path / "m.csv")))
    with pytest.raises(FeatlabError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        load_spec(spec)


def test_single_network_spec_keys_refused_without_networks(tmp_path):
    from featlab.study.experiment import load_spec

    spec = tmp_path / "s.toml"
    spec.write_text('similarity = true\n[dataset]\nadapter = "utkface"\nroot = "@sample"\n[backbone]\nname = "dlib-age"\n'
                    '[[heads]]\ntarget = "gender"\n')
    with pytest.raises(FeatlabError, match="list them as"):
        load_spec(spec)


def test_network_names_and_fusion_keys():
    from featlab.study.multinet import network_names, split_fusions

    nets = [{"name": "dlib-rec"}, {"name": "sface", "preprocessing": "template-5pt"},
            {"name": "sface", "preprocessing": "resize"}]
    names = network_names(nets)
    assert names == ["dlib-rec", "sface-template-5pt", "sface-resize"]
    keys = {"dlib-rec": ["res12", "res14"], "sface-template-5pt": ["fc1"], "sface-resize": ["fc1"]}
    spec = {"name": "s", "fusion": ["dlib-rec:res12+dlib-rec:res14", "dlib-rec:res12+sface-resize:fc1"]}
    assert split_fusions(spec, names, keys) == ({"dlib-rec": ["res12+res14"], "sface-template-5pt": [],
                                                 "sface-resize": []}, ["dlib-rec:res12+sface-resize:fc1"])
    for bad, msg in (("res12+res14", "NETWORK:TAP"), ("dlib-rec:res12+sface:fc1", "no network 'sface'"),
                     ("dlib-rec:res10+sface-resize:fc1", "does not extract 'res10'")):
        with pytest.raises(FeatlabError, match=msg):
            split_fusions({"name": "s", "fusion": [bad]}, names, keys)


def test_the_cross_fusion_reads_the_chosen_key_of_a_seed_ensemble(tmp_path):
    """A spec with seeds = N chooses ensembles, whose folders hold metrics.json and seed*/ but no config.json
    (the two-network study with 3 seeds stopped here with FileNotFoundError)."""
    import json

    from featlab.study.multinet import _store_key

    ens = tmp_path / "res14" / "bins8"
    (ens / "seed0").mkdir(parents=True)
    (ens / "seed0" / "config.json").write_text(json.dumps({"tap": "res14"}))
    (ens / "metrics.json").write_text(json.dumps({"kind": "ensemble", "tap": "res14@avg4"}))
    assert _store_key({"rows": [{"head_dir": str(tmp_path / "x")}, {"chosen": True, "head_dir": str(ens)}]}) == "res14@avg4"
    head = tmp_path / "embedding" / "age"
    head.mkdir(parents=True)
    (head / "config.json").write_text(json.dumps({"tap": "embedding"}))
    assert _store_key({"rows": [{"chosen": True, "head_dir": str(head)}]}) == "embedding"
