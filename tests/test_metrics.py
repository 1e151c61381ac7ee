"""featlab.scoring.metrics against hand-computed values on tiny examples (numpy only, no TensorFlow)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from featlab.scoring import metrics as M
from featlab.data.bins import get_scheme


# true:  0 0 0 1 1 2 2 2 2 3
# pred:  0 1 2 1 1 2 3 1 2 0
T = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
P = np.array([0, 1, 2, 1, 1, 2, 3, 1, 2, 0])


def test_confusion_counts_and_normalised():
    cm = M.confusion_matrix(T, P, 4)
    expect = np.array([
        [1, 1, 1, 0],
        [0, 2, 0, 0],
        [0, 1, 2, 1],
        [1, 0, 0, 0],
    ])
    assert cm.tolist() == expect.tolist()
    norm = M.normalise_rows(cm)
    assert norm[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert norm[2].tolist() == pytest.approx([0, 0.25, 0.5, 0.25])
    assert np.allclose(norm.sum(axis=1), 1)


def test_empty_class_row_is_nan_not_zero():
    cm = M.confusion_matrix([0, 0, 2], [0, 1, 2], 3)
    norm = M.normalise_rows(cm)
    assert np.isnan(norm[1]).all()
    _, rec = M.precision_recall(cm)
    assert np.isnan(rec[1])


def test_accuracy_one_off_recall_precision():
    assert M.accuracy(T, P) == pytest.approx(5 / 10)
    # |t-p| <= 1: 0-0 y, 0-1 y, 0-2 n, 1-1 y, 1-1 y, 2-2 y, 2-3 y, 2-1 y, 2-2 y, 3-0 n
    assert M.one_off_accuracy(T, P) == pytest.approx(8 / 10)
    cm = M.confusion_matrix(T, P, 4)
    assert M.accuracy_from_cm(cm) == pytest.approx(0.5)
    assert M.one_off_from_cm(cm) == pytest.approx(0.8)
    prec, rec = M.precision_recall(cm)
    assert rec.tolist() == pytest.approx([1 / 3, 1.0, 0.5, 0.0])
    # predicted columns: 0 -> {0, 3}, 1 -> {0, 1, 1, 2}, 2 -> {0, 2, 2}, 3 -> {2}
    assert prec.tolist() == pytest.approx([0.5, 0.5, 2 / 3, 0.0])


def test_classification_report():
    rep = M.classification_report(T, P, ["a", "b", "c", "d"])
    assert rep["n"] == 10
    assert rep["accuracy"] == pytest.approx(0.5)
    assert rep["one_off"] == pytest.approx(0.8)
    assert rep["balanced_accuracy"] == pytest.approx((1 / 3 + 1 + 0.5 + 0) / 4)
    per = {c["class"]: c for c in rep["per_class"]}
    assert per["b"]["recall"] == pytest.approx(1.0) and per["b"]["support"] == 2 and per["b"]["predicted"] == 4
    assert per["d"]["f1"] is None or per["d"]["f1"] == 0  # precision 0, recall 0: undefined F1
    assert rep["confusion"][2] == [0, 1, 2, 1]
    g = M.classification_report([0, 0, 1, 1], [0, 1, 1, 1], ["f", "m"], ordinal=False)
    assert "one_off" not in g
    assert g["accuracy"] == pytest.approx(0.75)
    assert [c["recall"] for c in g["per_class"]] == pytest.approx([0.5, 1.0])


def test_regression_figures():
    t = np.array([10, 20, 30, 40, 50], dtype=float)
    p = np.array([12, 20, 24, 45, 49], dtype=float)
    # errors: 2, 0, -6, 5, -1
    assert M.mae(t, p) == pytest.approx(14 / 5)
    assert M.rmse(t, p) == pytest.approx(np.sqrt((4 + 0 + 36 + 25 + 1) / 5))
    assert M.cs_at(t, p, 5) == pytest.approx(4 / 5)  # |5| counts (<= 5)
    assert M.cs_at(t, p, 1) == pytest.approx(2 / 5)
    rep = M.regression_report(t, p, [get_scheme(5)])
    assert rep["mae"] == pytest.approx(2.8) and rep["cs5"] == pytest.approx(0.8)
    assert rep["bias"] == pytest.approx(0.0)
    b5 = rep["binned"]["bins5"]
    # 5-group bins: 0-17, 18-29, 30-44, 45-59, 60+; truth 10,20,30,40,50 -> 0,1,2,2,3; pred 12,20,24,45,49 -> 0,1,1,3,3
    assert b5["accuracy"] == pytest.approx(3 / 5)
    assert b5["one_off"] == pytest.approx(1.0)
    per = {r["bin"]: r for r in b5["mae_per_bin"]}
    assert per["30-44"]["n"] == 2 and per["30-44"]["mae"] == pytest.approx(5.5)
    assert per["60+"]["n"] == 0 and per["60+"]["mae"] is None


def test_mae_per_bin_uses_true_age():
    sc = get_scheme(8)
    rows = M.mae_per_bin([1, 2, 70], [5, 2, 60], sc)
    d = {r["bin"]: r for r in rows}
    assert d["0-2"]["n"] == 2 and d["0-2"]["mae"] == pytest.approx(2.0) and d["0-2"]["bias"] == pytest.approx(2.0)
    assert d["60+"]["mae"] == pytest.approx(10.0)


def test_subgroup_table_counts_and_values():
    correct = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    groups = {"gender": np.array(["f", "f", "m", "m", "m", ""], dtype=object),
              "age_bin": np.array(["0-12", "13-19", "0-12", "13-19", "13-19", "0-12"], dtype=object)}
    rows = M.subgroup_table(groups, lambda m: correct[m].mean(), "accuracy", crosses=[("gender", "age_bin")])
    d = {(r["grouping"], r["group"]): r for r in rows}
    assert d[("all", "all")]["n"] == 6 and d[("all", "all")]["accuracy"] == pytest.approx(4 / 6)
    assert d[("gender", "f")]["n"] == 2 and d[("gender", "f")]["accuracy"] == pytest.approx(0.5)
    assert d[("gender", "m")]["accuracy"] == pytest.approx(2 / 3)
    assert ("gender", "") not in d  # unknown left out
    assert d[("gender x age_bin", "m | 13-19")]["n"] == 2
    assert d[("gender x age_bin", "m | 13-19")]["accuracy"] == pytest.approx(0.5)
    order = [r["group"] for r in rows if r["grouping"] == "age_bin"]
    assert order == ["0-12", "13-19"]


def test_mean_std_over_folds():
    m, s = M.mean_std([{"accuracy": 0.5, "n": 10, "name": "x", "r": None}, {"accuracy": 0.7, "n": 20, "r": 0.2}])
    # the sample std (ddof=1) of 0.5 and 0.7: sqrt(0.02 / 1) = 0.1414, not the population 0.1
    assert m["accuracy"] == pytest.approx(0.6) and s["accuracy"] == pytest.approx(np.sqrt(0.02))
    assert m["n"] == pytest.approx(15) and s["n"] == pytest.approx(np.std([10, 20], ddof=1))
    assert "name" not in m
    assert m["r"] == pytest.approx(0.2) and s["r"] is None  # one known value: no spread


def test_metrics_module_is_numpy_only():
    import subprocess

    code = ("import sys, featlab.scoring.metrics, featlab.scoring.plots, featlab.report.compare, featlab.report.evaluate, featlab.study.workflow, featlab.heads.train; "
            "bad = [m for m in ('tensorflow', 'keras', 'matplotlib', 'torch') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
