"""Evaluation figures for age bins, age regression and gender (numpy only).

Every function takes plain arrays and returns plain Python/numpy values, so
that reports can be written as JSON/CSV without further conversion. Classes
are integer indices ``0..n-1``; a row's true class ``-1`` (unknown) must be
dropped by the caller.

- classification: :func:`confusion_matrix`, :func:`normalise_rows`,
  :func:`accuracy`, :func:`one_off_accuracy`, :func:`precision_recall`,
  :func:`classification_report`
- regression: :func:`mae`, :func:`rmse`, :func:`cs_at`, :func:`mae_per_bin`,
  :func:`regression_report`
- subgroups: :func:`subgroup_table` (a main metric broken down by gender,
  age bin, gender x age bin and race, with counts)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def _f(x) -> float | None:
    """A JSON-safe float: NaN/inf -> None."""
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------ classification
def confusion_matrix(y_true, y_pred, n: int | None = None) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class (int64, n x n)."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"{len(t)} true labels for {len(p)} predictions")
    if n is None:
        n = int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if len(t) and (t.min() < 0 or p.min() < 0 or t.max() >= n or p.max() >= n):
        raise ValueError(f"class index outside 0..{n - 1}")
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def normalise_rows(cm) -> np.ndarray:
    """Each row divided by its total (share of each true class predicted as each class); empty rows are NaN."""
    cm = np.asarray(cm, dtype=np.float64)
    tot = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, cm / np.where(tot > 0, tot, 1), np.nan)


def accuracy(y_true, y_pred) -> float:
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    return float(np.mean(t == p)) if len(t) else float("nan")


def one_off_accuracy(y_true, y_pred) -> float:
    """Share of predictions in the true bin or an adjacent one (|true - pred| <= 1)."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    return float(np.mean(np.abs(t - p) <= 1)) if len(t) else float("nan")


def accuracy_from_cm(cm) -> float:
    cm = np.asarray(cm)
    tot = cm.sum()
    return float(np.trace(cm) / tot) if tot else float("nan")


def one_off_from_cm(cm) -> float:
    cm = np.asarray(cm)
    tot = cm.sum()
    if not tot:
        return float("nan")
    i, j = np.indices(cm.shape)
    return float(cm[np.abs(i - j) <= 1].sum() / tot)


def precision_recall(cm) -> tuple[np.ndarray, np.ndarray]:
    """Per-class precision (column-wise) and recall (row-wise); NaN where a class is never predicted / present."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(cm.sum(axis=0) > 0, tp / cm.sum(axis=0), np.nan)
        rec = np.where(cm.sum(axis=1) > 0, tp / cm.sum(axis=1), np.nan)
    return prec, rec


def classification_report(y_true, y_pred, names: Sequence[str], ordinal: bool = True) -> dict:
    """Accuracy, (1-off for ordered classes), balanced accuracy, per-class precision/recall/F1 with support,
    and the confusion matrix (counts and normalised per true class)."""
    n = len(names)
    cm = confusion_matrix(y_true, y_pred, n)
    prec, rec = precision_recall(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * prec * rec / (prec + rec)
    per_class = [
        {"class": str(names[i]), "support": int(cm[i].sum()), "predicted": int(cm[:, i].sum()),
         "precision": _f(prec[i]), "recall": _f(rec[i]), "f1": _f(f1[i])}
        for i in range(n)
    ]
    present = cm.sum(axis=1) > 0
    out = {
        "n": int(cm.sum()),
        "accuracy": _f(accuracy_from_cm(cm)),
    }
    if ordinal:
        out["one_off"] = _f(one_off_from_cm(cm))
    out["balanced_accuracy"] = _f(np.nanmean(rec[present])) if present.any() else None
    out["macro_f1"] = _f(np.nanmean(np.where(present, np.nan_to_num(f1), np.nan))) if present.any() else None
    out["per_class"] = per_class
    out["confusion"] = cm.tolist()
    out["confusion_normalised"] = [[_f(v) for v in row] for row in normalise_rows(cm)]
    out["names"] = [str(x) for x in names]
    return out


# ------------------------------------------------------------------ regression
def mae(y_true, y_pred) -> float:
    e = np.asarray(y_pred, dtype=np.float64).ravel() - np.asarray(y_true, dtype=np.float64).ravel()
    return float(np.mean(np.abs(e))) if len(e) else float("nan")


def rmse(y_true, y_pred) -> float:
    e = np.asarray(y_pred, dtype=np.float64).ravel() - np.asarray(y_true, dtype=np.float64).ravel()
    return float(np.sqrt(np.mean(e * e))) if len(e) else float("nan")


def cs_at(y_true, y_pred, k: float = 5.0) -> float:
    """Cumulative score: share of predictions with |error| <= k years."""
    e = np.abs(np.asarray(y_pred, dtype=np.float64).ravel() - np.asarray(y_true, dtype=np.float64).ravel())
    return float(np.mean(e <= k)) if len(e) else float("nan")


def mae_per_bin(y_true, y_pred, scheme) -> list[dict]:
    """MAE within each age bin of ``scheme`` (a :class:`featlab.data.bins.BinScheme`), by true age, with counts."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    b = scheme.assign(t)
    rows = []
    for i, name in enumerate(scheme.names):
        m = b == i
        rows.append({"bin": name, "n": int(m.sum()), "mae": _f(mae(t[m], p[m])) if m.any() else None,
                     "bias": _f(np.mean(p[m] - t[m])) if m.any() else None})
    return rows


