"""Heatmap figures of ``featlab explain`` (matplotlib, Agg canvas only).

Signed maps are drawn with a diverging colormap centred on zero (red = evidence
for the explained output, blue = against), over a grey copy of the chip the
backbone saw; the colour's opacity grows with the map's magnitude so that the
face stays visible where the map is near zero.

- :func:`overlay`: one chip + map as an RGB image
- :func:`image_png`: one face: the chip, then one map per head, each titled with the prediction
- :func:`class_grid_png`: mean map per class (rows) and head (columns) on each class's mean face
- :func:`deletion_png`: deletion and insertion curves (most relevant first vs random order) per method and head
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plots import TAP_COLOURS, _figure, _save

CMAP = "bwr"


def scale_of(maps) -> float:
    """A symmetric colour limit: the 99.5th percentile of |map| (or its maximum when that is 0)."""
    a = np.abs(np.asarray(maps, dtype=np.float64))
    v = float(np.percentile(a, 99.5)) if a.size else 0.0
    return v if v > 0 else (float(a.max()) if a.size and a.max() > 0 else 1.0)


def overlay(chip: np.ndarray, hmap: np.ndarray, vmax: float, strength: float = 0.85) -> np.ndarray:
    """RGB float image in [0, 1]: the chip in grey, the signed map on top (opacity ~ |map| / vmax)."""
    from matplotlib import colormaps

    grey = np.asarray(chip, dtype=np.float64).mean(axis=2, keepdims=True) / 255.0
    grey = 0.25 + 0.6 * grey  # lower contrast so the colours read
    t = np.clip(np.asarray(hmap, dtype=np.float64) / vmax, -1.0, 1.0)
    rgb = colormaps[CMAP]((t + 1.0) / 2.0)[..., :3]
    a = (np.abs(t) * strength)[..., None]
    return np.clip(grey * (1.0 - a) + rgb * a, 0.0, 1.0)


def _colourbar(fig, ax, vmax: float, label: str):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(-vmax, vmax), cmap=CMAP)
    cb = fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(label, fontsize=7)
    cb.ax.tick_params(labelsize=6)
    return cb


def image_png(chip: np.ndarray, maps: list, titles: list[str], path, title: str = "",
              shown: str = "chip the backbone saw") -> Path:
    """The chip (``shown`` names it), then one signed map per head (own colour scale each)."""
    n = len(maps)
    fig = _figure(2.9 * (n + 1), 3.0)
    ax = fig.add_subplot(1, n + 1, 1)
    ax.imshow(chip)
    ax.set_title(shown, fontsize=8)
    ax.axis("off")
    for k, (m, t) in enumerate(zip(maps, titles)):
        ax = fig.add_subplot(1, n + 1, k + 2)
        v = scale_of(m)
        ax.imshow(overlay(chip, m, v))
        ax.set_title(t, fontsize=8)
        ax.axis("off")
        _colourbar(fig, ax, v, "against  <-  0  ->  for" if k == n - 1 else "")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def class_grid_png(mean_faces: np.ndarray, maps: np.ndarray, row_names: list[str], col_names: list[str], path,
                   title: str = "") -> Path:
    """Rows = classes, columns = heads (one head: a single row of classes). Each panel has its own symmetric
    colour scale (its 99.5th percentile of |map|): the figure shows where the evidence lies, not how much there is,
    since heads differ in units and young faces' age maps are smaller in years."""
    rows, cols = maps.shape[:2]
    one = cols == 1
    nr, nc = (1, rows) if one else (rows, cols)
    fig_h = 2.1 * nr + (0.9 if one else 0.6)
    fig = _figure(2.1 * nc + 0.6, fig_h)
    for r in range(rows):
        face = np.clip(mean_faces[r], 0, 255)
        for k in range(cols):
            ax = fig.add_subplot(nr, nc, (r + 1) if one else (r * cols + k + 1))
            ax.imshow(overlay(face, maps[r, k], scale_of(maps[r, k])))
            ax.set_xticks([])
            ax.set_yticks([])
            if one:
                ax.set_title(row_names[r], fontsize=8)
                if r == 0:
                    ax.set_ylabel(col_names[0], fontsize=8)
            else:
                if r == 0:
                    ax.set_title(col_names[k], fontsize=8)
                if k == 0:
                    ax.set_ylabel(row_names[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.12 / fig_h)
    fig.subplots_adjust(wspace=0.04, hspace=0.08, top=1.0 - 0.5 / fig_h)
    return _save(fig, path)


def faces_png(chips: list, maps: np.ndarray, face_names: list[str], said: list[list[str]], col_names: list[str],
              path, title: str = "") -> Path:
    """Single faces: a column per face (its label above), a row per head, each map on its own chip with
    its own colour scale and what the head said of that face beneath."""
    n, k = maps.shape[:2]
    fig = _figure(2.0 * n + 0.6, 2.35 * k + 0.9)
    for i in range(n):
        for j in range(k):
            ax = fig.add_subplot(k, n, j * n + i + 1)
            ax.imshow(overlay(chips[i], maps[i, j], scale_of(maps[i, j])))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title(face_names[i], fontsize=7)
            if i == 0:
                ax.set_ylabel(col_names[j], fontsize=8)
            ax.set_xlabel(said[i][j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def deletion_png(summary: dict, path) -> Path:
    """Mean deletion (top) and insertion (bottom) curves of explain_summary.json, cells replaced by the test
    perturbation: per method a column, per head a colour; dashed = random order. Legends give each AUC and the
    difference to random with its 95 % interval over faces."""
    methods = summary["methods"]
    fig = _figure(3.8 * len(methods), 6.4)
    n = len(methods)
    for i, (m, per_head) in enumerate(methods.items()):
        for row, kind in enumerate(("deletion", "insertion")):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            for j, (label, s) in enumerate(per_head.items()):
                c = TAP_COLOURS[j % len(TAP_COLOURS)]
                ref = s["mean_intact_output"]
                x = s["deletion_fraction"]
                ci = s.get(f"{kind}_ci95")
                ci_text = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
                ax.plot(x, np.asarray(s[f"{kind}_curve"]) / ref, color=c,
                        label=f"{label}: AUC {s[f'{kind}_auc']:.3f}, vs random {s[f'{kind}_auc_difference']:+.3f}"
                              f"{ci_text}")
                ax.plot(x, np.asarray(s[f"random_{kind}_curve"]) / ref, color=c, ls="--",
                        label=f"random order: {s[f'random_{kind}_auc']:.3f}")
            base = next(iter(per_head.values()))["test_baseline"] if per_head else ""
            ax.set_xlabel(f"share of the chip {'replaced' if kind == 'deletion' else 'restored'} "
                          "(most relevant first)", fontsize=8)
            ax.set_ylabel("explained output / intact", fontsize=8)
            ax.set_title(f"{m} map, {kind} with {base} cells, {summary['n_faces']} faces", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    fig.subplots_adjust(hspace=0.45)
    return _save(fig, path)
