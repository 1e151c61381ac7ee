"""Uncertainty over people, not photos: cluster bootstrap, design effect, BH families, equivalence tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featlab.scoring.uncertainty import (adjust_within, design_effect, interval, paired_difference, unit_of, verdict)

P, K = 40, 10  # people x photos each


def _correlated(seed: int = 0):
    """40 people x 10 photos; each person's photos share that person's accuracy p_i ~ Beta(2, 2): the
    intra-class correlation is 1 / (2 + 2 + 1) = 0.2, so the planted design effect is 1 + (10 - 1) 0.2 = 2.8."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 2, size=P)
    groups = np.repeat([f"person{i}" for i in range(P)], K)
    v = (rng.random(P * K) < np.repeat(p, K)).astype(float)
    return v, groups


def test_cluster_interval_is_wider_by_about_the_planted_design_effect():
    planted = 1 + (K - 1) * 0.2
    ratios, deffs = [], []
    for seed in range(5):
        v, g = _correlated(seed)
        lo_f, hi_f = interval(v)
        lo_c, hi_c = interval(v, groups=g)
        assert lo_c < v.mean() < hi_c
        ratios.append((hi_c - lo_c) / (hi_f - lo_f))
        deffs.append(design_effect(v, g))
    # width scales with the square root of the variance ratio
    assert np.mean(ratios) == pytest.approx(np.sqrt(planted), rel=0.2)
    assert np.mean(deffs) == pytest.approx(planted, rel=0.3)
    # and the bootstrap's own width agrees with the analytic design effect, seed by seed
    assert np.allclose(np.square(ratios), deffs, rtol=0.35)
    assert unit_of(g) == {"unit": "person", "n_units": P}


def test_one_face_per_group_is_exactly_the_face_bootstrap():
    rng = np.random.default_rng(3)
    v = rng.random(300)
    assert interval(v, groups=[f"g{i}" for i in range(300)]) == interval(v)
    assert interval(v, groups=[""] * 300) == interval(v)  # no group: each face its own unit
    assert design_effect(v, [""] * 300) == 1.0
    assert unit_of([""] * 300) == {"unit": "face", "n_units": 300}


def test_design_effect_of_equal_groups_is_the_textbook_variance_of_group_means():
    """With k equal groups of m faces the mean is the mean of the k group means, and its variance under
    cluster sampling is var(group means, ddof=1) / k; over the face variance var(faces, ddof=1) / (k m) that is
    the design effect. Few groups (k = 4) so that the small-sample factor k / (k - 1) shows."""
    rng = np.random.default_rng(5)
    k, m = 4, 6
    v = np.repeat(rng.normal(0, 1, k), m) + rng.normal(0, 0.5, k * m)
    g = np.repeat([f"p{i}" for i in range(k)], m)
    means = v.reshape(k, m).mean(axis=1)
    want = (np.var(means, ddof=1) / k) / (np.var(v, ddof=1) / (k * m))
    assert design_effect(v, g) == pytest.approx(want, rel=1e-12)
    assert want > 3  # the groups differ: far from 1


def test_a_difference_on_three_people_is_resolved_for_faces_not_for_people():
    v, g = _correlated(1)
    b = v.copy()
    b[: 3 * K] = 1.0  # the second head differs only on the first 3 people's photos
    assert (b != v).sum() > 0
    face = paired_difference(b, v)
    person = paired_difference(b, v, groups=g)
    assert face["diff"] == person["diff"]
    assert face["p"] < 0.01
    assert person["p"] > 0.05
    assert person["ci95"][1] - person["ci95"][0] > 2 * (face["ci95"][1] - face["ci95"][0])


def test_bh_families_worked_example():
    heads = [0.012, 0.03, 0.5, 0.6, 0.7, 0.8]
    base = [1 / 2001] * 9
    alone = adjust_within(heads, ["heads"] * 6)
    assert alone[:2] == pytest.approx([0.072, 0.09])
    both = adjust_within(heads + base, ["heads"] * 6 + ["baselines"] * 9)
    assert both[:6] == pytest.approx(alone)
    # one family padded with the baselines loosens exactly these two tests
    padded = adjust_within(heads + base, ["all"] * 15)
    assert padded[:2] == pytest.approx([0.018, 0.0409], abs=1e-3)
    assert adjust_within([0.01, None], ["heads", None])[1] != adjust_within([0.01, None], ["heads", None])[1]  # NaN


