"""The grid (featlab.heads.grid): many heads in one Keras fit, each saved and scored as if trained alone;
fusion heads on several taps. Small generated features (tests/test_heads.py's make_features)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featlab.features.store import FeatureStore, label_row

from test_heads import FAST, make_features


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("gridfeats") / "synth.h5", missing=20)


@pytest.fixture(scope="module")
def grid(feats, tmp_path_factory):
    """taps conv, vec and their fusion x targets bins7, age, gender, trained and scored in one grid
    (validation scored in chunks of 17 rows, so that the chunks' seams are exercised)."""
    import featlab.heads.grid
    from featlab.study.workflow import train_grid

    root = tmp_path_factory.mktemp("gridres")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(featlab.heads.grid, "VAL_CHUNK", 17)
        dirs = train_grid(feats, ["conv", "vec", "conv+vec"], [("bins", 7), ("age", None), ("gender", None)],
                          out_root=root, **FAST)
    return root, dirs


def _test_metric(d: Path, m: str) -> float:
    return json.loads((d / "metrics.json").read_text())["test"]["metrics"][m]


def test_grid_heads_score_like_heads_trained_alone(feats, grid, tmp_path):
    """Same seed, same hyperparameters: each grid head's test figure is within a stated tolerance of the
    head trained alone (5 points of accuracy for gender, 10 for 7 bins on ~150 test faces, 1.5 years
    of MAE for age); a head that learned nothing (wrong rows, masks or weights) misses by far more."""
    from featlab.study.workflow import train_head

    _, dirs = grid
    by = {(d.parent.name, d.name): d for d in dirs}
    for tap, tname, target, cats, m, tol in (("vec", "gender", "gender", None, "accuracy", 0.05),
                                              ("conv", "age", "age", None, "mae", 1.5),
                                              ("conv", "bins7", "bins", 7, "accuracy", 0.10)):
        alone = train_head(feats, tap, target, cats, out_root=tmp_path, baselines=False, **FAST)
        a, g = _test_metric(alone, m), _test_metric(by[(tap, tname)], m)
        assert abs(a - g) <= tol, (tap, tname, a, g)
    # and they learned: gender is planted strongly in vec, age in conv (the majority share is ~0.5 / MAE ~20)
    assert _test_metric(by[("vec", "gender")], "accuracy") > 0.85
    assert _test_metric(by[("conv", "age")], "mae") < 12.0


def test_grid_head_is_a_standalone_head(feats, grid, tmp_path):
    """Each grid head loads on its own and reproduces its recorded test figure from the raw tap; its
    folder holds the same files as a head trained alone, and its config.json the same fields."""
    from featlab.data.labels import encode_target, split_rows
    from featlab.heads.model import load_head, outputs_to_prediction
    from featlab.study.workflow import train_head

    _, dirs = grid
    alone = train_head(feats, "vec", "gender", out_root=tmp_path, **FAST)
    d = next(x for x in dirs if x.parent.name == "vec" and x.name == "gender")
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in alone.iterdir())
    cfg_a = json.loads((alone / "config.json").read_text())
    cfg_g = json.loads((d / "config.json").read_text())
    assert set(cfg_g) == set(cfg_a) and cfg_g["head_key"] == "vec" and cfg_g["training"]["grid"]["heads"] == 9
    for d in dirs:
        model, cfg = load_head(d)
        with FeatureStore.open_read(feats) as s:
            labels = s.labels()
            y, valid = encode_target(labels, cfg["target"], cfg["cats"])
            te = split_rows(labels, valid)["test"]
            x = [s.read(p["tap"], te) for p in cfg["fusion"]] if cfg["fusion"] else s.read(cfg["tap"], te)
        pred = outputs_to_prediction(np.asarray(model(x, training=False)), cfg)["pred"]
        if cfg["target"] == "age":
            got, m = float(np.mean(np.abs(pred - y[te]))), "mae"
        else:
            got, m = float(np.mean(pred == y[te])), "accuracy"
        assert got == pytest.approx(_test_metric(d, m), abs=1e-6), d
    fused = [x for x in dirs if x.parent.name == "conv+vec"]
    assert len(fused) == 3 and len(load_head(fused[0])[0].inputs) == 2


