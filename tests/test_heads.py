"""Heads on small generated features with a planted signal: they learn, reproduce, stream, and
evaluation refuses features of another model. TensorFlow is imported once for the module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featlab.data.bins import get_scheme
from featlab.errors import FeatlabError
from featlab.features.store import FeatureStore, label_row

SHA = "ab" * 32
FAST = dict(epochs=12, patience=4, batch_size=64, verbose=0)


def make_features(path: Path, n: int = 1000, seed: int = 0, sha: str = SHA, folds: bool = False,
                  split: bool = True, missing: int = 0, dataset: str = "synth") -> Path:
    """A features file with taps 'conv' (6, 4, 4) and 'vec' (12,), age/gender planted in a few channels."""
    rng = np.random.default_rng(seed)
    age = rng.integers(1, 80, n).astype(float)
    gender = rng.choice(["f", "m"], n)
    race = rng.choice(["white", "black", "asian"], n)
    if missing:
        age[:missing] = np.nan
        gender[missing : 2 * missing] = ""
    order = rng.permutation(n)
    sp = np.empty(n, dtype=object)
    sp[order[: int(0.7 * n)]] = "train"
    sp[order[int(0.7 * n) : int(0.85 * n)]] = "val"
    sp[order[int(0.85 * n) :]] = "test"
    fold = (order % 5) if folds else np.full(n, -1)
    z = np.nan_to_num((age - 40.0) / 20.0)
    g = np.where(gender == "m", 1.0, np.where(gender == "f", -1.0, 0.0))
    conv = rng.normal(0, 1, (n, 6, 4, 4)).astype(np.float32)
    conv[:, 0] += 1.2 * z[:, None, None]
    conv[:, 1] += 1.2 * (z**2 - 1)[:, None, None]
    conv[:, 2] += 1.0 * g[:, None, None]
    conv += 3.0  # a non-zero mean that the standardisation must remove
    vec = rng.normal(0, 0.5, (n, 12)).astype(np.float32)
    vec[:, 0] += z
    vec[:, 1] += g
    identity = {"backbone": "synthetic", "model_sha256": sha, "preprocessing": {"size": 4}, "flip": False, "align": False}
    with FeatureStore.open_for_append(path, identity) as st:
        st.set_attr("dataset", dataset)
        st.ensure_array("conv", (6, 4, 4), expected_rows=n)
        st.ensure_array("vec", (12,), expected_rows=n)
        for lo in range(0, n, 400):
            hi = min(n, lo + 400)
            labels = [label_row({"image_id": f"img{i:05d}", "path": f"/x/{i}.jpg", "age": age[i], "gender": gender[i],
                                 "race": race[i], "split": (sp[i] if split else ""), "fold": int(fold[i])})
                      for i in range(lo, hi)]
            st.append({"conv": conv[lo:hi], "vec": vec[lo:hi]}, labels)
    return path


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("feats") / "synth.h5", missing=20)


@pytest.fixture(scope="module")
def trained(feats, tmp_path_factory):
    """One bins head (7 groups) shared by several tests."""
    from featlab.study.workflow import train_head

    root = tmp_path_factory.mktemp("results")
    d = train_head(feats, "conv", "bins", 7, out_root=root, **FAST)
    return d


def _majority_share(feats, target, cats=None, split="test"):
    with FeatureStore.open_read(feats) as s:
        df = s.labels()
    df = df[df.split == split]
    if target == "bins":
        y = get_scheme(cats).assign(df.age.dropna())
        return np.bincount(y).max() / len(y)
    g = df.gender[df.gender != ""]
    return g.value_counts().max() / len(g)


def test_bins_head_learns_and_writes_everything(trained, feats):
    d = trained
    assert d.parts[-4:] == ("synthetic", "synth", "conv", "bins7")
    for f in ("head.keras", "config.json", "history.csv", "history.png", "standardisation.npz", "metrics.json",
              "confusion.csv", "confusion_counts.csv", "confusion.png", "subgroups.csv", "predictions.csv"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    chance = _majority_share(feats, "bins", 7)
    assert m["test"]["metrics"]["accuracy"] > chance + 0.25, (m["test"]["metrics"], chance)
    assert m["test"]["metrics"]["one_off"] > 0.85
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["features_model_sha256"] == SHA and cfg["tap"] == "conv" and cfg["cats"] == 7
    assert cfg["counts"]["dropped_missing_target"] == 20
    assert cfg["counts"]["train"] + cfg["counts"]["val"] + cfg["counts"]["test"] == 1000 - 20
    assert cfg["hyperparameters"]["hidden"] == [64] and cfg["seed"] == 0
    assert cfg["hyperparameters"]["input_dropout"] == 0.2  # 96 inputs: the light default
    assert cfg["data_loading"].startswith("train rows read in one go")
    head = (d / "confusion.csv").read_text().splitlines()[0].split(",")
    assert head[1:] == list(get_scheme(7).names)
    assert (d / "subgroups.csv").read_text().startswith("grouping,group,n,accuracy")
    hist = (d / "history.csv").read_text().splitlines()
    assert hist[0].startswith("epoch,") and "val_loss" in hist[0] and len(hist) >= 2


def test_age_head_beats_the_mean(feats, tmp_path):
    from featlab.study.workflow import train_head

    d = train_head(feats, "conv", "age", out_root=tmp_path, **FAST)
    m = json.loads((d / "metrics.json").read_text())
    with FeatureStore.open_read(feats) as s:
        df = s.labels()
    tr, te = df[df.split == "train"].age.dropna(), df[df.split == "test"].age.dropna()
    baseline = float(np.abs(te - tr.median()).mean())
    assert m["test"]["metrics"]["mae"] < 0.5 * baseline, (m["test"]["metrics"]["mae"], baseline)
    assert 0 <= m["test"]["metrics"]["cs5"] <= 1
    for c in (5, 7, 8):
        assert m["test"]["metrics"][f"accuracy_bins{c}"] > 0.4
        assert (d / f"confusion_bins{c}.csv").is_file() and (d / f"confusion_bins{c}.png").is_file()
    assert (d / "scatter.png").is_file()
    assert d.name == "age"


def test_gender_head(feats, tmp_path):
    from featlab.study.workflow import train_head

    d = train_head(feats, "conv", "gender", out_root=tmp_path, pool="avg", **FAST)
    assert d.parts[-2:] == ("conv~avg", "gender")  # pooled by the head: never where a tap pooled at extraction goes
    m = json.loads((d / "metrics.json").read_text())
    assert m["test"]["metrics"]["accuracy"] > 0.8 > _majority_share(feats, "gender") + 0.2
    assert set(m["test"]["metrics"]) >= {"recall_f", "recall_m"}
    assert (d / "confusion.png").is_file()


def test_ordinal_bins_head(feats, tmp_path):
    from featlab.study.workflow import train_head

    d = train_head(feats, "conv", "bins", 5, out_root=tmp_path, ordinal=True, **FAST)
    m = json.loads((d / "metrics.json").read_text())
    assert json.loads((d / "config.json").read_text())["output"] == "coral"
    assert m["test"]["metrics"]["accuracy"] > _majority_share(feats, "bins", 5) + 0.25
    # the saved ordinal head reloads and evaluates the same
    from featlab.report.evaluate import evaluate_head

    before = (d / "metrics.json").read_bytes()
    again = evaluate_head(d, out_dir=tmp_path / "again")
    assert again["metrics"]["accuracy"] == pytest.approx(m["test"]["metrics"]["accuracy"])
    evaluate_head(d, split="val")  # other splits and files never touch the head's own record
    assert (d / "metrics.json").read_bytes() == before
    assert json.loads((d / "eval" / "synth" / "val" / "metrics.json").read_text())["metrics"]["accuracy"] == \
        pytest.approx(m["val"]["metrics"]["accuracy"])


def test_same_seed_same_predictions(feats, tmp_path, trained):
    from featlab.study.workflow import train_head

    d2 = train_head(feats, "conv", "bins", 7, out_root=tmp_path, **FAST)
    assert (trained / "predictions.csv").read_text() == (d2 / "predictions.csv").read_text()
    h1 = (trained / "history.csv").read_text()
    assert h1 == (d2 / "history.csv").read_text()


def test_streaming_matches_in_memory(feats, tmp_path, trained):
    from featlab.study.workflow import train_head

    d = train_head(feats, "conv", "bins", 7, out_root=tmp_path, memory_mb=0.05, **FAST)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["data_loading"].startswith("streamed")
    a_mem = json.loads((trained / "metrics.json").read_text())["test"]["metrics"]["accuracy"]
    a_str = json.loads((d / "metrics.json").read_text())["test"]["metrics"]["accuracy"]
    assert a_str > _majority_share(feats, "bins", 7) + 0.25
    assert abs(a_str - a_mem) < 0.1


def test_stream_shuffles_the_whole_split_every_epoch(feats):
    """Each block of a streamed epoch is a uniform draw from the whole split (not file-order chunks), every row
    comes once per epoch with its own label, and validation streams read only their own rows."""
    from featlab.features.featureio import ShuffledBatches

    with FeatureStore.open_read(feats) as s:
        df = s.labels()
        rows = np.flatnonzero(df.split.to_numpy() == "train")
        y = np.arange(len(rows), dtype=np.float32)  # y = position within the split: identifies the row
        ds = ShuffledBatches(s, "conv", rows, y, None, batch_size=50, shuffle=True, seed=3, budget_bytes=200 * 384)
        full = s.read("conv", rows)
        firsts = []
        for epoch in range(2):
            seen = []
            for i in range(len(ds)):
                xb, yb = ds.batch(i)
                assert len(xb) == len(yb) <= 50
                np.testing.assert_array_equal(xb, full[yb.astype(int)])  # features match their labels
                seen.extend(yb.astype(int).tolist())
            assert sorted(seen) == list(range(len(rows)))  # every split row once per epoch
            # the first block (200 rows) spans the whole file, not one stretch of it
            first = rows[np.asarray(seen[:200])]
            assert first.min() < 0.1 * len(df) and first.max() > 0.9 * len(df)
            firsts.append(seen)
            ds.next_epoch()
        assert firsts[0] != firsts[1]  # reshuffled
        val = np.flatnonzero(df.split.to_numpy() == "val")
        vs = ShuffledBatches(s, "conv", val, np.zeros(len(val)), None, batch_size=64, shuffle=False, budget_bytes=1 << 16)
        for i in range(len(vs)):
            vs.batch(i)
        assert vs.rows_read == len(val)


def test_evaluate_refuses_other_model_and_handles_held_out_file(trained, tmp_path):
    from featlab.report.evaluate import evaluate_head

    other = make_features(tmp_path / "other.h5", n=200, seed=5, sha="cd" * 32)
    with pytest.raises(FeatlabError, match="another model file"):
        evaluate_head(trained, features=other)
    # same model, no split column: evaluated on every row, and said so
    held = make_features(tmp_path / "held.h5", n=300, seed=6, split=False)
    before = (trained / "metrics.json").read_bytes()
    r = evaluate_head(trained, features=held)
    assert (trained / "metrics.json").read_bytes() == before
    assert r["n"] == 300 and "every row of held.h5" in r["split_note"]
    assert (trained / "eval" / "synth" / "all" / "metrics.json").is_file()
    assert r["metrics"]["accuracy"] > 0.5
    # a file without the tap
    notap = tmp_path / "notap.h5"
    with FeatureStore.open_for_append(notap, {"backbone": "synthetic", "model_sha256": SHA}) as st:
        st.ensure_array("vec", (12,))
        st.append({"vec": np.zeros((1, 12), np.float32)},
                  [label_row({"image_id": "a", "path": "/a", "age": 3, "gender": "f", "race": "", "split": "", "fold": -1})])
    with pytest.raises(FeatlabError, match="no tap 'conv'"):
        evaluate_head(trained, features=notap)


def test_folds(tmp_path):
    from featlab.study.workflow import train_head

    f = make_features(tmp_path / "adience.h5", n=600, seed=2, folds=True, split=False)
    with pytest.raises(FeatlabError, match="--fold"):
        train_head(f, "vec", "gender", out_root=tmp_path / "r", **FAST)
    root = train_head(f, "vec", "gender", out_root=tmp_path / "r", fold="all", **{**FAST, "epochs": 4})
    assert root.name == "gender"
    for k in range(5):
        cfg = json.loads((root / f"fold{k}" / "config.json").read_text())
        assert cfg["fold"] == k and cfg["counts"]["test"] == 120
    m = json.loads((root / "metrics.json").read_text())
    assert m["kind"] == "folds" and m["folds"] == [0, 1, 2, 3, 4]
    accs = [p["accuracy"] for p in m["test"]["per_member"]]
    assert m["test"]["metrics_std"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))  # sample std
    # the pooled figure is over every face once: the fold accuracies weighted by their sizes
    assert m["test"]["n"] == 600 and m["test"]["metrics"]["accuracy"] == pytest.approx(np.mean(accs))
    lo, hi = m["test"]["metrics"]["accuracy_ci95"]
    assert lo < m["test"]["metrics"]["accuracy"] < hi
    assert len((root / "folds.csv").read_text().splitlines()) == 6


def test_bad_requests(feats, tmp_path):
    from featlab.study.workflow import train_head

    with pytest.raises(FeatlabError, match="cats"):
        train_head(feats, "vec", "bins", None, out_root=tmp_path)
    with pytest.raises(FeatlabError, match="no tap"):
        train_head(feats, "nope", "age", out_root=tmp_path)
    with pytest.raises(FeatlabError, match="target"):
        train_head(feats, "vec", "height", out_root=tmp_path)


def test_training_never_reads_a_test_row_and_standardises_on_train_only(feats, tmp_path, monkeypatch):
    """Spy on every read of the tap and on the statistics: fitting a head touches train and val rows only,
    and the standardisation is computed from exactly the train rows."""
    import featlab.heads.train as T
    from featlab.data.labels import encode_target, split_rows

    reads, stats = [], []
    real_read, real_stats = FeatureStore.read, T.feature_stats

    def spy_read(self, key, rows=None, dtype=np.float32):
        reads.append(np.arange(self.nrows) if rows is None else np.asarray(rows).ravel())
        return real_read(self, key, rows, dtype)

    def spy_stats(store, key, rows, *a, **k):
        stats.append(np.asarray(rows))
        return real_stats(store, key, rows, *a, **k)

    monkeypatch.setattr(FeatureStore, "read", spy_read)
    monkeypatch.setattr(T, "feature_stats", spy_stats)
    d = T.fit_head(feats, "vec", "gender", out_root=tmp_path, **FAST)
    with FeatureStore.open_read(feats) as s:
        lab = s.labels()
    _, valid = encode_target(lab, "gender")
    sp = split_rows(lab, valid)
    touched = np.unique(np.concatenate(reads))
    assert not np.intersect1d(touched, sp["test"]).size
    assert len(stats) == 1 and np.array_equal(np.sort(stats[0]), sp["train"])
    z = np.load(d / "standardisation.npz")
    with FeatureStore.open_read(feats) as s:
        x = real_read(s, "vec", sp["train"])
    np.testing.assert_allclose(z["mean"], x.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_non_finite_features_and_stale_labels_are_refused(tmp_path):
    from featlab.study.workflow import train_head

    f = make_features(tmp_path / "bad.h5", n=300, seed=4)
    with FeatureStore.open_for_append(f, {"backbone": "synthetic", "model_sha256": SHA}) as st:
        arr = st.array("vec")
        row = arr[17]
        row[3] = np.inf
        arr[17] = row
        info = st.tap_info()
        info["vec"].pop("checked_rows", None)  # as a file written before the check
        st.set_attr("taps", info)
    with pytest.raises(FeatlabError, match=r"vec.*(non-finite|inf|nan)"):
        train_head(f, "vec", "gender", out_root=tmp_path / "r", **FAST)


def test_seeds_share_their_validation_faces_and_make_an_ensemble(tmp_path):
    """--seeds N: seeds differ in training only (the held-out validation groups do not move with the seed);
    the record is the seeds' ensemble, whose predictions are the mean of the seeds' probabilities (recomputed
    here from each seed's saved head), with the seeds' mean figure and spread beside it."""
    import pandas as pd

    from featlab.data.labels import encode_target, split_rows
    from featlab.heads.model import load_head, predict_rows
    from featlab.study.workflow import train_head

    f = make_features(tmp_path / "folds.h5", n=500, seed=3, folds=True, split=False)
    root = train_head(f, "vec", "gender", fold=0, seeds=3, out_root=tmp_path / "r", **{**FAST, "epochs": 3})
    faces = [pd.read_csv(root / f"seed{s}" / "faces.csv") for s in (0, 1)]
    vals = [set(x[x.split == "val"].image_id) for x in faces]
    assert vals[0] == vals[1] and len(vals[0]) > 20
    m = json.loads((root / "metrics.json").read_text())
    accs = [json.loads((root / f"seed{s}" / "metrics.json").read_text())["test"]["metrics"]["accuracy"] for s in (0, 1, 2)]
    assert m["kind"] == "ensemble" and m["seeds"] == [0, 1, 2] and m["ensemble"]["members"] == 3
    assert m["test"]["metrics"]["accuracy_mean_of_seeds"] == pytest.approx(np.mean(accs))
    assert m["test"]["metrics_std"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))  # sample std
    with FeatureStore.open_read(f) as st:
        labels = st.labels()
        y, valid = encode_target(labels, "gender")
        test = split_rows(labels, valid, 0)["test"]
        proba = np.mean([predict_rows(*load_head(root / f"seed{s}"), st, test)["proba"] for s in (0, 1, 2)], axis=0)
    hit = (proba.argmax(axis=1) == y[test]).astype(float)
    assert m["test"]["metrics"]["accuracy"] == pytest.approx(hit.mean(), abs=1e-12)
    ens = pd.read_csv(root / "faces.csv", dtype={"image_id": str})
    ens = ens[ens.split == "test"].set_index("image_id")["accuracy"]
    assert np.array_equal(ens.loc[labels["image_id"].to_numpy()[test]].to_numpy(), hit)
    lo, hi = m["test"]["metrics"]["accuracy_ci95"]
    assert lo <= m["test"]["metrics"]["accuracy"] <= hi
    curve = m["ensemble_val_curve"]  # the first seed alone, then the ensembles of 2 and 3: the last is the record's
    assert [c["n"] for c in curve] == [1, 2, 3]
    assert curve[0]["accuracy"] == pytest.approx(json.loads((root / "seed0" / "metrics.json").read_text())["val"]["metrics"]["accuracy"])
    assert curve[-1]["accuracy"] == pytest.approx(m["val"]["metrics"]["accuracy"])


def _log1p_plan(max_age: int = 79):
    """The age grid of a log1p expectation head, made as plan_head makes it (ages 0..max_age in target units)."""
    ages = np.arange(0.0, max_age + 1.0)
    a = np.log1p(np.array([1.0, 20.0, 40.0, 79.0]))
    transform = {"kind": "log1p", "mean": float(a.mean()), "scale": float(a.std())}
    grid = (np.log1p(ages) - transform["mean"]) / transform["scale"]
    return ages, transform, grid


def test_log1p_expectation_head_predicts_the_mean_age_in_years():
    """p = 1/2 on ages 1 and 79: the expected age is 40 years (the log-space expectation would say 11.6),
    both in the saved head's prediction and in the loss and MAE it trains and is monitored with."""
    from featlab.heads.model import outputs_to_prediction
    from featlab.heads.train import loss_and_metrics

    ages, transform, grid = _log1p_plan()
    p = np.zeros((2, len(ages)))
    p[0, [1, 79]] = 0.5
    p[1, [10, 30, 50]] = [0.2, 0.3, 0.5]
    cfg = {"output": "expectation", "target_transform": transform, "age_grid": grid.round(6).tolist()}
    pred = outputs_to_prediction(p, cfg)["pred"]
    assert pred == pytest.approx([40.0, 0.2 * 10 + 0.3 * 30 + 0.5 * 50], abs=1e-3)
    log_space = np.expm1((p[0] @ grid) * transform["scale"] + transform["mean"])  # the expectation taken in log1p
    assert log_space == pytest.approx(np.sqrt(2 * 80) - 1) and log_space == pytest.approx(11.65, abs=0.01)
    loss, (mae_years,) = loss_and_metrics({"kind": "expectation", "transform": transform, "age_grid": grid},
                                          {"age_sigma": 0.0})
    true_t = ((np.log1p([[40.0], [36.0]]) - transform["mean"]) / transform["scale"]).astype(np.float32)
    # the true ages are each row's expected age: zero loss and zero error in years
    assert np.asarray(loss(true_t, p.astype(np.float32))) == pytest.approx([0.0, 0.0], abs=1e-4)
    assert np.asarray(mae_years(true_t, p.astype(np.float32))) == pytest.approx([0.0, 0.0], abs=1e-3)  # per face
    off = ((np.log1p([[50.0], [46.0]]) - transform["mean"]) / transform["scale"]).astype(np.float32)
    assert np.asarray(mae_years(off, p.astype(np.float32))) == pytest.approx([10.0, 10.0], abs=1e-3)


def test_a_heads_intervals_resample_people(tmp_path):
    """A gender head on 80 people x 6 photos whose features carry a per-person offset (a person's photos are
    right or wrong together): metrics.json's accuracy_ci95, on val and test, is scipy.stats.bootstrap's BCa
    interval over the people of the per-face correctness that predictions.csv gives."""
    import pandas as pd
    from test_uncertainty import scipy_group_interval

    from featlab.scoring.uncertainty import interval
    from featlab.study.workflow import train_head

    rng = np.random.default_rng(4)
    people, photos = 80, 6
    n = people * photos
    person = np.repeat(np.arange(people), photos)
    gender = rng.choice(["f", "m"], people)[person]
    split = rng.permutation(np.repeat(["train", "val", "test"], [56, 12, 12]))[person]
    g = np.where(gender == "m", 1.0, -1.0)
    vec = rng.normal(0, 0.3, (n, 12)).astype(np.float32)
    vec[:, 1] += g + rng.normal(0, 1.0, people)[person]  # the person's offset: errors shared by their photos
    path = tmp_path / "people.h5"
    identity = {"backbone": "synthetic", "model_sha256": SHA, "preprocessing": {"size": 4}, "flip": False, "align": False}
    with FeatureStore.open_for_append(path, identity) as st:
        st.set_attr("dataset", "people")
        st.ensure_array("vec", (12,), expected_rows=n)
        st.append({"vec": vec}, [label_row({"image_id": f"img{i:04d}", "path": f"/x/{i}.jpg", "age": 30, "gender": gender[i],
                                            "race": "", "split": split[i], "fold": -1, "group": f"person{person[i]:02d}"})
                                 for i in range(n)])
    d = train_head(path, "vec", "gender", out_root=tmp_path / "r", baselines=False, **{**FAST, "epochs": 3})
    m = json.loads((d / "metrics.json").read_text())
    widths = []
    for sp, pred_file in (("val", "predictions_val.csv"), ("test", "predictions.csv")):
        p = pd.read_csv(d / pred_file, dtype={"image_id": str})
        correct = (p["true"] == p["predicted"]).to_numpy(dtype=float)
        groups = np.array([f"person{person[int(i[3:])]:02d}" for i in p["image_id"]], dtype=object)
        assert m[sp]["n"] == len(p) == 72 and m[sp]["metrics"]["accuracy"] == pytest.approx(correct.mean())
        want = scipy_group_interval(correct, groups)
        np.testing.assert_allclose(m[sp]["metrics"]["accuracy_ci95"], want, rtol=0, atol=1e-12)
        assert m[sp]["uncertainty"]["unit"] == "person" and m[sp]["uncertainty"]["n_units"] == 12
        lo, hi = interval(correct)  # over photos
        widths.append((want[1] - want[0]) / (hi - lo))
    assert max(widths) > 1.2, widths  # the people are not independent photos here


@pytest.mark.parametrize("kind", ["expectation", "linear"])
def test_the_mae_in_years_keras_reports_is_over_faces_not_batches(kind):
    """History's val MAE (and monitor = "val_metric") is the mean over every face: 11 faces in batches of 4
    give the figure of one batch of 11 and of numpy (it was the mean of the 3 batch means: 9.38 vs 7.66 years
    on a CNN's 779 val faces)."""
    from featlab.heads.keras_env import keras
    from featlab.heads.train import loss_and_metrics

    k = keras()
    k.utils.set_random_seed(0)
    transform = {"kind": "z", "mean": 30.0, "scale": 15.0}
    grid = (np.arange(0.0, 81.0) - 30.0) / 15.0
    plan = {"kind": kind, "transform": transform, "age_grid": grid if kind == "expectation" else None}
    hp = {"label_smoothing": 0.0, "age_sigma": 2.0, "age_loss": "mae"}
    loss, metrics = loss_and_metrics(plan, hp)
    n_out = len(grid) if kind == "expectation" else 1
    act = "softmax" if kind == "expectation" else None
    model = k.Sequential([k.Input((3,)), k.layers.Dense(n_out, activation=act)])
    model.compile(optimizer="adam", loss=loss, metrics=metrics)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 3)).astype(np.float32)
    ages = np.r_[rng.uniform(20, 40, 8), [75.0, 80.0, 2.0]]
    y = ((ages - 30.0) / 15.0).astype(np.float32)[:, None]
    out = np.asarray(model(x), dtype=np.float64)
    pred = out @ (grid * 15.0 + 30.0) if kind == "expectation" else out[:, 0] * 15.0 + 30.0
    want = np.abs(pred - ages).mean()
    for bs in (4, 11):
        got = model.evaluate(x, y, batch_size=bs, verbose=0, return_dict=True)["mae_years"]
        assert got == pytest.approx(want, rel=1e-5)