def test_equivalence_worse_and_inconclusive():
    rng = np.random.default_rng(0)
    n = 2000
    a = (rng.random(n) < 0.8).astype(float)
    same = paired_difference(a.copy(), a, margin=0.01)
    assert verdict(same["diff"], same["p"], same["p_equivalence"], False) == "equivalent"
    worse = a.copy()
    worse[rng.choice(np.flatnonzero(a == 1), 100, replace=False)] = 0.0  # -5 points
    d = paired_difference(worse, a, margin=0.01)
    assert d["diff"] == pytest.approx(-0.05)
    assert verdict(d["diff"], d["p"], d["p_equivalence"], False) == "worse"
    assert verdict(-d["diff"], d["p"], d["p_equivalence"], False) == "better"
    # a 0.5-point gap on 200 faces: neither resolved nor shown within a 1-point margin
    m = 200
    x = (rng.random(m) < 0.8).astype(float)
    y = x.copy()
    y[np.flatnonzero(x == 1)[:1]] = 0.0
    d = paired_difference(y, x, margin=0.01)
    assert d["diff"] == pytest.approx(-0.005)
    assert verdict(d["diff"], d["p"], d["p_equivalence"], False) == "inconclusive"
    # MAE: lower is better, so a negative difference is "better"
    assert verdict(-0.5, 0.001, 0.9, True) == "better"


def test_a_resolved_difference_inside_the_margin_says_both(tmp_path, monkeypatch):
    """3,000 people x 3 photos, a head 0.5 points below the chosen one on the same faces: the paired test
    resolves it and the equivalence test shows it within the 1-point margin, so its verdict is "worse,
    within margin" (report.md mark `*≈`, its own marker in the chart's legend); where one test passes the
    verdicts stay "worse" (-5 points) and "equivalent" (a copy); neither: "inconclusive"."""
    from featlab.report.compare import compare
    from featlab.study.experiment import VERDICT_MARKS_TEXT, summary_table
    from featlab.scoring import plots

    rng = np.random.default_rng(7)
    people, photos = 3000, 3
    g = np.repeat([f"p{i}" for i in range(people)], photos)
    skill = rng.random(people)  # a person's faces are read alike
    best = (rng.random(people * photos) < 0.55 + 0.4 * np.repeat(skill, photos)).astype(float)
    right, wrong = np.flatnonzero(best == 1), np.flatnonzero(best == 0)
    small = best.copy()
    small[rng.choice(right, 60, replace=False)] = 0.0
    small[rng.choice(wrong, 14, replace=False)] = 1.0  # net -46 faces of 9,000: about -0.5 points
    far = best.copy()
    far[rng.choice(right, 450, replace=False)] = 0.0  # -5 points
    ids = [f"img{i:05d}" for i in range(len(best))]
    root = tmp_path / "results"
    for key, vals, val_acc in (("best", best, 0.9), ("small", small, 0.8), ("far", far, 0.7), ("copy", best, 0.6)):
        _head(root, key, pd.DataFrame({"image_id": ids, "split": "test", "group": g, "accuracy": vals}), val_acc)
    labels = {}
    save = plots._save

    def keep_labels(fig, path):
        labels[Path(path).name] = [t for ax in fig.axes for t in ax.get_legend_handles_labels()[1]]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep_labels)
    r = compare("m", "ds", "gender", results_root=root)
    rows = {row["tap"]: row for row in r["rows"] if row["reader"] == "head"}
    assert r["chosen"] == "best" and rows["small"]["unit"] == "person"
    s = rows["small"]
    assert s["diff_vs_best"] == pytest.approx(-46 / 9000)
    assert -0.01 < s["diff_ci95_low"] < s["diff_ci95_high"] < 0
    assert s["p_vs_best"] < 0.05 and s["p_equivalence"] < 0.05
    assert s["verdict"] == "worse, within margin"
    assert rows["far"]["verdict"] == "worse" and rows["copy"]["verdict"] == "equivalent"
    assert r["summary"]["verdicts"]["worse, within margin"] == ["small"]
    with open(r["csv"]) as f:
        assert {row["tap"]: row["verdict"] for row in csv.DictReader(f) if row["reader"] == "head"}["small"] == \
            "worse, within margin"
    # report.md: the summary row marks it `*≈`, the -5 points `*`, the copy `≈`; the legend says what `*≈` is
    line = summary_table({"gender": r})[2]
    cells = dict(zip(["target", "chosen", *[f"`{t}`" for t in r["taps"]]], [c.strip() for c in line.split("|")[1:]]))
    assert cells["`small`"].endswith("]*≈") and cells["`far`"].endswith("]*") and cells["`copy`"].endswith("]≈")
    assert "`*≈`: both" in VERDICT_MARKS_TEXT
    # the chart draws it with its own legend entry
    legend = labels["layer_comparison.png"]
    assert "head: resolved, and within margin (both tests)" in legend
    assert "head: resolved from chosen (BH p < 0.05)" in legend
    assert "head: equivalent to chosen (TOST within margin, BH p < 0.05)" in legend
    # the rule itself: only one test passing keeps the old verdicts; both, the new one
    assert verdict(-0.005, 0.001, 0.001, False) == "worse, within margin"
    assert verdict(-0.005, 0.001, 0.001, True) == "better, within margin"
    assert verdict(-0.005, 0.001, 0.2, False) == "worse"
    assert verdict(-0.005, 0.2, 0.001, False) == "equivalent"
    assert verdict(-0.005, 0.2, 0.2, False) == "inconclusive"