def test_grid_heads_keep_the_weights_of_their_best_epoch(grid):
    """The weights saved for each head are the ones the grid scored at its best epoch: the val figure
    the fit logged there (from the joint model, the trunk's slice of the wide first layer) equals the
    one evaluation computes from the saved standalone head. Heads that read a tap the same way share a trunk."""
    _, dirs = grid
    for d in dirs:
        m = json.loads((d / "metrics.json").read_text())
        cfg = m["config"]
        hist = pd.read_csv(d / "history.csv")
        best = hist.iloc[cfg["training"]["best_epoch"] - 1]
        if cfg["target"] == "age":
            assert best["val_mae_years"] == pytest.approx(m["val"]["metrics"]["mae"], rel=1e-4), d
        else:
            assert abs(best["val_accuracy"] - m["val"]["metrics"]["accuracy"]) <= 1.0 / m["val"]["n"] + 1e-9, d
    shared = json.loads((dirs[0] / "config.json").read_text())["training"]["grid"]["shared_input"]
    # bins7 and age are read from the same rows; 20 other rows lack a gender, so gender's standardisation
    # differs and it gets a trunk of its own
    assert sorted(len(s) for s in shared) == [1, 1, 1, 2, 2, 2]
    assert ["conv -> bins7", "conv -> age"] in shared and ["conv -> gender"] in shared


