"""Uncertainty of every figure: bootstrap intervals over the independent unit, paired differences,
equivalence tests, multiple testing.

The resamples are :func:`scipy.stats.bootstrap`'s (the same seeded draws of units), but the statistics are
computed from a matrix of resample counts (:func:`_draw_counts`, a product per statistic; the draw is kept
for the next call on as many units with the same seed) and BCa's jackknife in closed form (:func:`_bca`):
scipy gathers every resample (three 0.4 GB arrays per call for 27,000 people) and builds an O(n^2)
jackknife, which made ``compare`` on 40,000 faces take minutes. The figures agree with scipy's to rounding
(tests/test_uncertainty.py).

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
- :func:`verdict`: ``worse`` / ``better`` (resolved), ``worse, within margin`` / ``better, within margin``
  (resolved, and TOST shows it within the margin too: a real but small difference), ``equivalent`` (TOST
  within the margin, not resolved) or ``inconclusive``: "not significant" is never read as "equal".
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
WITHIN = ", within margin"  # added to worse/better when the equivalence test passes too
VERDICTS = ("chosen", "worse", "better", "worse" + WITHIN, "better" + WITHIN, "equivalent", "inconclusive")


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
    if codes is not None:
        _, codes = np.unique(codes[ok], return_inverse=True)
        if int(codes.max()) + 1 < 2:
            return [float(v.mean())] * 2
        data, stat = _sums(codes, v), _ratio
        s, n = data
        jack = (s.sum() - s) / (n.sum() - n)  # the ratio without each group
    else:
        data, stat = (v,), (lambda x, axis=-1: np.mean(x, axis=axis))
        jack = (v.sum() - v) / (len(v) - 1)  # the mean without each face
    sums = _resampled_sums(data, seed, n_resamples)
    theta_b = sums[0] / sums[1] if codes is not None else sums[0] / len(v)
    ci = _bca(theta_b, float(stat(*data)), jack)
    if ci is None:
        ci = _percentile(theta_b)
    lo, hi = ci
    if math.isfinite(lo) and math.isfinite(hi):
        return [float(lo), float(hi)]
    return None


_DRAWS: dict = {}  # (units, seed, resamples) -> resample counts of the last draw (compare reuses it)


def _draw_counts(k: int, seed: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, k) float32: how many times each unit is drawn in each resample. The draws are
    ``scipy.stats.bootstrap``'s own for a paired sample of ``k`` units and this seed (one
    ``rng.integers(0, k, (n_resamples, k))``), so every figure is the one scipy gives, to rounding. The
    last draw is kept: compare's paired differences against one head all resample the same people."""
    key = (int(k), int(seed), int(n_resamples))
    if key not in _DRAWS:
        _DRAWS.clear()
        idx = _rng(seed).integers(0, k, (n_resamples, k), dtype=np.int64)
        w = np.empty((n_resamples, k), dtype=np.float32)
        step = max(1, (1 << 24) // max(1, k))
        for r in range(0, n_resamples, step):  # a row's counts: one bincount over offset indices
            block = idx[r: r + step]
            off = block + (np.arange(len(block), dtype=np.int64) * k)[:, None]
            w[r: r + step] = np.bincount(off.ravel(), minlength=len(block) * k).reshape(len(block), k)
        del idx
        _DRAWS[key] = w
    return _DRAWS[key]


def _resampled_sums(data, seed: int, n_resamples: int) -> list[np.ndarray]:
    """The sums of each array of ``data`` (one value per unit) over each bootstrap resample of the units:
    the resample counts times the values, in blocks of resamples (float64)."""
    x = np.stack([np.asarray(d, dtype=np.float64) for d in data], axis=1)  # (units, arrays)
    w = _draw_counts(len(x), seed, n_resamples)
    out = np.empty((n_resamples, x.shape[1]))
    step = max(1, (1 << 22) // max(1, len(x)))
    for r in range(0, n_resamples, step):
        out[r: r + step] = w[r: r + step].astype(np.float64) @ x
    return [out[:, j] for j in range(x.shape[1])]


def _percentile(theta_b: np.ndarray, level: float = LEVEL) -> list[float]:
    """The percentile interval, as ``scipy.stats.bootstrap(method="percentile")`` takes it."""
    from scipy.stats import quantile

    a = (1 - level) / 2
    lo, hi = quantile(theta_b, np.asarray([a, 1 - a]))
    return [float(lo), float(hi)]


def _bca(theta_b: np.ndarray, theta: float, jack: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """scipy's BCa interval (``scipy.stats.bootstrap(method="BCa")``, Efron & Tibshirani 14.3, 15.4) from the
    bootstrap distribution ``theta_b`` (the same draws as scipy's, made by ``bootstrap`` itself) and the
    jackknife values ``jack`` of the statistic, given in closed form for a mean or a ratio of group sums:
    scipy builds its jackknife as an (n, n - 1) array of resamples, O(n^2) in time and memory (5.8 GB
    per array for 27,000 people). Same formulas as scipy 1.17's ``_bca_interval``; the figures agree to
    rounding (tests/test_uncertainty.py). None when BCa is undefined (the caller takes the percentile)."""
    from scipy.special import ndtr, ndtri
    from scipy.stats import quantile

    b = len(theta_b)
    z0 = ndtri((np.count_nonzero(theta_b < theta) + np.count_nonzero(theta_b <= theta)) / (2 * b))
    n = float(len(jack))
    u = (n - 1) * (jack.mean() - jack)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = 1 / 6 * (np.sum(u ** 3) / n ** 3) / (np.sum(u ** 2) / n ** 2) ** 1.5
        z = float(ndtri((1 - level) / 2))
        a1 = ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))
        a2 = ndtr(z0 + (z0 - z) / (1 - a * (z0 - z)))
    if not (np.isfinite(a1) and np.isfinite(a2)):
        return None
    lo, hi = quantile(theta_b, np.asarray([a1, a2]))
    return [float(lo), float(hi)] if np.isfinite(lo) and np.isfinite(hi) else None


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
    if codes is not None:
        sa, sb, n = _resampled_sums(_sums(codes, a, b), seed, n_resamples)
        dist = (sa - sb) / n
    else:
        sa, sb = _resampled_sums((a, b), seed, n_resamples)
        dist = sa / len(a) - sb / len(b)
    tail = min(float((dist <= 0).mean()), float((dist >= 0).mean()))
    p = min(1.0, max(2.0 * tail, floor))
    lo, hi = _percentile(dist)
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
    """A row against the chosen one from both of its tests: ``worse``/``better`` when the paired test
    resolves the difference, with ``, within margin`` added when the equivalence test also shows it lies
    within the margin (resolved and small: both are true); ``equivalent`` when only the equivalence test
    passes; else ``inconclusive``."""
    equivalent = p_equiv_adj is not None and np.isfinite(p_equiv_adj) and p_equiv_adj < alpha
    if p_adj is not None and np.isfinite(p_adj) and p_adj < alpha and diff:
        return ("better" if (diff < 0) == lower_is_better else "worse") + (WITHIN if equivalent else "")
    return "equivalent" if equivalent else "inconclusive"
