"""PNG figures (matplotlib, Agg canvas only: no display, no pyplot global state).

- :func:`confusion_png`: heatmap normalised per true class, share and count in every cell
- :func:`scatter_png`: predicted vs true age with the identity line and the median prediction over the whole
  age range (:func:`median_line`)
- :func:`history_png`: loss and accuracy/MAE per epoch, train vs val; a run that hit its epoch cap says so
  (:func:`cap_note`)
- :func:`comparison_png`: one panel (bar group) per metric, one bar per tap in network order
- :func:`sweep_png`: a metric against tap depth

Legends sit below their panel, outside the data (:func:`_legends_below`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 120
TAP_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
               "#CCB974", "#64B5CD")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    except OSError as e:  # a full disk: no half-written plot left, and the error names the file
        path.unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return path


def _legends_below(fig, axes, **kw) -> list:
    """Each axes' legend under its own tick labels and x label, outside the data (placed once the layout
    is final: the figure is saved with a tight bounding box, which takes the legends in)."""
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in axes:
        if not ax.get_legend_handles_labels()[0]:
            continue
        bottom = ax.get_tightbbox(renderer).y0  # display units: ticks, tick labels and x label included
        y = ax.transAxes.inverted().transform((0.0, bottom))[1]
        out.append(ax.legend(loc="upper center", bbox_to_anchor=(0.5, y - 0.02), borderaxespad=0.0, **kw))
    return out


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}%"


#: a true class with fewer faces than this has its row's shares marked as unreliable in a confusion figure
SMALL_ROW = 20


def _pct_ci(v, ci) -> str:
    return _pct(v) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def confusion_png(cm, names, path, title: str = "", accuracy=None, one_off=None, accuracy_ci=None,
                  one_off_ci=None) -> Path:
    """Rows = true class (with its count), columns = predicted; colour and big number = share of the
    true class, small number = count. The title gives accuracy and 1-off with their 95 % intervals over
    people; rows of fewer than :data:`SMALL_ROW` faces are marked (†, shares in italics)."""
    cm = np.asarray(cm, dtype=np.int64)
    n = len(names)
    tot = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(tot > 0, cm / np.maximum(tot, 1), np.nan)
    size = max(4.8, 0.85 * n + 2.4)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot(111)
    im = ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0.0, vmax=1.0)
    small = n > 6
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            if np.isnan(v):
                continue
            dark = v > 0.55
            colour = "white" if dark else "#222222"
            few = tot[i, 0] < SMALL_ROW
            ax.text(j, i - 0.12, f"{100 * v:.0f}%", ha="center", va="center", color=colour,
                    fontsize=10 if small else 12, fontweight="bold" if i == j else "normal",
                    fontstyle="italic" if few else "normal")
            ax.text(j, i + 0.25, f"{cm[i, j]}", ha="center", va="center", color=colour, fontsize=7 if small else 8.5)
    ax.set_xticks(range(n))
    long_names = max(len(s) for s in names) > 3
    ax.set_xticklabels(names, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{nm}  (n={int(t)}{'†' if t < SMALL_ROW else ''})" for nm, t in zip(names, tot.ravel())])
    few_rows = int((tot.ravel() < SMALL_ROW).sum())
    ax.set_xlabel("predicted" + (f"\n† fewer than {SMALL_ROW} faces: that row's shares (italics) are unreliable"
                                 if few_rows else ""))
    ax.set_ylabel("true")
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    head = _headline(title, [f"accuracy {_pct_ci(accuracy, accuracy_ci)}" if accuracy is not None else "",
                             f"1-off {_pct_ci(one_off, one_off_ci)}" if one_off is not None else ""], int(cm.sum()))
    ax.set_title(head + "\n(rows normalised per true class" + (", 95 % intervals over people)" if accuracy_ci
                                                                  else ")"), fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("share of true class")
    return _save(fig, path)


def _headline(title: str, figures: list[str], n: int) -> str:
    """A figure's title: its own line, then the figures given (empty ones left out) and n, unless the title
    already says n."""
    parts = [f for f in figures if f] + ([] if "n=" in (title or "") else [f"n={n}"])
    return (title + "\n" if title else "") + "  ·  ".join(parts)


def scatter_png(y_true, y_pred, path, title: str = "", mae=None, cs5=None) -> Path:
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    fig = _figure(6.2, 6.0)
    ax = fig.add_subplot(111)
    hi = float(max(t.max(initial=1), p.max(initial=1))) * 1.04
    alpha = 0.5 if len(t) < 500 else (0.3 if len(t) < 3000 else 0.15)
    ax.scatter(t, p, s=9, alpha=alpha, color="#4C72B0", edgecolors="none", label="faces")
    ax.plot([0, hi], [0, hi], color="#C44E52", lw=1.5, label="identity (perfect)")
    xs, ys = median_line(t, p)
    if len(xs):
        ax.plot(xs, ys, color="#222222", lw=1.5, marker="o", ms=3,
                label="median prediction (5-year bands of true age, widened to 8 faces or more)")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("predicted age (years)")
    ax.grid(alpha=0.3)
    ax.set_title(_headline(title, [f"MAE {mae:.2f} years" if mae is not None else "",
                                   f"CS@5 {_pct(cs5)}" if cs5 is not None else ""], len(t)), fontsize=10)
    _legends_below(fig, [ax], fontsize=8, ncol=2)
    return _save(fig, path)


def median_line(y_true, y_pred, width: float = 5.0, min_faces: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The scatter's median prediction over the whole range of true ages: ``width``-year bands of true age,
    each merged with the next until it holds at least ``min_faces`` faces (the few left at the top join the
    last band), so that sparse old ages get a wider band instead of none; per band the median true and the
    median predicted age. Every face is in exactly one band."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if len(t) < 2 * min_faces:
        return np.array([]), np.array([])
    order = np.argsort(t, kind="stable")
    band = np.floor(t[order] / width).astype(np.int64)
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or (band[i] != band[i - 1] and i - start >= min_faces):
            groups.append(order[start:i])
            start = i
    if len(groups) > 1 and len(groups[-1]) < min_faces:
        groups[-2:] = [np.concatenate(groups[-2:])]
    return np.array([np.median(t[g]) for g in groups]), np.array([np.median(p[g]) for g in groups])


def cap_note(epochs_run: int, max_epochs: int | None, best_epoch: int | None = None) -> str | None:
    """What a history plot says when training ran into its epoch cap (early stopping never fired), else None."""
    if not max_epochs or epochs_run < max_epochs:
        return None
    best = f"; best val at epoch {best_epoch}" if best_epoch else ""
    still = " (val still improving: more epochs may help)" if best_epoch and best_epoch >= epochs_run - 2 else ""
    return f"stopped at the epoch cap ({max_epochs} epochs), not by early stopping{best}{still}"


def history_png(history: dict, path, metric: str = "accuracy", title: str = "", best_epoch: int | None = None,
                max_epochs: int | None = None) -> Path:
    """Two panels: loss, and ``metric`` (accuracy as %, or MAE in years), train vs val. A run that reached
    ``max_epochs`` (the cap, not early stopping, ended it) is marked by a line at the cap and a note."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 4.2)
    epochs = np.arange(1, len(history["loss"]) + 1)
    note = cap_note(len(epochs), max_epochs, best_epoch)
    labels = {"accuracy": "accuracy (%)", "mae_years": "MAE (years)"}
    axes = []
    for i, (k, lab) in enumerate((("loss", "loss"), (metric, labels.get(metric, metric)))):
        ax = fig.add_subplot(1, 2, i + 1)
        axes.append(ax)
        scale = 100.0 if k == "accuracy" else 1.0
        for prefix, colour, name in (("", "#4C72B0", "train"), ("val_", "#DD8452", "val")):
            v = history.get(prefix + k)
            if v is not None:
                ax.plot(epochs, np.asarray(v) * scale, color=colour, lw=1.8, label=name)
        if best_epoch:
            ax.axvline(best_epoch, color="#888888", ls="--", lw=1, label=f"best epoch ({best_epoch})")
            vb = history.get("val_" + k)
            if vb is not None and best_epoch <= len(vb):
                ax.annotate(f"{vb[best_epoch - 1] * scale:.3g}", (best_epoch, vb[best_epoch - 1] * scale),
                            textcoords="offset points", xytext=(6, 6), fontsize=8, color="#DD8452")
        if note:
            ax.axvline(max_epochs, color="#C44E52", ls=":", lw=1.6, label=f"epoch cap ({max_epochs}): stopped here")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        ax.set_title(lab)
    if title or note:
        fig.suptitle("\n".join(x for x in (title, note) if x), fontsize=11)
    fig.tight_layout()
    _legends_below(fig, axes, fontsize=8, ncol=2)
    return _save(fig, path)


