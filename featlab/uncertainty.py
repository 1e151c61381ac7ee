"""Uncertainty of every figure: bootstrap intervals over faces, paired differences, multiple testing.

All resampling is scipy's (:func:`scipy.stats.bootstrap`); nothing here loops over resamples by hand.

- :func:`interval`: a seeded 95 % BCa interval of the mean of per-face values (accuracy = mean of 0/1,
  MAE = mean of absolute errors, ...).
- :func:`paired_difference`: the difference of two heads' figures on the same faces, with a paired
  bootstrap interval and a two-sided bootstrap p-value.
- :func:`adjust`: Benjamini-Hochberg adjusted p-values (:func:`scipy.stats.false_discovery_control`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

N_RESAMPLES = 2000
LEVEL = 0.95


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _rng(seed: int):
    return np.random.default_rng(seed)


def interval(values, seed: int = 0, n_resamples: int = N_RESAMPLES) -> list[float] | None:
    """[low, high] of the mean of ``values`` (95 %, BCa; percentile when BCa is undefined)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    if len(v) == 1 or np.ptp(v) == 0:
        return [float(v[0] if len(v) == 1 else v.mean())] * 2
    from scipy.stats import bootstrap

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bootstrap((v,), _mean, n_resamples=n_resamples, confidence_level=LEVEL, method=method,
                            vectorized=True, random_state=_rng(seed))
        lo, hi = res.confidence_interval
        if math.isfinite(lo) and math.isfinite(hi):
            return [float(lo), float(hi)]
    return None


def paired_difference(a, b, seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict:
    """mean(a) - mean(b) over the same faces: ``diff``, ``ci95`` (paired bootstrap, percentile) and ``p``
    (two-sided: twice the smaller share of bootstrap differences on either side of 0, at least
    1 / (n_resamples + 1)). Identical inputs give diff 0 and p 1."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same faces: {len(a)} vs {len(b)}")
    d = a - b
    diff = float(d.mean()) if len(d) else float("nan")
    if len(d) < 2 or np.ptp(d) == 0:
        return {"diff": diff, "ci95": [diff, diff], "p": 1.0 if not diff else 0.0}
    from scipy.stats import bootstrap

    def stat(x, y, axis=-1):
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    res = bootstrap((a, b), stat, paired=True, n_resamples=n_resamples, confidence_level=LEVEL,
                    method="percentile", vectorized=True, random_state=_rng(seed))
    dist = np.asarray(res.bootstrap_distribution)
    tail = min(float((dist <= 0).mean()), float((dist >= 0).mean()))
    p = min(1.0, max(2.0 * tail, 1.0 / (n_resamples + 1)))
    lo, hi = res.confidence_interval
    return {"diff": diff, "ci95": [float(lo), float(hi)], "p": p}


def adjust(pvalues) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.isfinite(p)
    if ok.any():
        from scipy.stats import false_discovery_control

        out[ok] = false_discovery_control(p[ok], method="bh")
    return [float(x) for x in out]