def _head(root, key, faces: pd.DataFrame, val_acc):
    import json

    d = root / "m" / "ds" / key / "gender"
    d.mkdir(parents=True)
    faces.to_csv(d / "faces.csv", index=False)
    t = faces[faces["split"] == "test"]
    (d / "metrics.json").write_text(json.dumps({
        "kind": "head", "feature_set": {"model_sha256": "0" * 64},
        "val": {"n": 10, "metrics": {"accuracy": val_acc}},
        "test": {"n": len(t), "metrics": {"accuracy": float(t["accuracy"].mean())}}, "config": {}}))
    return d


def test_compare_resamples_people_and_keeps_baselines_out_of_the_heads_family(tmp_path):
    from featlab.report.compare import compare

    v, g = _correlated(1)
    b = v.copy()
    b[: 3 * K] = 1.0
    ids = [f"img{i:04d}" for i in range(len(v))]
    root = tmp_path / "results"

    def faces(vals, with_groups=True):
        df = pd.DataFrame({"image_id": ids, "split": "test", "accuracy": vals})
        if with_groups:
            df.insert(2, "group", g)
        return df

    best = _head(root, "best", faces(b), 0.9)
    _head(root, "other", faces(v), 0.5)
    r = compare("m", "ds", "gender", results_root=root)
    rows = {row["tap"]: row for row in r["rows"] if row["reader"] == "head"}
    assert rows["best"]["unit"] == "person" and rows["best"]["n_units"] == P
    assert rows["other"]["p_vs_best"] > 0.05 and rows["other"]["verdict"] == "inconclusive"
    assert rows["other"]["design_effect"] > 1.5
    assert r["summary"]["unit"] == "person" and r["summary"]["families"]["heads"] == ["other"]
    p_heads_alone = rows["other"]["p_vs_best"]
    with open(tmp_path / "results" / "m" / "ds" / "compare" / "gender" / "layer_comparison.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert {row["unit"] for row in csv_rows} == {"person"}

    # the same faces without groups: a face-level test resolves the difference
    root2 = tmp_path / "faces"
    _head(root2, "best", faces(b, False), 0.9)
    _head(root2, "other", faces(v, False), 0.5)
    r2 = compare("m", "ds", "gender", results_root=root2)
    other = next(row for row in r2["rows"] if row["tap"] == "other")
    assert other["unit"] == "face" and other["p_vs_best"] < 0.01 and other["verdict"] == "worse"

    # baselines with tiny p-values beside the heads leave the heads' adjusted p unchanged
    rows_b = []
    for name in ("linear", "majority"):
        for split in ("val", "test"):
            for iid in ids:
                rows_b.append({"image_id": iid, "split": split, "baseline": name, "accuracy": 0.0})
    pd.DataFrame(rows_b).to_csv(best / "baselines_faces.csv", index=False)
    (best / "baselines.json").write_text("{}")
    r3 = compare("m", "ds", "gender", results_root=root)
    rows3 = {(row["tap"], row["reader"]): row for row in r3["rows"]}
    assert rows3[("other", "head")]["p_vs_best"] == pytest.approx(p_heads_alone)
    assert rows3[("", "majority")]["family"] == "baselines" and rows3[("", "majority")]["verdict"] == "worse"
    # the baselines take the heads' groups: their intervals resample people too
    assert rows3[("best", "linear")]["unit"] == "person"


@pytest.mark.parametrize("grouped", [True, False])
def test_intervals_and_paired_differences_are_scipys_bootstrap(grouped):
    """The count-matrix resampling and the closed-form jackknife give scipy.stats.bootstrap's own figures
    (its BCa interval, its percentile interval of the paired difference) on the same seeded draws."""
    import warnings

    from scipy.stats import bootstrap

    from featlab.scoring.uncertainty import _diff_ratio, _ratio, _sums, _codes, interval, paired_difference

    rng = np.random.default_rng(11)
    n = 900
    a = rng.gamma(2.0, 3.0, n)
    b = a + rng.normal(0.2, 1.0, n)
    g = np.array([f"p{i // 3}" if i % 7 else "" for i in range(n)]) if grouped else None
    if grouped:
        codes = _codes(g, n)
        one, stat1 = _sums(codes, a), _ratio
        two, stat2 = _sums(codes, a, b), _diff_ratio
    else:
        one, stat1 = (a,), (lambda x, axis=-1: np.mean(x, axis=axis))
        two, stat2 = (a, b), (lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bca = bootstrap(one, stat1, paired=True, n_resamples=2000, method="BCa", vectorized=True,
                        random_state=np.random.default_rng(0)).confidence_interval
    pct = bootstrap(two, stat2, paired=True, n_resamples=2000, method="percentile", vectorized=True,
                    random_state=np.random.default_rng(0))
    np.testing.assert_allclose(interval(a, groups=g), list(bca), rtol=0, atol=1e-12)
    d = paired_difference(a, b, groups=g, margin=0.15)
    np.testing.assert_allclose(d["ci95"], list(pct.confidence_interval), rtol=0, atol=1e-12)
    dist = pct.bootstrap_distribution
    assert d["p"] == max(2 * min((dist <= 0).mean(), (dist >= 0).mean()), 1 / 2001)


def scipy_group_interval(values, groups, seed: int = 0) -> list[float]:
    """The 95 % BCa interval of the mean of ``values`` by scipy.stats.bootstrap, resampling whole groups: the
    statistic is the drawn groups' value sums over their face counts, the groups in sorted order (featlab's)."""
    import warnings

    from scipy.stats import bootstrap

    per = pd.DataFrame({"v": np.asarray(values, dtype=np.float64), "g": np.asarray(groups, dtype=object)})
    agg = per.groupby("g", sort=True)["v"].agg(["sum", "count"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = bootstrap((agg["sum"].to_numpy(), agg["count"].to_numpy(dtype=np.float64)),
                       lambda s, n, axis=-1: s.sum(axis=axis) / n.sum(axis=axis), paired=True, vectorized=True,
                       n_resamples=2000, method="BCa", random_state=np.random.default_rng(seed)).confidence_interval
    return [float(ci.low), float(ci.high)]


@pytest.mark.parametrize("kind", ["seeds", "folds"])
def test_seed_and_fold_summaries_resample_people(kind, tmp_path):
    """workflow.summarise over two heads' records: the pooled (folds) or per-face mean (seeds) accuracy and its
    interval, which is scipy's BCa bootstrap over the people, far wider than the one over photos."""
    import json

    from featlab.study.workflow import summarise

    v1, g = _correlated(2)
    v2, _ = _correlated(3)
    ids = np.array([f"img{i:04d}" for i in range(len(v1))])
    half = np.arange(len(v1)) < len(v1) // 2  # folds: the first 20 people are fold 0's test faces, the rest fold 1's
    members = [(v1, np.ones_like(half)), (v2, np.ones_like(half))] if kind == "seeds" else [(v1, half), (v1, ~half)]
    dirs = []
    for i, (v, rows) in enumerate(members):
        d = tmp_path / f"{kind[:-1]}{i}"
        d.mkdir()
        pd.DataFrame({"image_id": ids[rows], "split": "test", "group": g[rows], "accuracy": v[rows]}).to_csv(
            d / "faces.csv", index=False)
        (d / "metrics.json").write_text(json.dumps({
            "target": "gender", "target_name": "gender", "tap": "t", "head_key": "t", "backbone": "b",
            "dataset": "d", "config": {}, kind[:-1]: i, "test": {"metrics": {"accuracy": float(v[rows].mean())}}}))
        dirs.append(d)
    summarise(dirs, kind, tmp_path)
    s = json.loads((tmp_path / "metrics.json").read_text())["test"]
    faces = (v1 + v2) / 2 if kind == "seeds" else v1
    assert s["n"] == len(faces) and s["metrics"]["accuracy"] == pytest.approx(faces.mean(), abs=1e-12)
    want = scipy_group_interval(faces, g)
    np.testing.assert_allclose(s["metrics"]["accuracy_ci95"], want, rtol=0, atol=1e-12)
    lo, hi = interval(faces)  # over photos
    assert want[1] - want[0] > 1.25 * (hi - lo)
    assert s["uncertainty"]["unit"] == "person" and s["uncertainty"]["n_units"] == P