def make_halves(path: Path, n: int = 2000, seed: int = 1) -> Path:
    """Taps 'a' (8,) and 'b' (2, 3, 3): gender is the sign of u + v, u planted only in a, v only in b."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(0, 1, n), rng.normal(0, 1, n)
    gender = np.where(u + v > 0, "m", "f")
    a = rng.normal(0, 1, (n, 8)).astype(np.float32)
    a[:, 0] = u + rng.normal(0, 0.1, n)
    b = rng.normal(0, 1, (n, 2, 3, 3)).astype(np.float32)
    b[:, 1] = (v[:, None, None] + rng.normal(0, 0.3, (n, 3, 3))).astype(np.float32)
    split = np.array(["train", "val", "test"])[rng.choice(3, n, p=[0.7, 0.15, 0.15])]
    identity = {"backbone": "synthetic", "model_sha256": "cd" * 32, "preprocessing": {"size": 4}, "flip": False,
                "align": False}
    with FeatureStore.open_for_append(path, identity) as st:
        st.set_attr("dataset", "halves")
        st.ensure_array("a", (8,), expected_rows=n)
        st.ensure_array("b", (2, 3, 3), expected_rows=n)
        labels = [label_row({"image_id": f"h{i:05d}", "path": f"/x/{i}.jpg", "age": 30.0, "gender": gender[i],
                             "race": "white", "split": split[i], "fold": -1}) for i in range(n)]
        st.append({"a": a, "b": b}, labels)
    return path


def test_fusion_head_beats_each_tap_alone(tmp_path):
    """Each tap carries half of the planted signal (~75 % accuracy alone); the fusion head a+b sees both
    and is filed under its own key, with the right number of standardised features."""
    from featlab.study.workflow import train_grid

    f = make_halves(tmp_path / "halves.h5")
    dirs = train_grid(f, ["a", "b", "a+b"], [("gender", None)], out_root=tmp_path / "r", baselines=False,
                      **{**FAST, "epochs": 20, "patience": 6, "lr": 3e-3})
    acc = {d.parent.name: _test_metric(d, "accuracy") for d in dirs}
    assert set(acc) == {"a", "b", "a+b"}
    assert acc["a+b"] > max(acc["a"], acc["b"]) + 0.08, acc
    assert acc["a+b"] > 0.85, acc
    cfg = json.loads((dirs[2] / "config.json").read_text())
    assert cfg["standardisation"]["n_features"] == 8 + 18 and [p["tap"] for p in cfg["fusion"]] == ["a", "b"]


def test_cli_trains_a_grid_and_compare_puts_fusions_last(feats, tmp_path, monkeypatch, capsys):
    """`train-head --layer vec --layer conv+vec --cats 7 --target gender` trains 4 heads in one call;
    compare lists the fusion head after the single tap."""
    from featlab.cli import main
    from featlab.report.compare import gather, tap_positions

    monkeypatch.chdir(tmp_path)
    rc = main(["train-head", "-f", str(feats), "-l", "vec", "-l", "conv+vec", "--cats", "7", "--target", "gender",
               "--epochs", "4", "-q"])
    assert rc in (0, None)
    written = [x for x in capsys.readouterr().out.splitlines() if x.startswith("head written to")]
    assert len(written) == 4
    recs = gather("synthetic", "synth", "gender", None, results_root=tmp_path / "results")
    assert sorted(r["key"] for r in recs) == ["conv+vec", "vec"]
    pos = tap_positions("synthetic", ["conv+vec", "vec", "conv"])
    assert sorted(pos, key=lambda k: pos[k][:2]) [-1] == "conv+vec"


def test_trunk_columns_start_like_a_lone_head():
    """Four heads share a 256-wide input and one 4x64-wide first layer: each head's columns start with
    a lone head's Glorot range sqrt(6 / (256 + 64)), not the wide layer's sqrt(6 / (256 + 256))."""
    from featlab.heads.grid import GridNet

    plans = [dict(parts=["t"], fused=False, mean=np.zeros(256), std=np.ones(256), pool=None, input_dropout=0.5,
                  n_inputs=256, n_classes=2, kind="softmax", age_grid=None, key="t", tname="gender")
             for _ in range(4)]
    hps = [dict(hidden=(64,), dropout=0.5, weight_decay=0.0)] * 4
    net = GridNet(plans, hps, ["t"], {"t": (256,)}, seed=0)
    assert len(net.trunks) == 1
    kernel = np.asarray(net.trunks[0]["dense"].kernel)
    assert kernel.shape == (256, 256)
    lone = np.sqrt(6.0 / (256 + 64))
    for i in range(4):
        cols = kernel[:, 64 * i: 64 * (i + 1)]
        assert np.abs(cols).max() <= lone and np.abs(cols).max() > 0.97 * lone
        assert net.head_weights(i)["hidden1"][0].tolist() == cols.tolist()


def test_grid_traces_once_and_skipping_stopped_trunks_changes_no_figure(feats, tmp_path, monkeypatch):
    """No tf.function retracing within a grid: with heads stopping at different epochs (whole trunks
    stop before the end) and val chunks of 17 rows (a shorter last chunk), every tf.function the grid
    creates is traced twice in all: its epoch loop once and its val predictor once (the old code traced
    a new loop and predictor at each restart without the stopped trunks, and the predictor again for the
    last chunk: 9 traces here). Skipping a stopped trunk (tf.cond) changes nothing: forced to run every
    trunk to the end, the grid saves bit-identical weights and histories for every head."""
    import tensorflow as tf

    import featlab.heads.grid
    from featlab.heads.grid import fit_grid
    from featlab.heads.model import load_head

    made, real = [], tf.function

    def counting(*a, **k):
        if a and callable(a[0]):
            made.append(real(*a, **k))
            return made[-1]
        deco = real(*a, **k)
        return lambda fn: made.append(deco(fn)) or made[-1]

    monkeypatch.setattr(tf, "function", counting)
    monkeypatch.setattr(featlab.heads.grid, "VAL_CHUNK", 17)
    hp = dict(epochs=40, patience=1, lr=0.01, batch_size=64, verbose=0)
    layers, targets = ["conv", "vec", "conv+vec"], [("bins", 7), ("age", None), ("gender", None)]
    dirs = fit_grid(feats, layers, targets, out_root=tmp_path / "skip", **hp)
    assert sum(f.experimental_get_tracing_count() for f in made) == 2
    cfgs = [json.loads((d / "config.json").read_text())["training"] for d in dirs]
    total = cfgs[0]["grid"]["epochs_run_all_heads"]
    assert cfgs[0]["grid"]["traces"] == {"epoch_loop": 1, "predict": 1}
    # the fixture exercises the skip: at least two of the three trunks stopped before the fit ended
    assert sum(max(c["epochs_run"] for c in cfgs[j: j + 3]) < total for j in (0, 3, 6)) >= 2

    monkeypatch.setattr(featlab.heads.grid, "_live_trunks", lambda net, stopped: [1.0] * len(net.trunks))
    dirs_all = fit_grid(feats, layers, targets, out_root=tmp_path / "all", **hp)
    for d, e in zip(dirs, dirs_all):
        assert (d / "history.csv").read_text() == (e / "history.csv").read_text(), d
        for w, v in zip(load_head(d)[0].get_weights(), load_head(e)[0].get_weights(), strict=True):
            np.testing.assert_array_equal(w, v)


def test_fusion_head_over_the_budget_trains_in_memory_when_the_machine_has_room(tmp_path, monkeypatch, capsys):
    """A fusion head cannot stream and trains alone, so the budget cannot change its numbers: over a tiny
    --memory-mb it trains in memory (saying so) to the same figures as under a large one; where the machine
    lacks the room it stops with one line naming both figures."""
    import featlab.heads.train
    from featlab.errors import FeatlabError
    from featlab.study.workflow import train_grid

    f = make_halves(tmp_path / "halves.h5")
    opts = {**FAST, "epochs": 3}
    big, = train_grid(f, ["a+b"], [("gender", None)], out_root=tmp_path / "big", baselines=False, memory_mb=4096, **opts)
    small, = train_grid(f, ["a+b"], [("gender", None)], out_root=tmp_path / "small", baselines=False, memory_mb=0.01,
                        **{**opts, "verbose": 1})
    assert "trained in memory" in capsys.readouterr().out
    assert _test_metric(small, "accuracy") == _test_metric(big, "accuracy")
    a = pd.read_csv(big / "faces.csv")
    b = pd.read_csv(small / "faces.csv")
    assert a.equals(b)
    monkeypatch.setattr(featlab.heads.train, "available_memory", lambda: 1 << 10)
    with pytest.raises(FeatlabError, match=r"over the 0 MiB budget and 80% of the 0 MiB this machine has free"):
        train_grid(f, ["a+b"], [("gender", None)], out_root=tmp_path / "none", baselines=False, memory_mb=0.01, **opts)


def test_a_head_and_a_grid_read_the_features_file_through_one_opening(feats, tmp_path, monkeypatch):
    """Training, scoring, recording and the baselines of one head (and of a grid with a fusion head, and of
    two seeds) open the features file once; before, one head opened it 5 times."""
    from featlab.features.store import FeatureStore
    from featlab.study.workflow import train_grid, train_head

    opened = []
    real = FeatureStore.open_read.__func__

    def counting(cls, path):
        opened.append(str(path))
        return real(cls, path)

    monkeypatch.setattr(FeatureStore, "open_read", classmethod(counting))
    opts = {**FAST, "epochs": 2}
    train_grid(feats, ["vec"], [("gender", None)], out_root=tmp_path / "one", **opts)
    assert opened == [str(feats)]
    train_grid(feats, ["conv", "vec", "conv+vec"], [("bins", 7), ("age", None)], out_root=tmp_path / "grid", **opts)
    train_head(feats, "vec", "gender", None, seeds=2, out_root=tmp_path / "seeds", **opts)
    assert opened == [str(feats)] * 3


def test_an_interrupted_seed_grid_gives_the_same_ensembles_and_compare_chooses_on_them(feats, tmp_path, monkeypatch):
    """--seeds 2 over a grid: each head's record is its seeds' ensemble. A run interrupted while scoring the
    second seed, then run again, leaves byte-identical ensembles; compare chooses on the ensembles' val figures."""
    import signal

    from featlab.report.compare import compare
    from featlab.study.workflow import train_grid

    opts = {**FAST, "epochs": 2}
    args = (feats, ["conv", "vec"], [("gender", None)])
    done = train_grid(*args, seeds=2, out_root=tmp_path / "a", baselines=False, **opts)
    monkeypatch.setenv("FEATLAB_KILL_AT", "record:3")  # the second seed's first record
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_grid(*args, seeds=2, out_root=tmp_path / "b", baselines=False, **opts)
    finally:
        signal.signal(signal.SIGINT, old)
        monkeypatch.delenv("FEATLAB_KILL_AT")
    again = train_grid(*args, seeds=2, out_root=tmp_path / "b", baselines=False, **opts)
    for a, b in zip(done, again):
        assert json.loads((a / "metrics.json").read_text())["kind"] == "ensemble"
        assert (a / "faces.csv").read_bytes() == (b / "faces.csv").read_bytes()
    m = {d.parent.name: json.loads((d / "metrics.json").read_text()) for d in done}
    backbone, dkey = done[0].parent.parent.parent.name, done[0].parent.parent.name
    r = compare(backbone, dkey, "gender", None, results_root=tmp_path / "a")
    best = max(m, key=lambda k: m[k]["val"]["metrics"]["accuracy"])
    assert r["chosen"] == best
    row = next(x for x in r["rows"] if x["reader"] == "head" and x["tap"] == best)
    assert row["accuracy"] == m[best]["test"]["metrics"]["accuracy"]
    assert row["accuracy_std_over_seeds"] == pytest.approx(m[best]["test"]["metrics_std"]["accuracy"])
    from featlab.study.experiment import comparison_table  # the study report shows the spread beside the interval

    lines = comparison_table(r)
    col = lines[0].split(" | ").index("SD of accuracy over seeds")
    cells = next(x for x in lines if x.startswith(f"| `{best}` head")).split(" | ")
    assert cells[col] == f"{100 * m[best]['test']['metrics_std']['accuracy']:.1f} pts"


