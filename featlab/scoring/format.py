"""Format: how reports write a p-value and a paired difference with its interval."""

from __future__ import annotations


def format_p(p) -> str:
    """``0.012``, ``<0.001``, or '' when there is no test."""
    return "" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def format_diff(metric: str, d: float, lo=None, hi=None) -> str:
    """A paired difference in the metric's unit: ``+0.12 years [-0.05, +0.30]``, ``-1.4 pts [...]``."""
    f = (lambda v: f"{v:+.2f}") if metric == "mae" else (lambda v: f"{100 * v:+.1f}")
    unit = " years" if metric == "mae" else " pts"
    return f(d) + unit + (f" [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else "")
