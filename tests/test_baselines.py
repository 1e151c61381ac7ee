"""The linear probe is a fair opponent: it converges (and says so), its grid grows past an edge choice,
and its figures match independent scikit-learn fits. No TensorFlow: the head's standardisation is
written here as a trained head would have written it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featlab.heads import baselines as B
from featlab.data.labels import class_names, encode_target, split_rows
from featlab.features.store import FeatureStore, label_row

SHA = "cd" * 32
D = 40


def make_probe_features(path: Path, n: int = 900, seed: int = 0) -> Path:
    """One tap 'vec' (D features, correlated, on an offset) with gender and age linear in a few directions
    plus noise, so that a linear probe is the right model and its regularisation matters."""
    rng = np.random.default_rng(seed)
    age = rng.integers(1, 80, n).astype(float)
    z = (age - 40.0) / 20.0
    male = rng.random(n) < 0.5
    mix = rng.normal(0, 1, (D, D)) / np.sqrt(D)
    vec = rng.normal(0, 1, (n, D)) @ (np.eye(D) + 0.5 * mix)  # correlated noise
    vec[:, :3] += 0.6 * z[:, None] + rng.normal(0, 0.6, (n, 3))
    vec[:, 3:6] += 0.4 * np.where(male, 1.0, -1.0)[:, None]
    vec = (vec + 2.0).astype(np.float32)
    order = rng.permutation(n)
    sp = np.empty(n, dtype=object)
    sp[order[: int(0.6 * n)]] = "train"
    sp[order[int(0.6 * n) : int(0.8 * n)]] = "val"
    sp[order[int(0.8 * n) :]] = "test"
    ident = {"backbone": "synthetic", "model_sha256": SHA, "preprocessing": {"size": 4}, "flip": False, "align": False}
    with FeatureStore.open_for_append(path, ident) as st:
        st.set_attr("dataset", "probe")
        st.ensure_array("vec", (D,), expected_rows=n)
        labels = [label_row({"image_id": f"img{i:05d}", "path": f"/x/{i}.jpg", "age": age[i],
                             "gender": "m" if male[i] else "f", "race": "", "split": sp[i], "fold": -1})
                  for i in range(n)]
        st.append({"vec": vec}, labels)
    return path


@pytest.fixture(scope="module")
def probe_feats(tmp_path_factory):
    return make_probe_features(tmp_path_factory.mktemp("probe") / "probe.h5")


def _head(feats: Path, target: str, cats, d: Path):
    """A head folder as fit_baselines finds it (config + the head's train-row standardisation), and the
    probe's design: the standardised train/val/test rows and their targets."""
    with FeatureStore.open_read(feats) as st:
        lab = st.labels()
        x = st.read("vec", np.arange(st.nrows)).astype(np.float64)
    y, valid = encode_target(lab, target, cats)
    sp = split_rows(lab, valid)
    mean, std = x[sp["train"]].mean(0), x[sp["train"]].std(0)
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "standardisation.npz", mean=mean.astype(np.float32), std=std.astype(np.float32))
    cfg = {"target": target, "cats": cats, "tap": "vec", "class_names": class_names(target, cats),
           "target_name": target if cats is None else f"bins{cats}", "hyperparameters": {}}
    xs = {k: ((x[sp[k]] - mean.astype(np.float32)) / std.astype(np.float32)).astype(np.float32) for k in ("train", "val", "test")}
    return cfg, xs, {k: y[sp[k]] for k in ("train", "val", "test")}