def regression_report(y_true, y_pred, schemes: Sequence = ()) -> dict:
    """MAE, RMSE, CS@5 (and CS@10), mean bias; for each bin scheme, the MAE per bin and the
    regression binned into that scheme's groups reported as a classification."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    out = {
        "n": int(len(t)),
        "mae": _f(mae(t, p)),
        "rmse": _f(rmse(t, p)),
        "cs5": _f(cs_at(t, p, 5)),
        "cs10": _f(cs_at(t, p, 10)),
        "bias": _f(np.mean(p - t)) if len(t) else None,
    }
    if len(t) > 1 and np.std(t) > 0 and np.std(p) > 0:
        out["pearson_r"] = _f(np.corrcoef(t, p)[0, 1])
    binned = {}
    for sc in schemes:
        rep = classification_report(sc.assign(t), sc.assign(np.clip(p, 0, None)), sc.names)
        rep["mae_per_bin"] = mae_per_bin(t, p, sc)
        binned[f"bins{sc.n}"] = rep
    if binned:
        out["binned"] = binned
    return out


# ------------------------------------------------------------------ subgroups
def subgroup_table(groups: dict[str, np.ndarray], metric: Callable[[np.ndarray], float], metric_name: str,
                   crosses: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """The main metric per subgroup, with counts.

    ``groups`` maps a grouping name (``gender``, ``age_bin``, ``race``) to one
    label per row ('' = unknown, left out). ``metric(mask)`` computes the
    figure on the rows selected by a boolean mask. ``crosses`` lists pairs of
    grouping names to break down jointly (e.g. ``("gender", "age_bin")``).
    Rows: ``{"grouping", "group", "n", metric_name}``, the overall figure first.
    """
    n = len(next(iter(groups.values()))) if groups else 0
    rows = [{"grouping": "all", "group": "all", "n": n, metric_name: _f(metric(np.ones(n, dtype=bool))) if n else None}]

    def levels(v):
        return [x for x in dict.fromkeys(v.tolist()) if x != ""]

    for g, v in groups.items():
        v = np.asarray(v, dtype=object)
        for level in _sorted_levels(levels(v)):
            m = v == level
            rows.append({"grouping": g, "group": str(level), "n": int(m.sum()), metric_name: _f(metric(m))})
    for a, b in crosses:
        va, vb = np.asarray(groups[a], dtype=object), np.asarray(groups[b], dtype=object)
        for la in _sorted_levels(levels(va)):
            for lb in _sorted_levels(levels(vb)):
                m = (va == la) & (vb == lb)
                if m.any():
                    rows.append({"grouping": f"{a} x {b}", "group": f"{la} | {lb}", "n": int(m.sum()),
                                 metric_name: _f(metric(m))})
    return rows


def _sorted_levels(levels: list) -> list:
    """Age-bin names in age order ('4-6' before '15-20', '60+' last); others alphabetically."""
    def key(x):
        s = str(x)
        head = s.split("-")[0].rstrip("+")
        try:
            return (0, float(head), s)
        except ValueError:
            return (1, 0.0, s)

    return sorted(levels, key=key)


# ------------------------------------------------------------------ aggregation
def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def mean_std(dicts: Sequence[dict]) -> tuple[dict, dict]:
    """Mean and sample std (ddof=1) of every numeric leaf across ``dicts`` (e.g. the metrics of 5 folds);
    the std of a single known value is ``None`` (undefined).

    Nested dicts recurse; lists of equal length are matched position by position;
    ``None`` counts as missing (a class absent from one fold); strings are left out.
    """
    def walk(items):
        known = [x for x in items if x is not None]
        if not known:
            return None, None
        first = known[0]
        if _is_num(first):
            if not all(_is_num(x) for x in known):
                return None, None
            arr = np.asarray(known, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            return (_f(arr.mean()), _f(arr.std(ddof=1)) if len(arr) > 1 else None) if len(arr) else (None, None)
        if isinstance(first, dict):
            m, s = {}, {}
            for k in first:
                mv, sv = walk([d.get(k) if isinstance(d, dict) else None for d in items])
                if mv is not None:
                    m[k], s[k] = mv, sv
            return (m, s) if m else (None, None)
        if isinstance(first, list) and all(isinstance(x, list) and len(x) == len(first) for x in known):
            pairs = [walk([x[i] for x in known]) for i in range(len(first))]
            if all(p[0] is None for p in pairs):
                return None, None
            return [p[0] for p in pairs], [p[1] for p in pairs]
        return None, None

    if not dicts:
        return {}, {}
    m, s = walk(list(dicts))
    return m or {}, s or {}
