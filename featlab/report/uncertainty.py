"""Uncertainty of every figure: bootstrap intervals over the independent unit, paired differences,
equivalence tests, multiple testing.

All resampling is scipy's (:func:`scipy.stats.bootstrap`); nothing here loops over resamples by hand.

**The unit that is resampled.** Photos of one person are correlated, so a figure's interval resamples
*people*: with ``groups`` (an identity or face group per face; faces without one are their own group)
the bootstrap draws whole groups (a cluster bootstrap) and the figure is the ratio of the drawn
groups' sums to their face counts, i.e. the mean over the drawn faces. When every group holds one face
this is exactly the face bootstrap. :func:`unit_of` says which unit a set of groups gives (``person`` or
``face``), :func:`design_effect` how much wider the cluster variance is than the face variance (Kish's
design effect, from the linearised variance of a ratio mean).

- :func:`interval`: a seeded 95 % BCa interval of the mean of per-face values (accuracy = mean of 0/1,
  MAE = mean of absolute errors, ...).
- :func:`paired_difference`: the difference of two heads' figures on the same faces, with a paired
  bootstrap interval, a two-sided bootstrap p-value and, given a ``margin``, the p-value of a two
  one-sided test (TOST) that the difference lies within ``(-margin, +margin)``.
- :func:`adjust`: Benjamini-Hochberg adjusted p-values (:func:`scipy.stats.false_discovery_control`).
- :func:`verdict`: ``worse`` / ``better`` (resolved), ``equivalent`` (TOST within the margin) or
  ``inconclusive``: "not significant" is never read as "equal".
"""

from __future__ import annotations

import math
import warnings

import numpy as np

N_RESAMPLES = 2000
LEVEL = 0.95
ALPHA = 0.05
# Equivalence margins (two one-sided tests): a difference within these is "equivalent" when shown so.
MARGINS = {"accuracy": 0.01, "one_off": 0.01, "cs5": 0.01, "mae": 0.15}
VERDICTS = ("chosen", "worse", "better", "equivalent", "inconclusive")


def _rng(seed: int):
    return np.random.default_rng(seed)


def _ratio(s, n, axis=-1):
    return np.sum(s, axis=axis) / np.sum(n, axis=axis)


def _diff_ratio(sa, sb, n, axis=-1):
    return (np.sum(sa, axis=axis) - np.sum(sb, axis=axis)) / np.sum(n, axis=axis)


def _codes(groups, n: int) -> np.ndarray | None:
    """Integer group codes (a face without a group is its own group); None when every group is one face."""
    if groups is None:
        return None
    g = np.asarray(groups, dtype=object).ravel()
    if len(g) != n:
        raise ValueError(f"groups need one entry per face: {len(g)} vs {n}")
    labels = np.array([f"\0face{i}" if (x is None or (isinstance(x, float) and math.isnan(x)) or str(x) == "")
                       else str(x) for i, x in enumerate(g)], dtype=object)
    _, codes = np.unique(labels, return_inverse=True)
    return None if codes.max(initial=-1) + 1 == n else codes


def _sums(codes: np.ndarray, *values) -> tuple[np.ndarray, ...]:
    k = int(codes.max()) + 1
    n = np.bincount(codes, minlength=k).astype(np.float64)
    return (*[np.bincount(codes, weights=v, minlength=k) for v in values], n)


def unit_of(groups) -> dict:
    """``{'unit': 'person' | 'face', 'n_units': int}`` for these faces' groups."""
    g = [] if groups is None else list(groups)
    codes = _codes(g, len(g)) if len(g) else None
    if codes is None:
        return {"unit": "face", "n_units": len(g)}
    return {"unit": "person", "n_units": int(codes.max()) + 1}