def _fit(feats, cfg, d):
    with FeatureStore.open_read(feats) as st:
        out = B.fit_baselines(st, cfg, d)
    assert json.loads((d / "baselines.json").read_text())["linear"]["settings"] == out["linear"]["settings"]
    return out["linear"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # LogisticRegressionCV's attributes in scikit-learn 1.9
@pytest.mark.parametrize("target,cats", [("gender", None), ("bins", 7)])
def test_logistic_probe_converges_and_matches_logistic_regression_cv(probe_feats, tmp_path, target, cats):
    """The probe converges (iterations and flag recorded), and its val and test accuracy lie within
    1.5 points (val) and 3 points (test) of scikit-learn's LogisticRegressionCV run independently on the
    same split (28 values of C from 1e-6 to 1e3, chosen on the same validation rows, refit=False: fitted
    on the train rows), whose finer grid can only do as well or slightly better on val."""
    from sklearn.linear_model import LogisticRegressionCV

    cfg, x, y = _head(probe_feats, target, cats, tmp_path / "h")
    lin = _fit(probe_feats, cfg, tmp_path / "h")
    s = lin["settings"]
    assert s["converged"] is True and 0 < s["iterations"] < B.MAX_ITER_TOTAL
    assert all(r["converged"] for r in s["search"]) and s["chosen"] in s["grid"]
    assert s["stopped"] == "inside" and s["at_edge"] is False
    assert s["grid"][0] < s["chosen"] < s["grid"][-1]
    ntr = len(y["train"])
    ref = LogisticRegressionCV(Cs=np.logspace(-6, 3, 28), cv=[(np.arange(ntr), np.arange(ntr, ntr + len(y["val"])))],
                               refit=False, scoring="accuracy", max_iter=5000, tol=1e-6)
    ref.fit(np.concatenate([x["train"], x["val"]]), np.concatenate([y["train"], y["val"]]))
    ref_val = float((ref.predict(x["val"]) == y["val"]).mean())
    ref_test = float((ref.predict(x["test"]) == y["test"]).mean())
    ours_val, ours_test = lin["val"]["metrics"]["accuracy"], lin["test"]["metrics"]["accuracy"]
    assert ours_val == pytest.approx(ref_val, abs=0.015), (s["chosen"], float(ref.C_[0]))
    assert ours_test == pytest.approx(ref_test, abs=0.03), (s["chosen"], float(ref.C_[0]))
    assert ours_test > json.loads((tmp_path / "h" / "baselines.json").read_text())["majority"]["test"]["metrics"]["accuracy"] + 0.1


def test_ridge_probe_is_exact_and_matches_ridge_cv(probe_feats, tmp_path):
    """The age probe's predictions are scikit-learn Ridge's at the chosen alpha (to 1e-6 years), its val
    MAE is the best of the grid, and its test MAE lies within 3 % of RidgeCV's (alpha by leave-one-out on
    the train rows, an independent choice)."""
    from sklearn.linear_model import Ridge, RidgeCV

    cfg, x, y = _head(probe_feats, "age", None, tmp_path / "h")
    lin = _fit(probe_feats, cfg, tmp_path / "h")
    s = lin["settings"]
    # 540 train rows, 40 features: the val MAE flattens towards least squares at small alpha
    assert s["converged"] is True and s["stopped"] in ("inside", "flat") and s["at_edge"] is False
    vals = {r["alpha"]: r["val_mae"] for r in s["search"]}
    assert min(vals, key=vals.get) == s["chosen"] and lin["val"]["metrics"]["mae"] == pytest.approx(vals[s["chosen"]])
    ridge = Ridge(alpha=s["chosen"], solver="svd").fit(x["train"].astype(np.float64), y["train"])
    for split in ("val", "test"):
        ref = np.abs(np.clip(ridge.predict(x[split]), 0, None) - y[split]).mean()
        assert lin[split]["metrics"]["mae"] == pytest.approx(ref, abs=1e-6)
    cv = RidgeCV(alphas=np.logspace(-6, 8, 57)).fit(x["train"], y["train"])
    ref_test = np.abs(np.clip(cv.predict(x["test"]), 0, None) - y["test"]).mean()
    assert lin["test"]["metrics"]["mae"] == pytest.approx(ref_test, rel=0.03)
    majority = json.loads((tmp_path / "h" / "baselines.json").read_text())["majority"]["test"]["metrics"]["mae"]
    assert lin["test"]["metrics"]["mae"] < 0.8 * majority  # the planted signal is read


def test_search_extends_past_an_edge_and_stops_at_the_bound_or_a_plateau():
    """A figure that peaks at 1e-5 (three decades below the first grid) is found by extending the grid a
    decade at a time; one that keeps improving past the bound stops there and says so; a flat one stops."""
    seen = []

    def peak_at(p):
        def ev(v):
            seen.append(v)
            return {"key": (-abs(np.log10(v) - np.log10(p)),)}
        return ev

    res, best, added, stopped = B._search((1e-2, 1e-1, 1.0), (1e-8, 1e3), peak_at(1e-5))
    assert best == pytest.approx(1e-5) and stopped == "inside"
    assert added == pytest.approx([1e-3, 1e-4, 1e-5, 1e-6]) and sorted(res) == pytest.approx(sorted(seen))
    res, best, added, stopped = B._search((1e-2, 1e-1, 1.0), (1e-4, 1e3), peak_at(1e-7))
    assert best == pytest.approx(1e-4) and stopped == "bound" and added == pytest.approx([1e-3, 1e-4])
    res, best, added, stopped = B._search((1e-2, 1e-1, 1.0), (1e-4, 1e3), peak_at(1e3 * 10))
    assert best == pytest.approx(1e3) and stopped == "bound" and added == pytest.approx([10.0, 100.0, 1e3])
    # improving by 0.05 % per decade: flat within 0.1 %, so no extension
    res, best, added, stopped = B._search((1.0, 10.0), (1e-6, 1e8), lambda v: {"key": (-(10.0 + 0.005 * np.log10(v)),)},
                                          flat=1e-3)
    assert best == 1.0 and stopped == "flat" and added == []


def test_probe_that_does_not_converge_says_so(probe_feats, tmp_path, monkeypatch, capsys):
    """At an iteration cap too low to converge, the fit is continued up to MAX_ITER_TOTAL, then recorded
    as not converged with its iterations, and one warning line names the probe."""
    monkeypatch.setattr(B, "MAX_ITER", 2)
    monkeypatch.setattr(B, "MAX_ITER_TOTAL", 6)
    cfg, _, _ = _head(probe_feats, "bins", 7, tmp_path / "h")
    s = _fit(probe_feats, cfg, tmp_path / "h")["settings"]
    assert s["converged"] is False and s["iterations"] == 6 and s["max_iter_total"] == 6
    assert not any(r["converged"] for r in s["search"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "linear probe" in ln]
    assert len(err) == 1 and "vec -> bins7 did not converge in 6 L-BFGS iterations" in err[0]


# ---- the grid's probes: shared read, standardisation and Gram matrix, preconditioned solver (issue #24 item 3)

def _std_head(feats: Path, tap: str, target: str, cats, d: Path) -> dict:
    """A head folder for ``tap`` (its train-row standardisation, float32 as a trained head saves it)."""
    with FeatureStore.open_read(feats) as st:
        lab = st.labels()
        x = st.read(tap, np.arange(st.nrows)).reshape(st.nrows, -1).astype(np.float64)
    y, valid = encode_target(lab, target, cats)
    tr = split_rows(lab, valid)["train"]
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "standardisation.npz", mean=x[tr].mean(0).astype(np.float32),
             std=np.maximum(x[tr].std(0), 1e-6).astype(np.float32))
    return {"target": target, "cats": cats, "tap": tap, "class_names": class_names(target, cats),
            "target_name": target if cats is None else f"bins{cats}", "hyperparameters": {}}


def _alone_and_shared(feats: Path, heads, root: Path):
    """Each head's probe alone (scikit-learn from scratch) and all of them through one ProbeCache."""
    cache = B.ProbeCache()
    out = []
    with FeatureStore.open_read(feats) as st:
        for tap, target, cats in heads:
            d = root / f"{tap}-{target}{cats or ''}"
            cfg = _std_head(feats, tap, target, cats, d)
            alone = B.fit_baselines(st, cfg, d)["linear"]
            shared = B.fit_baselines(st, cfg, d, shared=cache)["linear"]
            out.append((tap, target, alone, shared))
    return out, cache


@pytest.mark.parametrize("precond", ["full", "randomized"])
def test_grid_probes_share_one_read_and_gram_and_match_scikit_learn(probe_feats, tmp_path, monkeypatch, precond):
    """Three targets on one tap through one ProbeCache: the tap is read and standardised once and its Gram
    matrix (and preconditioner) computed once for all of them and every C and alpha. Each probe chooses
    the same alpha on val as the lone ridge (its predictions are the lone ridge's to 1e-6 years) and, for C,
    agrees with scikit-learn alone on every C's val accuracy to within one val face (two fits that both
    meet scikit-learn's tolerance may put a face on the boundary on different sides), choosing a C whose
    lone val accuracy is the lone best to within one face; scikit-learn (warm-started from the fast
    solution) confirms convergence, and the test figure is within 1 point / 1 % of the lone probe's and
    inside its 95 % interval."""
    if precond == "randomized":  # the wide-tap preconditioner (leading eigenpairs only) on this small tap
        monkeypatch.setattr(B, "EIGH_FULL", 8)
        monkeypatch.setattr(B, "PRECOND_RANK", 6)
    runs, cache = _alone_and_shared(probe_feats, [("vec", "gender", None), ("vec", "bins", 7), ("vec", "age", None)],
                                    tmp_path)
    assert cache.stats == {"designs": 1, "grams": 1}
    for tap, target, alone, shared in runs:
        sa, ss = alone["settings"], shared["settings"]
        assert ss["converged"] and not ss["at_edge"]
        if target == "age":
            assert ss["chosen"] == sa["chosen"]
        else:
            face = 1.0 / alone["val"]["n"] + 1e-12
            lone = {r["C"]: r["val_accuracy"] for r in sa["search"]}
            for r in ss["search"]:
                if r["C"] in lone:
                    assert r["val_accuracy"] == pytest.approx(lone[r["C"]], abs=face), (target, r["C"])
            assert lone[ss["chosen"]] >= max(lone.values()) - face, (target, ss["chosen"], sa["chosen"])
        m = "mae" if target == "age" else "accuracy"
        fig, (lo, hi) = shared["test"]["metrics"][m], alone["test"]["metrics"][f"{m}_ci95"]
        assert lo <= fig <= hi, (target, fig, lo, hi)
        if target == "age":
            assert fig == pytest.approx(alone["test"]["metrics"][m], abs=1e-6)
            assert [r["val_mae"] for r in ss["search"]] == pytest.approx([r["val_mae"] for r in sa["search"]], abs=1e-6)
        else:
            assert "scikit-learn" in ss["solver"] and all(r["converged"] for r in ss["search"])
            assert fig == pytest.approx(alone["test"]["metrics"][m], abs=0.01)
            # the fast solver does the work: scikit-learn finishes in far fewer iterations than alone
            assert ss["iterations"] < sa["iterations"] + 5


def test_fast_logistic_reaches_scikit_learns_optimum(probe_feats):
    """The preconditioned solver stops where scikit-learn's own L-BFGS, warm-started there, stops at once
    (0 iterations), and its coefficients are as close to scikit-learn's tightly converged optimum (tol 1e-10)
    as scikit-learn's own fit at the probe's tolerance is (within 2x, or 1e-3 of their scale)."""
    from sklearn.linear_model import LogisticRegression

    with FeatureStore.open_read(probe_feats) as st:
        lab = st.labels()
        x = st.read("vec", np.arange(st.nrows)).astype(np.float32)
    y, valid = encode_target(lab, "bins", 7)
    tr = split_rows(lab, valid)["train"]
    xt = ((x[tr] - x[tr].mean(0)) / x[tr].std(0)).astype(np.float32)
    sh = B._Shared(xt)
    classes = np.unique(y[tr])
    k = len(classes)
    [(coef, icpt)], it = B._fast_logistic(sh, np.searchsorted(classes, y[tr]), k, [0.1],
                                          [(np.zeros((k, xt.shape[1])), np.zeros(k))], 1000)
    assert 0 < it < 200
    m = LogisticRegression(C=0.1, tol=B.TOL, max_iter=500, warm_start=True)
    m.coef_, m.intercept_ = coef, icpt
    m.fit(xt, y[tr])
    assert int(m.n_iter_[0]) == 0
    ref = LogisticRegression(C=0.1, tol=1e-10, max_iter=10000).fit(xt.astype(np.float64), y[tr])
    usual = LogisticRegression(C=0.1, tol=B.TOL, max_iter=10000).fit(xt, y[tr])

    def err(c, b):
        return max(np.abs(c - ref.coef_).max(), np.abs(b - ref.intercept_).max())

    scale = np.abs(ref.coef_).max()
    assert err(coef, icpt) <= max(2 * err(usual.coef_, usual.intercept_), 1e-3 * scale), (err(coef, icpt), err(usual.coef_, usual.intercept_))


def test_grid_probes_on_real_demo_features_lie_inside_scikit_learns_intervals(tmp_path):
    """The demo's real features (dlib-rec on the 600 shipped UTKFace faces, 435 train rows): through the
    grid's ProbeCache, every probe's test figure (gender, 8 bins and age on the 128-d embedding, the
    fast solver; on res14, 1,024 values per face, wider than the train rows, the shared read with
    scikit-learn's solver) lies inside the 95 % interval of the scikit-learn probe fitted alone."""
    from featlab.data.datasets import prepare_dataset
    from featlab.features.extract import extract
    from featlab.data.manifest import write_manifest

    sample = Path(__file__).resolve().parents[1] / "featlab" / "data" / "utkface-sample"
    df, _ = prepare_dataset("utkface", sample)
    feats = extract(write_manifest(df, tmp_path / "m.csv"), ["res14", "embedding"], backbone="dlib-rec",
                    out=tmp_path / "demo.h5", progress=False).out
    heads = [(tap, t, c) for tap in ("embedding", "res14") for t, c in (("gender", None), ("bins", 8), ("age", None))]
    runs, cache = _alone_and_shared(feats, heads, tmp_path / "heads")
    assert cache.stats == {"designs": 2, "grams": 1}  # res14 has no Gram: its probes are scikit-learn's alone
    for tap, target, alone, shared in runs:
        m = "mae" if target == "age" else "accuracy"
        fig, (lo, hi) = shared["test"]["metrics"][m], alone["test"]["metrics"][f"{m}_ci95"]
        assert lo <= fig <= hi, (tap, target, fig, lo, hi)
        if target != "age":
            assert ("solver" in shared["settings"]) == (tap == "embedding")