METRIC_LABELS = {
    "accuracy": ("accuracy", "%"), "one_off": ("1-off accuracy", "%"), "mae": ("MAE (years, lower is better)", "y"),
    "cs5": ("CS@5 (|error| ≤ 5 years)", "%"), "balanced_accuracy": ("balanced accuracy", "%"),
    "rmse": ("RMSE (years, lower is better)", "y"), "macro_f1": ("macro F1", "%"),
}


def metric_label(m: str) -> tuple[str, str]:
    return METRIC_LABELS.get(m, (m, "%" if m.startswith(("accuracy", "one_off", "recall", "cs")) else ""))


# markers of a comparison panel, from that panel's own paired test against the chosen head
VERDICT_STYLES = (
    (["equivalent"], {"facecolors": "#4C72B0"}, "equivalent to chosen (TOST within margin, BH p < 0.05)"),
    (["worse", "better"], {"facecolors": "white", "marker": "D"}, "resolved from chosen (BH p < 0.05)"),
    (["worse, within margin", "better, within margin"], {"facecolors": "#4C72B0", "marker": "D"},
     "resolved, and within margin (both tests)"),
    (["inconclusive", ""], {"facecolors": "#A8BCDB"}, "inconclusive (neither resolved nor equivalent)"),
)


def comparison_png(rows: list[dict], taps: list[str], metrics: list[str], path, title: str = "") -> Path:
    """One panel per headline metric: per tap (network order) the head's test figure with its 95 % interval
    and the linear probe beside it (a square), each marked by its own paired verdict against the input chosen
    on validation (:data:`VERDICT_STYLES`; the chosen head is a star); values sit beside their points; the
    majority and zero-shot baselines as lines, their verdicts in the legend, their bands named there too."""
    n = len(taps)
    fig = _figure(max(4.2, 0.75 * n + 2.2) * len(metrics) + 0.6, 5.0)
    x = np.arange(n)
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        label, unit = metric_label(m)
        scale = 100.0 if unit == "%" else 1.0
        lo_key, hi_key = ("ci95_low", "ci95_high") if m == _primary(metrics) else (f"{m}_ci95_low", f"{m}_ci95_high")

        def pts(reader):
            v = np.full(n, np.nan)
            lo = np.full(n, np.nan)
            hi = np.full(n, np.nan)
            verdicts = np.full(n, "", dtype=object)
            ch = np.zeros(n, dtype=bool)
            vkey = "verdict" if m == _primary(metrics) else f"{m}_verdict"  # this panel's own paired test
            for r in rows:
                if r["reader"] == reader and r["tap"] in taps:
                    i = taps.index(r["tap"])
                    v[i] = _num(r.get(m)) * scale
                    lo[i] = _num(r.get(lo_key)) * scale
                    hi[i] = _num(r.get(hi_key)) * scale
                    verdicts[i] = r.get(vkey) or ""
                    ch[i] = bool(r.get("chosen"))
            return v, lo, hi, verdicts, ch

        v, lo, hi, verdicts, ch = pts("head")
        ax.errorbar(x - 0.1, v, yerr=[v - lo, hi - v], fmt="none", ecolor="#4C72B0", capsize=3, lw=1.2)
        for kind, style, text in VERDICT_STYLES:
            sel = np.isin(verdicts, kind) & ~ch
            if sel.any():
                ax.scatter(x[sel] - 0.1, v[sel], s=36, zorder=3, edgecolors="#4C72B0", label=f"head: {text}", **style)
        ax.scatter(x[ch] - 0.1, v[ch], marker="*", color="#C44E52", s=160, zorder=4, label="head, tap chosen on val")
        # the value beside its point, on a white ground: at the point's height, never at a whisker's end
        for i in range(n):
            if np.isfinite(v[i]):
                ax.annotate(f"{v[i]:.1f}" if unit == "%" else f"{v[i]:.2f}", (x[i] - 0.1, v[i]),
                            textcoords="offset points", xytext=(-7, 0), ha="right", va="center", fontsize=7.5,
                            zorder=5, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
        # the linear probes with their own verdicts against the chosen head, drawn like the heads' (squares)
        lv, llo, lhi, lverdicts, _ = pts("linear")
        if np.isfinite(lv).any():
            ax.errorbar(x + 0.15, lv, yerr=[lv - llo, lhi - lv], fmt="none", ecolor="#8C8C8C", capsize=2, lw=1)
            for (kind, style, text), face in zip(VERDICT_STYLES, ("#595959", "white", "#595959", "#D9D9D9")):
                sel = np.isin(lverdicts, kind) & np.isfinite(lv)
                if sel.any():  # the heads' shapes (diamond: resolved), in grey, squares where the heads have circles
                    ax.scatter(x[sel] + 0.15, lv[sel], s=26, zorder=3, edgecolors="#595959",
                               label=f"linear probe: {text}", marker=style.get("marker", "s"), facecolors=face)
        for r, colour, ls in [(r, c, s) for r in rows for c, s in [("#55A868", "--")] if r["reader"] == "majority"] + \
                [(r, "#DD8452", ":") for r in rows if str(r["reader"]).startswith("zero-shot")] + \
                [(r, "#8172B3", "-.") for r in rows if str(r["reader"]).startswith("cnn ")]:
            val = _num(r.get(m)) * scale
            if np.isfinite(val):
                vkey = "verdict" if m == _primary(metrics) else f"{m}_verdict"
                verdict = r.get(vkey) or ""
                shown = f"{val:.1f}" if unit == "%" else f"{val:.2f}"
                ax.axhline(val, color=colour, ls=ls, lw=1.3,
                           label=f"{r['reader']} {shown}" + (f" ({verdict} than chosen)" if verdict in ("worse", "better")
                                                             else f" ({verdict})" if verdict else ""))
                blo, bhi = _num(r.get(lo_key)) * scale, _num(r.get(hi_key)) * scale
                if np.isfinite(blo) and np.isfinite(bhi):
                    ax.axhspan(blo, bhi, color=colour, alpha=0.12, lw=0, label=f"{r['reader']}: 95 % CI band")
        ax.set_xticks(x)
        ax.set_xticklabels(taps, rotation=30 if max((len(t) for t in taps), default=0) > 6 else 0,
                           ha="right" if max((len(t) for t in taps), default=0) > 6 else "center", fontsize=9)
        ax.set_title(label + " (test, 95 % CI)", fontsize=10)
        ax.set_ylabel(label.split(" (")[0] + (" (%)" if unit == "%" else " (years)" if unit == "y" else ""))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_xlabel("input: taps in network order →" + (", then fusions of taps (a+b)" if any("+" in t for t in taps)
                                                            else ""))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _legends_below(fig, fig.axes, fontsize=7)  # never on the error bars or the baseline lines
    return _save(fig, path)


def _primary(metrics: list[str]) -> str:
    return "mae" if "mae" in metrics else "accuracy"


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def sweep_png(depths, taps: list[str], values: list, path, metric: str, title: str = "", reference: float | None = None,
              reference_label: str = "", intervals: list | None = None, chosen: list | None = None) -> Path:
    """``metric`` against tap depth (network position), one point per tap, names on the points."""
    label, unit = metric_label(metric)
    scale = 100.0 if unit == "%" else 1.0
    d = np.asarray(depths, dtype=np.float64)
    v = np.asarray([np.nan if x is None else float(x) * scale for x in values])
    fig = _figure(max(6.5, 0.35 * len(d) + 3), 4.6)
    ax = fig.add_subplot(111)
    ax.plot(d, v, marker="o", color="#4C72B0", lw=1.8)
    if intervals is not None:
        lo = np.array([np.nan if not c else c[0] * scale for c in intervals])
        hi = np.array([np.nan if not c else c[1] * scale for c in intervals])
        ax.fill_between(d, lo, hi, color="#4C72B0", alpha=0.15, lw=0, label="95 % interval (test)")
    best = None  # the tap chosen on validation, never the test optimum
    if chosen is not None and any(chosen):
        best = int(np.flatnonzero(chosen)[0])
        ax.scatter([d[best]], [v[best]], marker="*", s=160, color="#C44E52", zorder=4, label="chosen on val")
    for i, (x, y, t) in enumerate(zip(d, v, taps)):
        if np.isnan(y):
            continue
        ax.annotate(t, (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7.5,
                    rotation=45 if len(taps) > 12 else 0, fontweight="bold" if i == best else "normal")
    if reference is not None:
        ax.axhline(reference * scale, color="#C44E52", ls="--", lw=1.2, label=reference_label or "reference")
    ax.set_xlabel("tap depth (position in the network, input → output)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if best is not None:
        shown = f"{v[best]:.1f}%" if unit == "%" else f"{v[best]:.2f}" + (" years" if unit == "y" else "")
        title = (title + "\n" if title else "") + f"chosen on validation: {taps[best]} (test {shown})"
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    _legends_below(fig, [ax], fontsize=8, ncol=3)
    return _save(fig, path)