def test_a_seed_grid_reads_each_tap_once_and_fits_each_seed_as_a_grid_of_that_seed_alone(feats, tmp_path, monkeypatch):
    """fit_grid(seeds=[0, 1, 2]) trains every seed in one pass: the taps are read from the file once for all
    three seeds (before: once per seed), and each seed's heads learn exactly what a grid of that seed alone
    learns (every epoch's train and val loss, bit for bit, and the same weights)."""
    from featlab.heads.grid import fit_grid

    opts = {**FAST, "epochs": 3}
    args = (feats, ["conv", "vec", "conv+vec"], [("gender", None), ("age", None)])
    reads = []
    real = FeatureStore.read

    def counting(self, key, rows=None, dtype=np.float32):
        reads.append(key)
        return real(self, key, rows, dtype)

    monkeypatch.setattr(FeatureStore, "read", counting)
    per_seed = fit_grid(*args, seeds=[0, 1, 2], seed_dir=True, out_root=tmp_path / "pass", **opts)
    assert sorted(reads) == ["conv", "vec"]
    assert len(per_seed) == 3 and all(len(d) == 6 for d in per_seed)
    reads.clear()
    alone = fit_grid(*args, seed=1, seed_dir=True, out_root=tmp_path / "alone", **opts)
    assert sorted(reads) == ["conv", "vec"]  # one seed alone reads as often as three in one pass
    import keras

    for a, b in zip(per_seed[1], alone):
        assert a.name == b.name == "seed1"
        assert (a / "history.csv").read_bytes() == (b / "history.csv").read_bytes()
        wa = keras.saving.load_model(a / "head.keras", compile=False).get_weights()
        wb = keras.saving.load_model(b / "head.keras", compile=False).get_weights()
        assert len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))
    # the seeds differ from each other (the pass did not train one seed three times)
    assert (per_seed[0][0] / "history.csv").read_bytes() != (per_seed[1][0] / "history.csv").read_bytes()