def design_effect(values, groups) -> float | None:
    """Variance of the mean under cluster sampling over its variance under face sampling (1 without
    groups); the linearised (Taylor) variance of a ratio mean, the quantity the cluster bootstrap
    estimates."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = np.isfinite(v)
    codes = _codes(groups, len(v)) if groups is not None else None
    if codes is None:
        return 1.0 if ok.sum() > 1 else None
    v, codes = v[ok], codes[ok]
    _, codes = np.unique(codes, return_inverse=True)
    n, k = len(v), int(codes.max(initial=-1)) + 1
    var_face = np.var(v, ddof=1) / n if n > 1 else 0.0
    if k < 2 or var_face <= 0:
        return None
    s, m = _sums(codes, v)
    resid = s - m * v.mean()
    var_cluster = k / (k - 1) * np.sum(resid ** 2) / n ** 2
    return float(var_cluster / var_face)


def interval(values, seed: int = 0, n_resamples: int = N_RESAMPLES, groups=None) -> list[float] | None:
    """[low, high] of the mean of ``values`` (95 %, BCa; percentile when BCa is undefined), resampling
    whole ``groups`` when given (see the module doc)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    codes = _codes(groups, len(v)) if groups is not None else None
    ok = np.isfinite(v)
    v = v[ok]
    if len(v) == 0:
        return None
    if len(v) == 1 or np.ptp(v) == 0:
        return [float(v[0] if len(v) == 1 else v.mean())] * 2
    from scipy.stats import bootstrap

    if codes is not None:
        _, codes = np.unique(codes[ok], return_inverse=True)
        if int(codes.max()) + 1 < 2:
            return [float(v.mean())] * 2
        data, stat = _sums(codes, v), _ratio
    else:
        data, stat = (v,), (lambda x, axis=-1: np.mean(x, axis=axis))
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bootstrap(data, stat, paired=True, n_resamples=n_resamples, confidence_level=LEVEL, method=method,
                            vectorized=True, random_state=_rng(seed))
        lo, hi = res.confidence_interval
        if math.isfinite(lo) and math.isfinite(hi):
            return [float(lo), float(hi)]
    return None


def paired_difference(a, b, seed: int = 0, n_resamples: int = N_RESAMPLES, groups=None,
                      margin: float | None = None) -> dict:
    """mean(a) - mean(b) over the same faces: ``diff``, ``ci95`` (paired bootstrap, percentile, whole
    ``groups`` resampled when given) and ``p`` (two-sided: twice the smaller share of bootstrap
    differences on either side of 0, at least 1 / (n_resamples + 1)). Identical inputs give diff 0 and
    p 1. With ``margin``: ``p_equivalence``, the larger of the two one-sided bootstrap p-values that the
    difference is above ``-margin`` and below ``+margin`` (TOST; small = equivalent within the margin)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same faces: {len(a)} vs {len(b)}")
    codes = _codes(groups, len(a)) if groups is not None else None
    d = a - b
    diff = float(d.mean()) if len(d) else float("nan")
    floor = 1.0 / (n_resamples + 1)
    if len(d) < 2 or np.ptp(d) == 0:
        out = {"diff": diff, "ci95": [diff, diff], "p": 1.0 if not diff else 0.0}
        if margin is not None:
            out["p_equivalence"] = floor if abs(diff) < margin else 1.0
        return out
    from scipy.stats import bootstrap

    if codes is not None:
        sa, sb, n = _sums(codes, a, b)
        data, stat = (sa, sb, n), _diff_ratio
    else:
        data, stat = (a, b), (lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis))
    res = bootstrap(data, stat, paired=True, n_resamples=n_resamples, confidence_level=LEVEL,
                    method="percentile", vectorized=True, random_state=_rng(seed))
    dist = np.asarray(res.bootstrap_distribution)
    tail = min(float((dist <= 0).mean()), float((dist >= 0).mean()))
    p = min(1.0, max(2.0 * tail, floor))
    lo, hi = res.confidence_interval
    out = {"diff": diff, "ci95": [float(lo), float(hi)], "p": p}
    if margin is not None:
        m = float(margin)
        p_low = float((dist <= -m).mean())   # H0: diff <= -margin
        p_high = float((dist >= m).mean())   # H0: diff >= +margin
        out["p_equivalence"] = min(1.0, max(p_low, p_high, floor))
    return out


def adjust(pvalues) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.isfinite(p)
    if ok.any():
        from scipy.stats import false_discovery_control

        out[ok] = false_discovery_control(p[ok], method="bh")
    return [float(x) for x in out]


def adjust_within(pvalues, families) -> list[float]:
    """Benjamini-Hochberg within each family (``families[i]`` names row i's family; None: no test)."""
    p = np.asarray([np.nan if x is None else x for x in pvalues], dtype=np.float64)
    out = np.full(len(p), np.nan)
    fam = np.asarray([("" if f is None else str(f)) for f in families], dtype=object)
    for f in dict.fromkeys(fam):
        if not f:
            continue
        idx = np.flatnonzero(fam == f)
        out[idx] = adjust(p[idx])
    return [float(x) for x in out]


def verdict(diff: float | None, p_adj: float | None, p_equiv_adj: float | None, lower_is_better: bool,
            alpha: float = ALPHA) -> str:
    """A row against the chosen one: ``worse``/``better`` when the paired test resolves the difference,
    ``equivalent`` when the equivalence test shows it lies within the margin, else ``inconclusive``."""
    if p_adj is not None and np.isfinite(p_adj) and p_adj < alpha and diff:
        return "better" if (diff < 0) == lower_is_better else "worse"
    if p_equiv_adj is not None and np.isfinite(p_equiv_adj) and p_equiv_adj < alpha:
        return "equivalent"
    return "inconclusive"
